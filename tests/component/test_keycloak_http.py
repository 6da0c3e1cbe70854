"""The wire to Keycloak (app/keycloak_http.py) on real sockets: one write per request, keep-alive reuse and the
connection counter (broker_keycloak_connections_opened_total, `make bench` P8), connections Keycloak closed,
chunked answers, every way an exchange can fail and which failure it is, and TLS with KEYCLOAK_CA_BUNDLE."""

from __future__ import annotations

import datetime
import os
import resource
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import REGISTRY

from app import keycloak_http
from app.config import Settings
from app.errors import AnswerLost, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from app.keycloak_client import KeycloakClient
from app.keycloak_http import AnswerBroken, AnswerTooLarge, NoAnswer, NotConnected, Wire

TIMEOUT = (1.0, 0.5)
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\": \"b\"}\n"


def read_request(conn: socket.socket, buffer: bytearray) -> bytes | None:
    """One whole request (head and Content-Length body) from `conn`, or None at the end of the stream."""
    while b"\r\n\r\n" not in buffer:
        data = conn.recv(65536)
        if not data:
            return None
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(rest) < length:
        rest += conn.recv(65536)
    del buffer[:len(head) + 4 + length]
    return head + b"\r\n\r\n" + rest[:length]


class Server:
    """A loopback TCP server that runs `script(conn, server)` for each connection it accepts, in a thread."""

    def __init__(self, script: Callable[[socket.socket, "Server"], None], tls: ssl.SSLContext | None = None):
        self.script = script
        self.accepted = 0
        self.requests: list[bytes] = []
        self.first_reads: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.tls = tls
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            self.script(conn, self)
        except OSError:
            pass
        finally:
            conn.close()

    def url(self, path: str = "/token", scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def close(self) -> None:
        self.listener.close()


def answering(*answers: bytes, then: Callable[[socket.socket], None] | None = None):
    """A script that reads requests on one connection and sends `answers` in turn, then runs `then` (or closes)."""

    def script(conn: socket.socket, server: Server) -> None:
        buffer = bytearray()
        for answer in answers:
            first = conn.recv(65536)
            server.first_reads.append(first)
            buffer += first
            request = read_request(conn, buffer)
            if request is None:
                return
            server.requests.append(request)
            conn.sendall(answer)
        if then is not None:
            then(conn)

    return script


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(script, tls=None) -> Server:
        servers.append(Server(script, tls))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _opened() -> float:
    return REGISTRY.get_sample_value("broker_keycloak_connections_opened_total") or 0.0


def echo(conn: socket.socket, server: Server) -> None:
    """Keep-alive: every request's body comes back as the answer's body."""
    buffer = bytearray()
    while (request := read_request(conn, buffer)) is not None:
        server.requests.append(request)
        body = request.partition(b"\r\n\r\n")[2]
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def test_requests_go_out_in_one_write_over_one_counted_keep_alive_connection(serve):
    server = serve(answering(OK, OK, then=lambda c: c.recv(1)))
    client = KeycloakClient(Settings(keycloak_url=f"http://127.0.0.1:{server.port}", client_secret="x"))
    before = _opened()

    first = client.wire.request("POST", server.url(), body=b"refresh_token=" + b"a" * 900, timeout=TIMEOUT,
                                headers=[("Content-Type", "application/x-www-form-urlencoded")])
    second = client.wire.request("GET", server.url("/certs?x=1"), timeout=TIMEOUT)

    assert [(a.status_code, a.headers.get("content-type"), a.json()) for a in (first, second)] == \
        [(200, "application/json", {"a": "b"})] * 2
    assert server.accepted == 1 and _opened() - before == 1  # the second request reused the connection
    assert server.requests == [
        b"POST /token HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: token-broker\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 914\r\n\r\nrefresh_token=" % server.port
        + b"a" * 900,
        b"GET /certs?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: token-broker\r\n\r\n" % server.port,
    ]
    assert server.first_reads == server.requests  # the first read of each request held all of it: one write


def test_an_answer_saying_connection_close_is_not_reused(serve):
    close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    server = serve(answering(close))
    wire = Wire()
    answers = [wire.request("GET", server.url(), timeout=TIMEOUT).content for _ in range(2)]
    assert (answers, server.accepted) == ([b"ok", b"ok"], 2)


def test_a_connection_keycloak_closed_while_idle_is_replaced_not_failed(serve):
    server = serve(answering(OK))  # answers once, then closes the connection
    wire = Wire()
    assert wire.request("GET", server.url(), timeout=TIMEOUT).status_code == 200
    time.sleep(0.1)  # the close has arrived
    assert wire.request("GET", server.url(), timeout=TIMEOUT).status_code == 200
    assert server.accepted == 2


def test_a_chunked_answer_is_read_whole(serve):
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    server = serve(answering(chunked, chunked))
    wire = Wire()
    assert [wire.request("GET", server.url(), timeout=TIMEOUT).content for _ in range(2)] == [b"hello world"] * 2
    assert server.accepted == 1


def _reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


@pytest.mark.parametrize("answer, then, failure", [
    (None, _reset, AnswerBroken),  # read the request, then a reset: Keycloak may have acted on it
    (None, lambda c: c.shutdown(socket.SHUT_RDWR), AnswerBroken),  # read it, then closed without a word
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial", None, AnswerBroken),  # cut in the middle
    (b"SSH-2.0-OpenSSH_9.2\r\n", None, AnswerBroken),  # not HTTP
    (None, lambda c: time.sleep(1.0), NoAnswer),  # read it, never answered
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", lambda c: time.sleep(1.0), AnswerBroken),  # stalled
])
def test_each_way_an_exchange_fails_is_told_apart(serve, answer, then, failure):
    answers = (answer,) if answer is not None else ()

    def script(conn, server):
        if not answers:
            buffer = bytearray()
            server.requests.append(read_request(conn, buffer))
        else:
            answering(*answers)(conn, server)
        if then is not None:
            then(conn)

    server = serve(script)
    with pytest.raises(failure):
        Wire().request("POST", server.url(), body=b"refresh_token=rt", timeout=TIMEOUT)
    assert len(server.requests) == 1 and server.requests[0].endswith(b"refresh_token=rt")  # sent once, never again


def test_nothing_listening_is_not_connected():
    port = socket.create_server(("127.0.0.1", 0))
    address = port.getsockname()[1]
    port.close()
    with pytest.raises(NotConnected) as caught:
        Wire().request("GET", f"http://127.0.0.1:{address}/", timeout=TIMEOUT)
    assert (caught.value.tls, str(caught.value)) == (False, "ConnectionRefusedError: Connection refused")


def test_an_answer_too_large_is_refused(serve, monkeypatch):
    monkeypatch.setattr(keycloak_http, "MAX_ANSWER_BYTES", 1000)
    server = serve(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000))
    with pytest.raises(AnswerTooLarge):
        Wire().request("GET", server.url(), timeout=TIMEOUT)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "http:///nohost", "http://127.0.0.1:99999/", "http://127.0.0.1:0/",
                                 f"http://{'a' * 64}.example/"])
def test_a_url_the_wire_cannot_use_is_not_connected(url):
    with pytest.raises(NotConnected):
        Wire().request("GET", url, timeout=TIMEOUT)


@pytest.mark.parametrize("script, error", [
    (lambda c, s: _reset(c) if s.requests.append(read_request(c, bytearray())) is None else None, AnswerLost),
    (lambda c, s: time.sleep(1.0) if s.requests.append(read_request(c, bytearray())) is None else None,
     UpstreamTimeout),
    (answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n" + b"x" * 2000000), UpstreamError),
])
def test_the_client_turns_wire_failures_into_the_contracts_errors(serve, script, error):
    server = serve(script)
    settings = Settings(keycloak_url=f"http://127.0.0.1:{server.port}", client_secret="x", read_timeout=0.5)
    client = KeycloakClient(settings)
    client._discovery = {"token_endpoint": server.url(), "end_session_endpoint": server.url("/logout"),
                         "issuer": "i", "jwks_uri": server.url("/certs")}
    with pytest.raises(error):
        client.login("alice", "alice-password")
    assert error is not UpstreamUnavailable


def _certificate(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context for 127.0.0.1 with a self-signed certificate, and the CA bundle that trusts it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keycloak.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(bundle, key_file)
    return context, bundle


def test_tls_is_verified_against_the_ca_bundle_and_refused_without_it(serve, tmp_path):
    context, bundle = _certificate(tmp_path)
    server = serve(echo, tls=context)
    trusted = Wire(verify=str(bundle))
    answers = [trusted.request("POST", server.url(scheme="https"), body=b"b%d" % i, timeout=TIMEOUT).content
               for i in range(2)]
    assert answers == [b"b0", b"b1"]
    with pytest.raises(NotConnected) as caught:
        Wire(verify=True).request("GET", server.url(scheme="https"), timeout=TIMEOUT)
    assert (caught.value.tls, str(caught.value)) == (True, "TLS: CERTIFICATE_VERIFY_FAILED")


def test_bytes_after_an_answer_are_never_read_as_the_next_answer(serve):
    """An answer followed in the same write by more (a second answer nobody asked for): the connection is not
    reused, so the next request, perhaps another user's, gets its own answer on a new connection."""
    alice = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nalice"
    stale = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"
    bob = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbob"

    def script(conn, server):
        answering(alice + stale if server.accepted == 1 else bob, then=lambda c: c.recv(1))(conn, server)

    server = serve(script)
    wire = Wire()
    assert [wire.request("GET", server.url(), timeout=TIMEOUT).content for _ in range(2)] == [b"alice", b"bob"]
    assert server.accepted == 2


def test_connections_are_reused_when_their_descriptors_are_above_1024(serve):
    """The idle check uses poll(), not select(): a busy worker's sockets have descriptors above FD_SETSIZE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        server = serve(answering(OK, OK, OK, then=lambda c: c.recv(1)))
        wire = Wire()
        answers = [wire.request("GET", server.url(), timeout=TIMEOUT).status_code for _ in range(3)]
        assert (answers, server.accepted) == ([200, 200, 200], 1)
        assert wire._idle[("http", "127.0.0.1", server.port)][0].sock.fileno() > 1024
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_read_timeout_bounds_the_whole_answer_not_each_wait(serve):
    """A body trickling in a byte every 0.1 s is cut off at the read timeout (0.5 s), not after its 3 s: a
    refresh must not outlast the lease that keeps other processes from sending its token again."""

    def script(conn, server):
        server.requests.append(read_request(conn, bytearray()))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n")
        for byte in b"x" * 30:
            conn.sendall(bytes([byte]))
            time.sleep(0.1)

    server = serve(script)
    started = time.monotonic()
    with pytest.raises(AnswerBroken) as caught:
        Wire().request("GET", server.url(), timeout=(1.0, 0.5))
    assert (str(caught.value), time.monotonic() - started < 1.0) == ("the answer was not complete within 0.5 s", True)


def test_a_path_with_other_characters_is_percent_encoded(serve):
    server = serve(answering(OK))
    Wire().request("GET", server.url("/realms/société/x%20y?q=é"), timeout=TIMEOUT)
    assert server.requests[0].startswith(b"GET /realms/soci%C3%A9t%C3%A9/x%20y?q=%C3%A9 HTTP/1.1\r\n")


@pytest.mark.parametrize("headers", [[("Authorization", "Bearer SECRET\r\nX: y")], [("Authorization", "Bearer é-SECRET")]])
def test_a_header_http_cannot_carry_is_refused_before_sending_and_never_quoted(serve, headers):
    server = serve(answering(OK))
    with pytest.raises(NotConnected) as caught:
        Wire().request("GET", server.url(), headers=headers, timeout=TIMEOUT)
    assert str(caught.value) == "the request has a header or target that HTTP cannot carry"
    assert server.requests == []
