"""FaultProxy against a tiny local HTTP upstream: every mode, per-request path rules, counters and teardown."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest
import requests

from tests.support.fault_proxy import FaultProxy

REQUEST = b"GET /raw HTTP/1.1\r\nHost: upstream\r\n\r\n"


class Upstream(ThreadingHTTPServer):
    """A keep-alive HTTP server that counts requests and can be told to sleep before answering."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.hits = 0
        self.sleep = 0.0
        self.wake = threading.Event()
        self.lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:  # resets from the proxy are the point here
        pass


class Handler(BaseHTTPRequestHandler):
    """Answers GET with `hello <path>` and POST by echoing the body."""

    protocol_version = "HTTP/1.1"
    timeout = 5
    server: Upstream

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._answer(b"hello " + self.path.encode())

    def do_POST(self) -> None:
        self._answer(self.rfile.read(int(self.headers["Content-Length"])))

    def _answer(self, body: bytes) -> None:
        with self.server.lock:
            self.server.hits += 1
        if self.server.sleep:
            self.server.wake.wait(self.server.sleep)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.wake.set()
    server.shutdown()
    server.server_close()
    thread.join(2)


def proxy_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("fault-proxy")]


@pytest.fixture
def proxy(upstream: Upstream) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", upstream.server_port) as fault_proxy:
        yield fault_proxy
    assert not proxy_threads()


def get(proxy: FaultProxy, path: str = "/", timeout: float = 2.0) -> requests.Response:
    return requests.get(proxy.url + path, timeout=(1.0, timeout))


def raw_connection(proxy: FaultProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=2)


def round_trip(sock: socket.socket) -> bytes:
    sock.sendall(REQUEST)
    received = b""
    while not received.endswith(b"hello /raw") and (chunk := sock.recv(65536)):
        received += chunk
    return received


def read_until_reset(sock: socket.socket) -> bytes:
    received = b""
    with pytest.raises(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_pass_forwards_get(proxy: FaultProxy, upstream: Upstream) -> None:
    """In pass mode a GET reaches the upstream and its answer comes back unchanged."""
    response = get(proxy, "/hello")
    assert (response.status_code, response.text, upstream.hits) == (200, "hello /hello", 1)


def test_pass_keeps_alive_across_large_bodies(proxy: FaultProxy, upstream: Upstream) -> None:
    """Large POST bodies are echoed exactly and the keep-alive connection is reused for every request."""
    body = bytes(range(256)) * 1200
    with requests.Session() as session:
        for _ in range(3):
            assert session.post(proxy.url + "/echo", data=body, timeout=2).content == body
        assert session.get(proxy.url + "/after", timeout=2).text == "hello /after"
    assert proxy.counts[FaultProxy.PASS] == 1
    assert upstream.hits == 4


def test_refuse_refuses_connections(proxy: FaultProxy) -> None:
    """In refuse mode nothing listens, so connect() fails with ECONNREFUSED."""
    proxy.set_mode(FaultProxy.REFUSE)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1)
    with pytest.raises(requests.ConnectionError):
        get(proxy)


def test_refuse_then_pass_listens_on_the_same_port(proxy: FaultProxy) -> None:
    """Leaving refuse mode listens again on the same port."""
    port = proxy.port
    proxy.set_mode(FaultProxy.REFUSE)
    proxy.set_mode(FaultProxy.PASS)
    assert proxy.port == port
    assert get(proxy, "/back").text == "hello /back"


def test_refuse_resets_existing_connections(proxy: FaultProxy) -> None:
    """Switching to refuse resets connections that are already open."""
    with raw_connection(proxy) as sock:
        assert round_trip(sock).startswith(b"HTTP/1.1 200 OK")
        proxy.set_mode(FaultProxy.REFUSE)
        assert read_until_reset(sock) == b""


def test_blackhole_never_answers(proxy: FaultProxy, upstream: Upstream) -> None:
    """A blackholed request times out on read and never reaches the upstream."""
    proxy.set_mode(FaultProxy.BLACKHOLE)
    with pytest.raises(requests.ReadTimeout):
        get(proxy, timeout=0.3)
    assert upstream.hits == 0


def test_delay_holds_the_answer(proxy: FaultProxy) -> None:
    """In delay mode the answer arrives, but only after `seconds`."""
    proxy.set_mode(FaultProxy.DELAY, seconds=0.4)
    started = time.monotonic()
    response = get(proxy, "/slow")
    assert response.text == "hello /slow"
    assert time.monotonic() - started >= 0.4


def test_delay_beyond_the_timeout_is_a_read_timeout(proxy: FaultProxy, upstream: Upstream) -> None:
    """A delay longer than the client's read timeout is a ReadTimeout, though the upstream answered."""
    proxy.set_mode(FaultProxy.DELAY, seconds=1.0)
    with pytest.raises(requests.ReadTimeout):
        get(proxy, timeout=0.2)
    assert upstream.hits == 1


def test_reset_before_answer_reaches_upstream(proxy: FaultProxy, upstream: Upstream) -> None:
    """reset_before_answer lets the upstream process the request, then the client sees a reset."""
    proxy.set_mode(FaultProxy.RESET_BEFORE_ANSWER)
    with pytest.raises(requests.ConnectionError):
        get(proxy)
    assert upstream.hits == 1


def test_reset_before_answer_sends_no_byte(proxy: FaultProxy) -> None:
    """reset_before_answer waits for the upstream's answer and passes none of it before the RST."""
    proxy.set_mode(FaultProxy.RESET_BEFORE_ANSWER)
    with raw_connection(proxy) as sock:
        sock.sendall(REQUEST)
        assert read_until_reset(sock) == b""
    assert proxy.faults[FaultProxy.RESET_BEFORE_ANSWER] == 1


def test_reset_before_answer_waits_for_a_slow_upstream(proxy: FaultProxy, upstream: Upstream) -> None:
    """The reset comes only once the upstream begins answering, not when the request is forwarded."""
    upstream.sleep = 0.3
    proxy.set_mode(FaultProxy.RESET_BEFORE_ANSWER)
    started = time.monotonic()
    with pytest.raises(requests.ConnectionError):
        get(proxy)
    assert time.monotonic() - started >= 0.3


def test_reset_mid_answer_passes_the_first_bytes(proxy: FaultProxy) -> None:
    """reset_mid_answer passes exactly the first 20 bytes of the answer, then resets."""
    proxy.set_mode(FaultProxy.RESET_MID_ANSWER)
    with raw_connection(proxy) as sock:
        sock.sendall(REQUEST)
        assert read_until_reset(sock) == b"HTTP/1.1 200 OK\r\nSer"


def test_reset_mid_answer_takes_a_byte_count(proxy: FaultProxy) -> None:
    """The `bytes` parameter sets how much of the answer gets through before the reset."""
    proxy.set_mode(FaultProxy.RESET_MID_ANSWER, bytes=9)
    with raw_connection(proxy) as sock:
        sock.sendall(REQUEST)
        assert read_until_reset(sock) == b"HTTP/1.1 "


def test_reset_mid_answer_is_a_connection_error(proxy: FaultProxy, upstream: Upstream) -> None:
    """A client cut off inside the status line sees a ConnectionError; the upstream did answer."""
    proxy.set_mode(FaultProxy.RESET_MID_ANSWER)
    with pytest.raises(requests.ConnectionError):
        get(proxy)
    assert upstream.hits == 1


def test_reset_on_connect_resets_before_any_request(proxy: FaultProxy, upstream: Upstream) -> None:
    """reset_on_connect resets every new connection and the upstream never sees a request."""
    proxy.set_mode(FaultProxy.RESET_ON_CONNECT)
    with pytest.raises(requests.ConnectionError):
        get(proxy)
    with pytest.raises(ConnectionResetError):  # on loopback the RST may already fail connect() itself
        with raw_connection(proxy) as sock:
            sock.recv(65536)
    assert upstream.hits == 0
    assert proxy.counts[FaultProxy.RESET_ON_CONNECT] == 2


def test_http_502_answers_without_upstream(proxy: FaultProxy, upstream: Upstream) -> None:
    """http_502 answers 502 Bad Gateway in HTML with Connection: close and never contacts the upstream."""
    proxy.set_mode(FaultProxy.HTTP_502)
    response = get(proxy, "/anything")
    assert response.status_code == 502
    assert response.headers["Content-Type"] == "text/html"
    assert response.headers["Connection"] == "close"
    assert "<h1>502 Bad Gateway</h1>" in response.text
    assert upstream.hits == 0


def test_http_502_reads_the_request_body_first(proxy: FaultProxy, upstream: Upstream) -> None:
    """A large POST still gets its 502 rather than a reset, because the body is read before answering."""
    proxy.set_mode(FaultProxy.HTTP_502)
    for _ in range(3):
        assert requests.post(proxy.url + "/token", data=b"x" * 300_000, timeout=2).status_code == 502
    assert upstream.hits == 0


def test_path_rule_fails_only_matching_requests(proxy: FaultProxy, upstream: Upstream) -> None:
    """With path_contains only matching requests get the fault, judged per request on a keep-alive connection."""
    proxy.set_mode(FaultProxy.HTTP_502, path_contains="/certs")
    with requests.Session() as session:
        statuses = [session.get(proxy.url + path, timeout=2).status_code
                    for path in ("/token", "/realms/demo/certs", "/token", "/token")]
    assert statuses == [200, 502, 200, 200]
    assert upstream.hits == 3
    assert proxy.counts[FaultProxy.HTTP_502] == 2  # the 502 closed the first connection
    assert proxy.faults[FaultProxy.HTTP_502] == 1


def test_path_rule_with_reset_before_answer(proxy: FaultProxy, upstream: Upstream) -> None:
    """A path rule with reset_before_answer resets only the matching request, after the upstream processed it."""
    proxy.set_mode(FaultProxy.RESET_BEFORE_ANSWER, path_contains="/certs")
    with requests.Session() as session:
        assert session.get(proxy.url + "/token", timeout=2).status_code == 200
        with pytest.raises(requests.ConnectionError):
            session.get(proxy.url + "/certs", timeout=2)
        assert session.get(proxy.url + "/token", timeout=2).status_code == 200
    assert upstream.hits == 3


def test_path_rule_ignores_non_http_streams(proxy: FaultProxy) -> None:
    """A stream that is not HTTP never matches a path rule and is forwarded as it is."""
    proxy.set_mode(FaultProxy.HTTP_502, path_contains="/certs")
    with raw_connection(proxy) as sock:
        sock.sendall(b"*1\r\n$4\r\nPING /certs\r\n\r\n")
        assert b"Error code explanation: 400" in sock.recv(65536)  # http.server's answer, not the proxy's 502


def test_mode_change_applies_to_open_connections(proxy: FaultProxy, upstream: Upstream) -> None:
    """A mode change applies to the next request on an already open keep-alive connection."""
    with requests.Session() as session:
        assert session.get(proxy.url + "/first", timeout=2).status_code == 200
        proxy.set_mode(FaultProxy.BLACKHOLE)
        with pytest.raises(requests.ReadTimeout):
            session.get(proxy.url + "/second", timeout=(1, 0.3))
    assert proxy.counts == {**dict.fromkeys(FaultProxy.MODES, 0), FaultProxy.PASS: 1}
    assert proxy.faults[FaultProxy.BLACKHOLE] == 1
    assert upstream.hits == 1


def test_counts_connections_per_mode(proxy: FaultProxy) -> None:
    """counts records accepted connections under the mode in force when each was accepted."""
    get(proxy)
    get(proxy)
    proxy.set_mode(FaultProxy.HTTP_502)
    get(proxy)
    proxy.set_mode(FaultProxy.REFUSE)
    with pytest.raises(requests.ConnectionError):
        get(proxy)
    assert proxy.counts == {**dict.fromkeys(FaultProxy.MODES, 0), FaultProxy.PASS: 2, FaultProxy.HTTP_502: 1}


def test_reset_all_drops_live_connections(proxy: FaultProxy) -> None:
    """reset_all resets open connections while the proxy keeps accepting new ones."""
    with raw_connection(proxy) as sock:
        assert round_trip(sock).startswith(b"HTTP/1.1 200 OK")
        proxy.reset_all()
        assert read_until_reset(sock) == b""
    assert get(proxy, "/again").text == "hello /again"


def test_unreachable_upstream_resets_the_client() -> None:
    """When the upstream refuses, the client connection is reset."""
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        dead_port = spare.getsockname()[1]
    with FaultProxy("127.0.0.1", dead_port) as proxy:
        with pytest.raises(requests.ConnectionError):
            get(proxy)


def test_stop_closes_everything_quickly(upstream: Upstream) -> None:
    """stop() with hung connections open returns fast, ends every proxy thread and stops listening."""
    proxy = FaultProxy("127.0.0.1", upstream.server_port).start()
    proxy.set_mode(FaultProxy.DELAY, seconds=5)
    with raw_connection(proxy) as delayed, raw_connection(proxy) as held:
        delayed.sendall(REQUEST)
        held.sendall(b"GET /partial HTTP/1.1\r\n")
        time.sleep(0.1)
        started = time.monotonic()
        proxy.stop()
        assert time.monotonic() - started < 0.5
    assert not proxy_threads()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1)


def test_set_mode_rejects_bad_arguments(proxy: FaultProxy) -> None:
    """Unknown modes, unknown parameters, delay without seconds and refuse with a path rule are rejected."""
    with pytest.raises(ValueError):
        proxy.set_mode("drop-everything")
    with pytest.raises(TypeError):
        proxy.set_mode(FaultProxy.DELAY, second=1)
    with pytest.raises(TypeError):
        proxy.set_mode(FaultProxy.DELAY)
    with pytest.raises(ValueError):
        proxy.set_mode(FaultProxy.REFUSE, path_contains="/certs")
