#!/usr/bin/env bash
# Known vulnerabilities in the packages installed in the virtualenv, by pip-audit (make audit).
#
# pip-audit asks an online vulnerability service about every installed package. Where that service cannot
# be reached (a machine without that network access), it marks every package "skipped" instead of failing;
# this script tells that apart from a clean result and says so, with exit status 2, so that "nothing found"
# is only ever printed after a real check. Exit 0: checked, no known vulnerability; 1: vulnerabilities found.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-.venv/bin/python}"

"$PYTHON" -m pip install --quiet --disable-pip-version-check "pip-audit>=2.7"
report="$(mktemp)"
output="$(mktemp)"
trap 'rm -f "$report" "$output"' EXIT
set +e
# Its own summary ("No known vulnerabilities found") is printed even when it checked nothing: keep it aside.
"$PYTHON" -m pip_audit --progress-spinner off --format json --output "$report" --skip-editable >"$output" 2>&1
status=$?
set -e
"$PYTHON" - "$report" "$status" "$output" <<'PY'
import json
import sys

path, status, output = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    with open(path) as handle:
        dependencies = json.load(handle).get("dependencies", [])
except (OSError, ValueError):
    dependencies = []
checked = [d for d in dependencies if "skip_reason" not in d]
vulnerable = [d for d in checked if d.get("vulns")]
if not checked and status not in (0, 1):
    print(open(output).read()[-2000:], end="")
    print(f"make audit: pip-audit failed (exit status {status}) before checking anything")
    sys.exit(2)
if not checked:
    print("make audit: the vulnerability service could not be reached from this machine, so nothing was "
          f"checked ({len(dependencies)} packages skipped). Run it where the service is reachable; until then the "
          "floors in pyproject.toml (docs/security.md) are the defence.")
    sys.exit(2)
for dependency in vulnerable:
    ids = ", ".join(v["id"] for v in dependency["vulns"])
    print(f"{dependency['name']} {dependency['version']}: {ids}")
print(f"make audit: {len(checked)} packages checked, {len(vulnerable)} with known vulnerabilities"
      + (f", {len(dependencies) - len(checked)} skipped" if len(checked) < len(dependencies) else ""))
sys.exit(1 if vulnerable or status not in (0, 1) else 0)
PY
