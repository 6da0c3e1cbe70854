"""A short soak (bench/soak.py) against the session's real broker and Keycloak."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SOAK_PATH = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def _load_soak():
    """bench/ is not a package: load bench/soak.py as the module `soak` (registered, so its dataclass works)."""
    if "soak" in sys.modules:
        return sys.modules["soak"]
    spec = importlib.util.spec_from_file_location("soak", SOAK_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module
    spec.loader.exec_module(module)
    return module


def test_short_soak_has_no_failures_and_covers_every_kind_of_request(broker_url, kc_admin):
    """Twenty seconds of mixed traffic at 20 requests/s give no 5xx, no unexpected invalid_grant and no lost answer."""
    soak = _load_soak()
    # broker_pid stays None: the fixture does not expose gunicorn's pid, so RSS is left to the CLI.
    report = soak.run_soak(broker_url, kc_admin, duration=20, rate=20, users=8)
    report.render()
    assert report.failures() == []
    assert report.by_route.get("refresh", 0) > 0
    assert report.duplicate_pairs > 0 and report.by_route.get("refresh-duplicate", 0) == 2 * report.duplicate_pairs
    assert report.by_route.get("me", 0) > 0
    assert report.by_route.get("verify", 0) > 0
    assert report.requests_total <= 20 * 20 * 1.2
