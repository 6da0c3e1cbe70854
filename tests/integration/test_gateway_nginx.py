"""docs/api.md's nginx configuration, run by a real nginx in front of the session's broker and the real Keycloak:
auth_request for any valid token, and for a location that needs the realm role admin."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
API_DOC = REPO / "docs" / "api.md"
# The block right after this marker in docs/api.md is the one this module runs.
MARKER = "<!-- tested by tests/integration/test_gateway_nginx.py -->"
# What the documented block names, and what this test puts there instead (each must occur exactly once).
LISTEN = "listen 443 ssl;"
BROKER_SERVER = "server 127.0.0.1:8000;"
ORDERS_SERVER = "server 127.0.0.1:9090;"
ADMIN_SERVER = "server 127.0.0.1:9091;"


def _under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def documented_config() -> str:
    """The ```nginx block of docs/api.md that follows MARKER: the `http { }` part of the gateway's configuration."""
    blocks = re.findall(re.escape(MARKER) + r"\s*```nginx\n(.*?)```", API_DOC.read_text(), re.S)
    assert len(blocks) == 1, f"docs/api.md should have exactly one ```nginx block right after {MARKER}"
    return blocks[0]


def _once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"docs/api.md's nginx block should contain {old!r} exactly once"
    return text.replace(old, new)


def runnable_config(documented: str, *, prefix: Path, port: int, broker: str, upstream: str) -> str:
    """The documented `http { }` part verbatim but for its addresses, inside what nginx needs to run unprivileged
    from `prefix` in the foreground: pid, logs and temporary files there, one process."""
    http = _once(documented, LISTEN, f"listen 127.0.0.1:{port};")
    http = _once(http, BROKER_SERVER, f"server {broker};")
    http = _once(http, ORDERS_SERVER, f"server {upstream};")
    http = _once(http, ADMIN_SERVER, f"server {upstream};")
    temp_paths = "\n".join(f"    {kind}_temp_path {prefix}/{kind}_temp;"
                           for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (
        "daemon off;\n"
        "master_process off;\n"
        f"pid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/error.log info;\n"
        "events {\n    worker_connections 64;\n}\n"
        "http {\n"
        f"    access_log {prefix}/access.log;\n"
        f"{temp_paths}\n"
        f"{textwrap.indent(http, '    ')}"
        "}\n"
    )


class Upstream:
    """The protected services: one loopback HTTP server that answers every request with what it was sent."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                seen = {
                    "method": self.command,
                    "path": self.path,
                    "body_bytes": length,
                    "x_auth": {k: v for k, v in self.headers.items() if k.lower().startswith("x-auth-")},
                }
                upstream.seen.append(seen)
                body = json.dumps({"service": "upstream", **seen}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Upstream":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session", autouse=True)
def nginx_binary() -> str:
    """nginx from PATH (or Debian's /usr/sbin); skipped without one, but under CI (.ci/run installs it) a failure.

    Session-scoped and autouse, so it is decided before the real Keycloak is started for nothing.
    """
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if found is None:
        message = "nginx is not installed (Debian: apt-get install nginx; .ci/run installs it under CI)"
        if _under_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    """The services behind the gateway."""
    with Upstream() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(nginx_binary: str, broker_url: str, upstream: Upstream, tmp_path_factory) -> Iterator[str]:
    """A real nginx running docs/api.md's configuration on a free loopback port, in front of the session's broker."""
    prefix = tmp_path_factory.mktemp("nginx")
    port = _free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(runnable_config(documented_config(), prefix=prefix, port=port,
                                    broker=broker_url.removeprefix("http://"), upstream=upstream.address))
    command = [nginx_binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, f"nginx refused the documented configuration:\n{checked.stderr}\n{conf.read_text()}"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"nginx did not start:\n{(prefix / 'error.log').read_text()[-4000:]}", pytrace=False)
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=15)


def access_token(broker_url: str, user) -> str:
    """The user's access token, from a login through the broker."""
    response = requests.post(f"{broker_url}/api/auth/login", json={"username": user.username, "password": user.password},
                             timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["token"]["access_token"]


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_a_token_with_role_admin_reaches_the_service_with_its_identity(gateway, upstream, broker_url, make_user):
    """/admin/ with an admin's token: the service's own answer, and it saw the broker's X-Auth-* headers, not the client's."""
    admin = make_user(roles=["admin"])
    spoofed = {"X-Auth-Subject": "someone-else", "X-Auth-Roles": "forged"}
    response = requests.get(f"{gateway}/admin/reports?year=2025", headers={**bearer(access_token(broker_url, admin)),
                                                                           **spoofed}, timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    roles = body["x_auth"].pop("X-Auth-Roles").split(",")
    assert body == {
        "service": "upstream", "method": "GET", "path": "/admin/reports?year=2025", "body_bytes": 0,
        "x_auth": {"X-Auth-Subject": admin.id, "X-Auth-Username": admin.username,
                   "X-Auth-Email": f"{admin.username}@example.com"},
    }
    assert "admin" in roles and "forged" not in roles


def test_a_body_is_forwarded_to_the_service_but_never_to_the_broker(gateway, upstream, broker_url, make_user):
    """A POST with a 64 KiB body to /admin/: the check goes without it (no 413), the service gets all of it."""
    admin = make_user(roles=["admin"])
    response = requests.post(f"{gateway}/admin/upload", data=b"x" * 65536,
                             headers={**bearer(access_token(broker_url, admin)), "Content-Type": "application/octet-stream"},
                             timeout=10)
    assert response.status_code == 200, response.text
    assert (response.json()["method"], response.json()["body_bytes"]) == ("POST", 65536)


def test_a_token_without_role_admin_gets_the_brokers_403(gateway, upstream, broker_url, make_user):
    """/admin/ with a valid token that lacks admin: the broker's 403 insufficient_role JSON, and the service is not asked."""
    user = make_user()
    token = access_token(broker_url, user)
    before = len(upstream.seen)
    response = requests.get(f"{gateway}/admin/reports", headers={**bearer(token), "X-Auth-Roles": "admin"}, timeout=10)
    assert (response.status_code, response.json()) == (
        403, {"error": "insufficient_role", "message": "The access token lacks the realm role 'admin'"})
    assert response.headers["Content-Type"] == "application/json"
    assert len(upstream.seen) == before
    # The same token passes where no role is needed.
    assert requests.get(f"{gateway}/api/orders/42", headers=bearer(token), timeout=10).status_code == 200


@pytest.mark.parametrize("path", ["/admin/reports", "/api/orders/42"])
def test_no_token_gets_the_brokers_401(gateway, upstream, path):
    """No token: the broker's 401 access_token_required JSON with one Bearer challenge, and the service is not asked."""
    before = len(upstream.seen)
    response = requests.get(f"{gateway}{path}", timeout=10)
    assert (response.status_code, response.json()) == (
        401, {"error": "access_token_required", "message": "An access token is required"})
    assert response.raw.headers.getlist("WWW-Authenticate") == ['Bearer realm="token-broker"']
    assert len(upstream.seen) == before


def test_an_invalid_token_gets_401_invalid_token(gateway, upstream):
    """A malformed token at /admin/: 401 invalid_token with the reason, not a 403."""
    response = requests.get(f"{gateway}/admin/reports", headers=bearer("not-a-token"), timeout=10)
    assert (response.status_code, response.json()) == (
        401, {"error": "invalid_token", "message": "Access token is malformed"})
    assert response.raw.headers.getlist("WWW-Authenticate") == [
        'Bearer realm="token-broker", error="invalid_token", error_description="Access token is malformed"']


def test_the_broker_behind_the_gateway_answers_the_frontend(gateway, make_user):
    """/api/auth/ goes to the broker itself: a login through the gateway works."""
    user = make_user()
    response = requests.post(f"{gateway}/api/auth/login", json={"username": user.username, "password": user.password},
                             timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["message"] == "Login successful"
