"""Metrics and logs: what operators see, and that no secret ever reaches a log line."""

from __future__ import annotations

import json
import logging

import requests

from app.logs import JsonFormatter
from tests.support.keycloak_stub import LOGOUT_URL
from tests.support.metrics import changes, samples, series

MARKERS = {
    "password": "pw-MARKER-7f3a",
    "refresh": "rt-MARKER-91bc",
    "bearer": "at-MARKER-44de",
    "cookie": "ck-MARKER-0a1b",
    "query": "qs-MARKER-c0de",
    "username": "user-MARKER-5eed",
}


def test_each_request_writes_one_access_line(client, keycloak, caplog):
    """A request produces one app.access record with method, route, path, status, duration, client and error code."""
    with caplog.at_level(logging.INFO, logger="app.access"):
        client.post("/api/auth/refresh-token", json={}, headers={"X-Request-ID": "rid-log-1"})
    records = [r for r in caplog.records if r.name == "app.access"]
    assert len(records) == 1
    line = json.loads(JsonFormatter().format(records[0]))
    assert line.pop("time") and line.pop("duration_ms") >= 0
    assert line == {
        "level": "INFO", "logger": "app.access", "message": "request", "method": "POST",
        "route": "/api/auth/refresh-token", "path": "/api/auth/refresh-token", "status": 400,
        "client_ip": "127.0.0.1", "error": "refresh_token_required",
    }


def test_no_secret_reaches_any_log_line(client, keycloak, caplog):
    """Passwords, tokens, cookies, Authorization headers and query strings with marker values never reach the log."""
    keycloak.refuses(400, "invalid_grant", "Invalid user credentials")
    keycloak.mock.post(LOGOUT_URL, body=requests.ConnectionError("refused"))
    with caplog.at_level(logging.DEBUG):
        client.set_cookie("session", MARKERS["cookie"])
        client.post(f"/api/auth/login?token={MARKERS['query']}",
                    json={"username": MARKERS["username"], "password": MARKERS["password"]})
        client.post("/api/auth/refresh-token", data={"refresh_token": MARKERS["refresh"]})
        client.post("/api/auth/logout", json={"refresh_token": MARKERS["refresh"]})
        client.get("/api/auth/me", headers={"Authorization": f"Bearer {MARKERS['bearer']}"})
        client.get("/api/auth/verify", headers={"Authorization": f"Bearer a.{MARKERS['bearer']}.c"})
        client.post("/api/auth/login", data=f'{{"password": "{MARKERS["password"]}"', content_type="application/json")
    formatter = JsonFormatter()
    text = caplog.text + "\n".join(formatter.format(r) for r in caplog.records)
    assert len(caplog.records) >= 7
    leaked = [name for name, marker in MARKERS.items() if marker in text]
    # The username is no secret, and the audit trail must name who tried to log in; no other line names it.
    naming = {r.name for r in caplog.records if MARKERS["username"] in formatter.format(r)}
    assert (leaked, naming) == (["username"], {"app.audit"})


def test_metrics_count_requests_errors_and_keycloak_calls(client, keycloak):
    """/metrics counts each request by route, method and status, each error code, and each Keycloak call."""
    keycloak.refuses(400, "invalid_grant", "Token is not active")
    before = samples(client)
    client.post("/api/auth/refresh-token", json={"refresh_token": "rt"})
    client.get("/no-such-route")
    response = client.get("/metrics")
    after = samples(client)
    refresh = series("broker_http_requests_total", method="POST", route="/api/auth/refresh-token", status="400")
    unmatched = series("broker_http_requests_total", method="GET", route="unmatched", status="404")
    metrics = series("broker_http_requests_total", method="GET", route="/metrics", status="200")
    refused = series("broker_errors_total", error="invalid_grant")
    not_found = series("broker_errors_total", error="not_found")
    keycloak_refresh = series("broker_keycloak_request_duration_seconds_count", operation="refresh", outcome="refused")
    discovery = series("broker_keycloak_request_duration_seconds_count", operation="discovery", outcome="ok")
    upstream = series("broker_refreshes_total", kind="upstream")
    timed = series("broker_http_request_duration_seconds_count", route="/api/auth/refresh-token")
    assert (response.status_code, response.mimetype) == (200, "text/plain")
    # The /metrics reading itself counts once between the two readings (the first reading is counted after it).
    assert changes(before, after, refresh, unmatched, metrics, refused, not_found, keycloak_refresh, discovery,
                   upstream, timed) == {
        refresh: 1, unmatched: 1, metrics: 2, refused: 1, not_found: 1, keycloak_refresh: 1, discovery: 1,
        upstream: 1, timed: 1,
    }


def test_metrics_count_token_validations(client, keycloak):
    """Bearer checks are counted by outcome, and the first one fetched the realm's keys once."""
    before = samples(client)
    client.get("/api/auth/verify", headers={"Authorization": f"Bearer {keycloak.realm_keys.token()}"})
    client.get("/api/auth/verify", headers={"Authorization": "Bearer not.a.token"})
    client.get("/api/auth/verify", headers={"Authorization": "Bearer not.a.token"})
    after = samples(client)
    valid = series("broker_token_validations_total", outcome="valid")
    invalid = series("broker_token_validations_total", outcome="invalid")
    fetched = series("broker_jwks_fetches_total", outcome="ok")
    assert changes(before, after, valid, invalid, fetched) == {valid: 1, invalid: 2, fetched: 1}
