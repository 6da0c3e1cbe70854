"""The broker's connections to Keycloak, on real sockets: one write per request, keep-alive reuse, and the counter
of new connections (broker_keycloak_connections_opened_total; `make bench` P8)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import urllib3.connection
from prometheus_client import REGISTRY

from app.config import Settings
from app.keycloak_client import build_session


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _opened() -> float:
    return REGISTRY.get_sample_value("broker_keycloak_connections_opened_total") or 0.0


def test_a_request_goes_out_in_one_write_and_connections_are_reused_and_counted(server, monkeypatch):
    writes: list[bytes] = []
    real_send = urllib3.connection.HTTPConnection.send

    def counted(self, data):
        writes.append(bytes(data))
        return real_send(self, data)

    monkeypatch.setattr(urllib3.connection.HTTPConnection, "send", counted)
    session = build_session(Settings(client_secret="x"))
    before = _opened()

    first = session.post(f"{server}/token", data={"grant_type": "refresh_token", "refresh_token": "a" * 900},
                         timeout=(2, 5))
    second = session.post(f"{server}/token", data={"refresh_token": "b"}, timeout=(2, 5))

    assert (first.status_code, first.content) == (200, b"grant_type=refresh_token&refresh_token=" + b"a" * 900)
    assert (second.status_code, second.content) == (200, b"refresh_token=b")
    assert len(writes) == 2  # one write per request: head and body together
    assert writes[0].startswith(b"POST /token HTTP/1.1\r\n") and writes[0].endswith(b"\r\n\r\n" + first.content)
    assert _opened() - before == 1  # the second request reused the first one's connection
