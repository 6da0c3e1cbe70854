"""Audit events from the real broker: every kind, in the log, in a real Redis Stream and at a webhook, no secret."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import redis
import requests

from app.audit import event_from_log

PASSWORD_MARKER = "pw-MARKER-audit-7c1d9e"


class Receiver(BaseHTTPRequestHandler):
    """A webhook receiver on loopback that keeps every JSON body it gets."""

    bodies: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        Receiver.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def webhook():
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/audit"
    server.shutdown()
    server.server_close()


def post(url: str, path: str, body: dict, address: str, agent: str = "browser-a") -> requests.Response:
    return requests.post(f"{url}{path}", json=body, headers={"X-Forwarded-For": address, "User-Agent": agent},
                         timeout=30)


def wait_for(read, count: int) -> list[dict]:
    deadline = time.monotonic() + 10
    while True:
        found = read()
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_every_audit_event_reaches_the_log_the_stream_and_the_webhook(start_broker, redis_url, webhook, make_user,
                                                                     kc_admin):
    """Register, log in (right, wrong, held back, over the limit), refresh, replay, refresh from elsewhere, log out."""
    stream = f"audit-{uuid.uuid4().hex[:8]}"
    url = start_broker(BROKER_REGISTRATION="true", BROKER_REDIS_URL=redis_url, BROKER_AUDIT_REDIS_STREAM=stream,
                       BROKER_AUDIT_WEBHOOK_URL=webhook, BROKER_IP_BINDING="address", BROKER_TRUSTED_PROXY_HOPS="1",
                       BROKER_RATE_LIMIT_LOGIN="2 per minute", BROKER_RATE_LIMIT_LOGIN_IP="1000 per minute")
    Receiver.bodies = []
    username = f"audit-{uuid.uuid4().hex[:8]}"
    home, away = "203.0.113.10", "198.51.100.20"
    try:
        registered = post(url, "/api/auth/register", {"username": username, "email": f"{username}@example.com",
                                                       "password": PASSWORD_MARKER}, home)
        assert registered.status_code == 201, registered.text
        spent = registered.json()["token"]["refresh_token"]
        refreshed = post(url, "/api/auth/refresh-token", {"refresh_token": spent}, home)
        assert refreshed.status_code == 200
        current = refreshed.json()["token"]["refresh_token"]
        assert post(url, "/api/auth/refresh-token", {"refresh_token": current}, away).status_code == 401
        assert post(url, "/api/auth/refresh-token", {"refresh_token": spent}, home, agent="thief").status_code == 400
        held = make_user(required_actions=["UPDATE_PASSWORD"])
        assert post(url, "/api/auth/login", {"username": held.username, "password": held.password},
                    "203.0.113.11").status_code == 401
        relogged = post(url, "/api/auth/login", {"username": username, "password": PASSWORD_MARKER}, "203.0.113.12")
        assert relogged.status_code == 200
        out = post(url, "/api/auth/logout", {"refresh_token": relogged.json()["token"]["refresh_token"]},
                   "203.0.113.12")
        assert out.status_code == 200
        # Last: Keycloak's quick-login check locks the account for a minute after fast wrong guesses.
        statuses = [post(url, "/api/auth/login", {"username": username, "password": f"wrong-{i}"}, home).status_code
                    for i in range(3)]
        assert statuses == [401, 401, 429]
    finally:
        for user in kc_admin.get_users({"username": username, "exact": True}):
            kc_admin.delete_user(user["id"])
    sub = registered.json()["user"]["sub"]  # refresh and logout name the token's subject: a refresh token has no name
    expected = [
        ("register", "ok", None, username),
        ("refresh", "ok", None, sub),
        ("location_blocked", "refused", "location_blocked", sub),
        ("reuse_detected", "refused", "invalid_grant", sub),
        ("account_setup_required", "refused", "account_setup_required", held.username),
        ("login", "ok", None, username),
        ("logout", "ok", None, sub),
        ("login", "refused", "invalid_grant", username),
        ("login", "refused", "invalid_grant", username),
        ("rate_limited", "refused", "rate_limited", username),
    ]

    def shape(events: list[dict]) -> list[tuple]:
        return [(e["event"], e["outcome"], e["reason"] or None, e["user"] or None) for e in events]

    client = redis.Redis.from_url(redis_url)
    streamed = wait_for(lambda: [{k.decode(): v.decode() for k, v in fields.items()}
                                 for _, fields in client.xrange(stream)], len(expected))
    hooked = wait_for(lambda: list(Receiver.bodies), len(expected))
    logged = [event_from_log(json.loads(line)) for line in start_broker.logs[url].read_text().splitlines()
              if '"logger": "app.audit"' in line]
    assert shape(logged) == shape(streamed) == shape(hooked) == expected
    assert [e["client_ip"] for e in logged][:3] == [home, home, away]
    assert all(e["schema"] == "token-broker.audit/1" and e["request_id"] for e in logged)
    assert len({e["session"] for e in logged[:4]}) == 1 and logged[0]["session"]
    everything = json.dumps([logged, streamed, hooked])
    for secret in (PASSWORD_MARKER, spent, current, registered.json()["token"]["access_token"],
                   "token-broker-local-secret"):
        assert secret not in everything
