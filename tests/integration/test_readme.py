"""The curl examples of README.md and docs/api.md, run verbatim (but for the broker's address) against the real stack."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def sh_blocks(path: Path) -> list[str]:
    """The ```sh blocks of a Markdown file, in order."""
    return re.findall(r"```sh\n(.*?)```", path.read_text(), re.S)


def expected_lines(script: str) -> list[str]:
    """The `# {...}` comment lines: what the command above each prints."""
    return [line[2:] for line in script.splitlines() if line.startswith("# {")]


def run(script: str, broker_url: str, cwd: Path) -> list[str]:
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script.replace("http://127.0.0.1:8000", broker_url)],
                          cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def is_subsequence(expected: list[str], lines: list[str]) -> bool:
    remaining = iter(lines)
    return all(any(line == wanted for line in remaining) for wanted in expected)


def test_readme_curl_examples_answer_as_documented(broker_url, tmp_path):
    """Every `# {...}` line under a curl command in the README is exactly what that command prints."""
    (block,) = re.findall(r"<!-- readme-curl-examples -->\s*```sh\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert run(block, broker_url, tmp_path) == expected_lines(block)


def test_api_doc_curl_examples_answer_as_documented(broker_url, tmp_path):
    """docs/api.md's sh blocks, run in order in one shell, print every `# {...}` line they promise, in order."""
    script = "\n".join(sh_blocks(REPO / "docs" / "api.md"))
    expected = expected_lines(script)
    assert len(expected) >= 10
    lines = run(script, broker_url, tmp_path)
    assert is_subsequence(expected, lines), "\n".join(lines)
