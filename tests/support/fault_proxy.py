"""A threaded TCP fault-injection proxy that tests drive from Python, standing in for toxiproxy.

It listens on 127.0.0.1 only and forwards to one upstream; `set_mode()` picks the fault (see the mode
constants on `FaultProxy`). It is HTTP-aware: the client->upstream stream is split into requests (the
request head plus its Content-Length body) and each request is judged when its head arrives, so a mode
change, or a `path_contains` rule, applies to the next request on an already open keep-alive connection as
well as to new connections. A request in flight keeps the judgement it got. Limits, all fine for
requests/urllib3 clients and Keycloak:

- clients must not pipeline (send a request before the previous answer is complete);
- a request with Transfer-Encoding (or an unreadable Content-Length) fixes the judgement for the rest of
  its connection; a blackholed or locally answered (http_502) connection discards everything after it;
- a stream that does not look like HTTP is judged chunk by chunk and never matches `path_contains`;
- the upstream connection is opened lazily, on the first byte to forward, so protocols in which the
  server speaks first are not supported;
- resets are real RSTs (SO_LINGER 0); `reset_mid_answer` byte counts are exact for small counts on loopback.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from typing import Callable

Rule = tuple[str, dict[str, float]]

_HEAD_LIMIT = 65536
_REQUEST_LINE = re.compile(rb"[A-Z]+ \S+ HTTP/1\.[01]")
_METHOD_START = re.compile(rb"[A-Z]{1,20}(?: |\Z)")
_BODY_502 = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>\n"
_RESPONSE_502 = (b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n" % len(_BODY_502)) + _BODY_502


def _quietly(call: Callable[..., object], *args: object) -> None:
    try:
        call(*args)
    except OSError:  # the peer or another thread got there first
        pass


def _nodelay(sock: socket.socket) -> socket.socket:
    _quietly(sock.setsockopt, socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the proxy must not add Nagle delays
    return sock


def _rst(sock: socket.socket) -> None:
    _quietly(sock.setsockopt, socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _looks_like_http(buf: bytes) -> bool:
    line, sep, _ = buf.partition(b"\r\n")
    return bool(_REQUEST_LINE.fullmatch(line) if sep else _METHOD_START.match(line))


def _content_length(head: bytes) -> int | None:
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                return None
    return length if length >= 0 else None


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of one upstream, whose behaviour tests switch with set_mode()."""

    PASS = "pass"
    REFUSE = "refuse"
    BLACKHOLE = "blackhole"
    DELAY = "delay"
    RESET_BEFORE_ANSWER = "reset_before_answer"
    RESET_MID_ANSWER = "reset_mid_answer"
    RESET_ON_CONNECT = "reset_on_connect"
    HTTP_502 = "http_502"
    MODES = (PASS, REFUSE, BLACKHOLE, DELAY, RESET_BEFORE_ANSWER, RESET_MID_ANSWER, RESET_ON_CONNECT, HTTP_502)

    def __init__(self, upstream_host: str, upstream_port: int, listen_port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._port = listen_port
        self._lock = threading.Lock()  # guards mode, counters and the connection set
        self._control = threading.Lock()  # serialises start/stop/set_mode
        self._mode, self._params, self._path = self.PASS, {}, None
        self._listener: tuple[socket.socket, threading.Event, threading.Thread] | None = None
        self._conns: set[_Connection] = set()
        self._counts = dict.fromkeys(self.MODES, 0)
        self._faults = dict.fromkeys(self.MODES, 0)
        self._running = False

    @property
    def port(self) -> int:
        """The listening port (fixed once started, kept across `refuse`)."""
        return self._port

    @property
    def url(self) -> str:
        """`http://127.0.0.1:<port>`."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def counts(self) -> dict[str, int]:
        """Connections accepted, keyed by the mode in force when each was accepted."""
        with self._lock:
            return dict(self._counts)

    @property
    def faults(self) -> dict[str, int]:
        """Requests (or non-HTTP chunks, or connections for reset_on_connect) a non-pass mode was applied to."""
        with self._lock:
            return dict(self._faults)

    def start(self) -> FaultProxy:
        """Bind and start accepting; returns self."""
        with self._control:
            if self._running:
                raise RuntimeError("FaultProxy already started")
            self._running = True
            self._listen()
            if self._mode == self.REFUSE:
                self._unlisten()
        return self

    def stop(self) -> None:
        """Stop listening, close every connection and join all threads."""
        with self._control:
            self._running = False
            self._unlisten()
            self._drop_all(hard=True)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def set_mode(self, mode: str, *, path_contains: str | None = None, **params: float) -> None:
        """Switch to `mode` (params: seconds= for delay, bytes= for reset_mid_answer), optionally for matching requests only."""
        if mode not in self.MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {self.MODES}")
        if set(params) - {"seconds", "bytes"}:
            raise TypeError(f"unknown parameters {sorted(set(params) - {'seconds', 'bytes'})}")
        if mode == self.DELAY and "seconds" not in params:
            raise TypeError("delay needs seconds=")
        if mode == self.REFUSE and path_contains is not None:
            raise ValueError("refuse acts before any request is seen; it cannot take path_contains")
        with self._control:
            if mode == self.REFUSE:
                self._unlisten()
            with self._lock:
                self._mode, self._params, self._path = mode, dict(params), path_contains
            if mode == self.REFUSE:
                self._drop_all(hard=False)
            elif self._running and self._listener is None:
                self._listen()

    def reset_all(self) -> None:
        """Reset (RST) every live client connection and close its upstream connection."""
        self._drop_all(hard=False)

    def _drop_all(self, hard: bool) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.abort(hard=hard)
        for conn in conns:
            conn.join(1.0)

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self._port))
            sock.listen(128)
            sock.settimeout(0.05)
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        stop = threading.Event()
        thread = threading.Thread(target=self._accept_loop, args=(sock, stop), name="fault-proxy-accept", daemon=True)
        self._listener = (sock, stop, thread)
        thread.start()

    def _unlisten(self) -> None:
        if self._listener is None:
            return
        sock, stop, thread = self._listener
        self._listener = None
        stop.set()
        thread.join(2.0)
        sock.close()

    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._counts[self._mode] += 1
                immediate = self._mode in (self.RESET_ON_CONNECT, self.REFUSE) and self._path is None
                if immediate:
                    self._faults[self._mode] += 1
                else:
                    conn = _Connection(self, client)
                    self._conns.add(conn)
            if immediate:
                _rst(client)
                client.close()
            else:
                conn.start()

    def _rule(self, request_line: str | None) -> Rule:
        with self._lock:
            if self._path is not None and (request_line is None or self._path not in request_line):
                return self.PASS, {}
            if self._mode != self.PASS:
                self._faults[self._mode] += 1
            return self._mode, self._params


class _Connection:
    """One client connection, its lazily opened upstream connection and the two pump threads."""

    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy, self.client = proxy, _nodelay(client)
        self.upstream: socket.socket | None = None
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.released = False  # sockets closed; nobody may touch them any more
        self.threads: list[threading.Thread] = []
        self.live = 0
        self.rule: Rule = (FaultProxy.PASS, {})  # the rule of the request whose answer is awaited
        self.answered = 0
        self.last_forward = 0.0
        self.buf, self.remaining, self.raw = b"", 0, False
        self.request_rule: Rule = (FaultProxy.PASS, {})
        self.sticky: Rule | None = None

    def start(self) -> None:
        """Start pumping the client side."""
        with self.lock:
            self._spawn(self._pump_client, "fault-proxy-client")

    def join(self, timeout: float) -> None:
        """Wait for this connection's threads to end."""
        for thread in list(self.threads):
            if thread is not threading.current_thread():
                thread.join(timeout)

    def abort(self, hard: bool = False) -> None:
        """Reset the client (RST on close) and drop the upstream; `hard` also wakes a writer stuck towards the client."""
        with self.lock:
            self.closed.set()
            if self.released:
                return
            _rst(self.client)
            _quietly(self.client.shutdown, socket.SHUT_RDWR if hard else socket.SHUT_RD)
            if self.upstream is not None:
                _quietly(self.upstream.shutdown, socket.SHUT_RDWR)

    def _half_close(self, sock: socket.socket | None) -> None:
        with self.lock:
            if sock is not None and not self.released:
                _quietly(sock.shutdown, socket.SHUT_WR)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        # Called with self.lock held, so abort() then join() can never miss (or see unstarted) a thread.
        self.live += 1
        thread = threading.Thread(target=self._run, args=(target,), name=name, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _run(self, target: Callable[[], None]) -> None:
        try:
            target()
        except OSError:
            self.abort()
        finally:
            with self.lock:
                self.live -= 1
                last = self.live == 0
                if last:
                    self.released = True
            if last:
                self.client.close()
                if self.upstream is not None:
                    self.upstream.close()
                with self.proxy._lock:
                    self.proxy._conns.discard(self)

    def _pump_client(self) -> None:
        while True:
            data = self.client.recv(65536)
            if self.closed.is_set():
                return
            if not data:
                self._half_close(self.upstream)
                return
            if not self._feed(data):
                return

    def _feed(self, data: bytes) -> bool:
        self.buf += data
        while self.buf:
            if self.sticky is not None:
                chunk, self.buf = self.buf, b""
                return self._apply(chunk, self.sticky, new=False, done=False)
            if self.remaining:
                chunk, self.buf = self.buf[:self.remaining], self.buf[self.remaining:]
                self.remaining -= len(chunk)
                if not self._apply(chunk, self.request_rule, new=False, done=self.remaining == 0):
                    return False
                continue
            if self.raw or not _looks_like_http(self.buf):
                self.raw = True
                chunk, self.buf = self.buf, b""
                return self._apply(chunk, self.proxy._rule(None), new=True, done=True)
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                self.raw = len(self.buf) > _HEAD_LIMIT
                if not self.raw:
                    return True
                continue
            head, self.buf = self.buf[:end + 4], self.buf[end + 4:]
            self.request_rule = self.proxy._rule(head.split(b"\r\n", 1)[0].decode("latin-1"))
            length = _content_length(head)
            self.remaining = length or 0
            if not self._apply(head, self.request_rule, new=True, done=not self.remaining):
                return False
            if length is None and self.sticky is None:
                self.sticky = self.request_rule
        return True

    def _apply(self, chunk: bytes, rule: Rule, new: bool, done: bool) -> bool:
        mode = rule[0]
        if new:
            with self.lock:
                self.rule, self.answered = rule, 0
        if mode == FaultProxy.BLACKHOLE:
            self.sticky = rule
            return True
        if mode in (FaultProxy.RESET_ON_CONNECT, FaultProxy.REFUSE):
            self.abort()
            return False
        if mode == FaultProxy.HTTP_502:
            if done:
                self.client.sendall(_RESPONSE_502)
                self._half_close(self.client)
                self.sticky = (FaultProxy.BLACKHOLE, {})
            return True
        if not self._connect():
            return False
        self.last_forward = time.monotonic()  # before sending, so a quick answer never sees a stale time
        self.upstream.sendall(chunk)
        self.last_forward = time.monotonic()
        return True

    def _connect(self) -> bool:
        if self.upstream is not None:
            return True
        try:
            upstream = socket.create_connection(self.proxy.upstream, timeout=2.0)
        except OSError:
            self.abort()
            return False
        upstream.settimeout(None)
        _nodelay(upstream)
        with self.lock:
            if self.closed.is_set():
                upstream.close()
                return False
            self.upstream = upstream
            self._spawn(self._pump_upstream, "fault-proxy-upstream")
        return True

    def _pump_upstream(self) -> None:
        forwarding = (FaultProxy.PASS, FaultProxy.DELAY, FaultProxy.RESET_BEFORE_ANSWER, FaultProxy.RESET_MID_ANSWER)
        while True:
            data = self.upstream.recv(65536)
            with self.lock:
                (mode, params), closed = self.rule, self.closed.is_set()
            if closed:
                return
            if not data:
                if mode in forwarding:
                    self._half_close(self.client)
                return
            if mode == FaultProxy.DELAY:
                wait = self.last_forward + float(params["seconds"]) - time.monotonic()
                if wait > 0 and self.closed.wait(wait):
                    return
            elif mode == FaultProxy.RESET_BEFORE_ANSWER:
                self.abort()
                return
            elif mode == FaultProxy.RESET_MID_ANSWER:
                limit = int(params.get("bytes", 20))
                data = data[:max(limit - self.answered, 0)]
                self.answered += len(data)
                if data:
                    self.client.sendall(data)
                if self.answered >= limit:
                    self.abort()
                    return
                continue
            elif mode not in forwarding:
                continue  # blackholed or answered locally: the upstream's bytes go nowhere
            self.client.sendall(data)
