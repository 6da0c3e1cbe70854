"""Metrics and logs: what operators see, and that no secret ever reaches a log line."""

from __future__ import annotations

import json
import logging

import requests

from app.logs import JsonFormatter
from tests.api.conftest import LOGOUT_URL

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
    assert leaked == []


def test_metrics_count_requests_errors_and_keycloak_calls(client, keycloak):
    """/metrics exposes request counts by route and status, error codes, and Keycloak call timings."""
    keycloak.refuses(400, "invalid_grant", "Token is not active")
    client.post("/api/auth/refresh-token", json={"refresh_token": "rt"})
    client.get("/no-such-route")
    response = client.get("/metrics")
    text = response.get_data(as_text=True)
    assert response.status_code == 200 and response.mimetype == "text/plain"
    assert 'broker_http_requests_total{method="POST",route="/api/auth/refresh-token",status="400"}' in text
    assert 'broker_http_requests_total{method="GET",route="unmatched",status="404"}' in text
    assert 'broker_errors_total{error="invalid_grant"}' in text
    assert 'broker_keycloak_request_duration_seconds_count{operation="refresh",outcome="refused"}' in text
    assert 'broker_keycloak_request_duration_seconds_count{operation="discovery",outcome="ok"}' in text
    assert 'broker_refreshes_total{kind="upstream"}' in text
    assert 'broker_http_request_duration_seconds_bucket{le="0.005",route="/api/auth/refresh-token"}' in text


def test_metrics_count_token_validations(client, keycloak):
    """Bearer checks are counted by outcome."""
    client.get("/api/auth/verify", headers={"Authorization": f"Bearer {keycloak.realm_keys.token()}"})
    client.get("/api/auth/verify", headers={"Authorization": "Bearer not.a.token"})
    text = client.get("/metrics").get_data(as_text=True)
    assert 'broker_token_validations_total{outcome="valid"}' in text
    assert 'broker_token_validations_total{outcome="invalid"}' in text
    assert 'broker_jwks_fetches_total{outcome="ok"}' in text
