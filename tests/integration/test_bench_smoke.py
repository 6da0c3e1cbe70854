"""`make bench` kept from rotting: bench/run.py --smoke runs every part of the benchmark in a minute or two.

It starts its own Keycloak, the broker as `make run` starts it, the minimal Flask floor, measures one short pair
of windows per scenario with wrk, and writes its JSON and chart into a temporary directory (never bench/results
or docs/). The figures of a one-second window mean nothing, so only what does not depend on speed is held to a
value: every window answered without a failure, every goal row is there with a measured value, and P5 (50
identical refreshes at once: one Keycloak grant, 50 identical 200s, the session alive) holds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import _unavailable

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_bench_smoke_run_measures_every_goal(tmp_path):
    if shutil.which("wrk") is None:
        _unavailable("wrk is not installed (Debian's `wrk` package; .ci/run and make bench install it)")
    doc_before = (REPO / "docs" / "benchmarks.md").read_text()
    done = subprocess.run([sys.executable, "bench/run.py", "--smoke", "--out", str(tmp_path), "--port-base", "27100"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [result] = tmp_path.glob("*.json")
    report = json.loads(result.read_text())

    assert [g["id"] for g in report["goals"]] == [f"P{i}" for i in range(1, 10)]
    assert all(g["value"] and g["met"] in (True, False) for g in report["goals"][:8])
    assert report["goals"][8]["met"] is None  # P9 needs PEER=oauth2-proxy
    assert report["p5"] == {"requests": 50, "ok_200": 50, "statuses": [200], "distinct_bodies": 1,
                            "upstream_grants": 1.0, "session_alive_after": True}
    assert report["goals"][4]["met"] is True
    scenarios = {(row["scenario"], row["side"]) for row in report["scenarios"]}
    assert scenarios == {("refresh@1", "refresh/direct"), ("refresh@1", "refresh/broker"),
                         ("refresh@8", "refresh/direct"), ("refresh@8", "refresh/broker"),
                         ("login@1", "login/direct"), ("login@1", "login/broker"),
                         ("login@8", "login/direct"), ("login@8", "login/broker"),
                         ("verify@8", "verify/direct"), ("verify@8", "verify/broker"), ("verify@8", "verify/floor")}
    assert all(w["requests"] > 0 and w["failures"] == 0 for w in report["windows"])
    assert report["p6"]["requests_served"] >= 2000 and report["p6"]["rss_after_mib"] > 0
    assert len(report["p7_seconds"]) == 1 and 0 < report["p7_seconds"][0] < 120
    assert report["p8"]["upstream_calls"] > 0
    assert (tmp_path / result.name.replace(".json", ".png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (REPO / "docs" / "benchmarks.md").read_text() == doc_before  # a smoke run never rewrites the doc
    for line in ("P1 ", "P5  PASS", "P9  ----"):
        assert line in done.stdout
