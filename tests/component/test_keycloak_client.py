"""KeycloakClient over real sockets: timeouts, refused and dropped connections, no retries, threads."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import parse_qs

import pytest

from app.config import Settings
from app.errors import UpstreamTimeout, UpstreamUnavailable
from app.keycloak_client import KeycloakClient, TokenSet


class FakeRealm(BaseHTTPRequestHandler):
    """A tiny HTTP Keycloak: discovery, a token endpoint that echoes the user, one that hangs, one that hangs up."""

    hits: Counter = Counter()
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        base = f"http://127.0.0.1:{self.server.server_port}"
        self._json(200, {
            "issuer": f"{base}/realms/demo",
            "token_endpoint": f"{base}{self.server.token_path}",
            "end_session_endpoint": f"{base}/logout",
            "jwks_uri": f"{base}/certs",
        })

    def do_POST(self) -> None:
        self.hits[self.path] += 1
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode()).items()}
        if self.path == "/hang":
            time.sleep(1.5)
            return
        if self.path == "/hang-up":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        who = form.get("username", "?")
        time.sleep(0.005)  # let threads overlap
        self._json(200, {"access_token": f"access-for-{who}", "refresh_token": f"refresh-for-{who}",
                         "token_type": "Bearer", "expires_in": 300})

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 drops connections under 32 threads
    daemon_threads = True


@pytest.fixture
def realm_server() -> Iterator[ThreadingHTTPServer]:
    """A FakeRealm on a free loopback port, in a thread of its own."""
    server = _Server(("127.0.0.1", 0), FakeRealm)
    server.token_path = "/token"
    FakeRealm.hits = Counter()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def client_for(port: int, **overrides) -> KeycloakClient:
    settings = Settings(keycloak_url=f"http://127.0.0.1:{port}", keycloak_realm="demo", client_id="token-broker",
                        client_secret="s", connect_timeout=1.0, read_timeout=overrides.pop("read_timeout", 0.5),
                        refresh_answer_limit=1.0)
    return KeycloakClient(settings)


def test_a_hanging_token_endpoint_is_a_timeout_after_one_attempt(realm_server):
    """A Keycloak that accepts but never answers raises UpstreamTimeout, and the POST was sent once."""
    realm_server.token_path = "/hang"
    with pytest.raises(UpstreamTimeout):
        client_for(realm_server.server_port).refresh("rt")
    assert FakeRealm.hits["/hang"] == 1


def test_a_dropped_connection_is_unavailable_and_not_retried(realm_server):
    """A connection closed without an answer raises UpstreamUnavailable; the refresh was sent exactly once."""
    realm_server.token_path = "/hang-up"
    with pytest.raises(UpstreamUnavailable):
        client_for(realm_server.server_port).refresh("rt")
    time.sleep(0.2)
    assert FakeRealm.hits["/hang-up"] == 1


def test_a_refused_connection_is_unavailable():
    """Nothing listening on Keycloak's port raises UpstreamUnavailable."""
    with pytest.raises(UpstreamUnavailable):
        client_for(1).login("alice", "pw")


def test_concurrent_logins_each_get_their_own_tokens(realm_server):
    """One shared client, 32 threads, 8 users: every caller gets the tokens issued for its own user."""
    client = client_for(realm_server.server_port, read_timeout=5.0)
    users = [f"user{i % 8}" for i in range(200)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(lambda u: (u, client.login(u, "pw")), users))
    assert all(tokens.access_token == f"access-for-{user}" for user, tokens in results)
    assert all(tokens.refresh_token == f"refresh-for-{user}" for user, tokens in results)
    assert FakeRealm.hits["/token"] == 200


def test_token_set_repr_hides_tokens():
    """A TokenSet in a log line or traceback shows no token."""
    tokens = TokenSet.from_response({"access_token": "AT-marker", "refresh_token": "RT-marker", "token_type": "Bearer"})
    assert "marker" not in repr(tokens)
