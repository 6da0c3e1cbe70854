"""The README's curl examples, run verbatim (but for the broker's address) against the real stack."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block() -> str:
    text = README.read_text()
    match = re.search(r"<!-- readme-curl-examples -->\s*```sh\n(.*?)```\s*<!-- /readme-curl-examples -->", text, re.S)
    assert match, "README lost its curl examples block"
    return match.group(1)


def test_readme_curl_examples_answer_as_documented(broker_url, tmp_path):
    """Every `# {...}` line under a curl command in the README is exactly what that command prints."""
    block = readme_block()
    script = block.replace("http://127.0.0.1:8000", broker_url)
    expected = [line[2:] for line in block.splitlines() if line.startswith("# {")]
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == expected
