"""The wire to Keycloak: HTTP/1.1 over pooled keep-alive connections, with h11 doing the protocol.

`Wire.request()` sends one request and returns its `Answer`, or raises one of three failures that the refresh
path must tell apart (a refresh token sent to Keycloak may have been spent):

- `NotConnected`: no connection could be made (refused, connect timeout, DNS, the TLS handshake); nothing
  reached Keycloak.
- `NoAnswer`: the request was sent and no answer began within the read timeout.
- `AnswerBroken`: the request was sent, then the connection broke, the answer stopped in the middle, or it
  was not HTTP. Keycloak may have acted on it.

h11 (python-hyper's sans-I/O HTTP/1.1 library) does the framing: the request head and body, the status line
and headers, Content-Length and chunked bodies, and whether the connection may carry another exchange.
This module only moves bytes and keeps the pool: one list of idle connections per origin, last used first.
A connection goes back to the pool only when h11 says both sides finished cleanly (Keycloak did not say
`Connection: close`), and is reused only when a zero-timeout check shows Keycloak has not closed it since;
anything else is closed. Nothing is ever retried or redirected, no cookie is kept, no proxy or netrc is read
from the environment, and TLS is always verified (KEYCLOAK_CA_BUNDLE, else certifi's CA bundle).

Why not requests (which the broker used before): it cost 1.1-1.4 ms of CPU per call on the benchmark machine
against 0.3-0.4 ms for this, and about 2 ms of latency per refresh (docs/benchmarks.md, "The HTTP client").
Everything here runs under gevent's patched socket, ssl and select, so waits yield to other requests.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import sys
import threading
import time
import weakref
from typing import Any, Callable, Iterable
from urllib.parse import quote, urlsplit

import h11

# An answer larger than this is not Keycloak's (tokens, keys and users are kilobytes): refused, not buffered.
MAX_ANSWER_BYTES = 1 << 20
_RECV_BYTES = 65536
_DEFAULT_PORTS = {"http": 80, "https": 443}
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


class WireError(Exception):
    """A request that brought no usable answer; `str()` says why in words safe for a log line."""


class NotConnected(WireError):
    """No connection to Keycloak could be made: nothing was sent. `tls` when the TLS handshake failed."""

    def __init__(self, reason: str, *, tls: bool = False):
        super().__init__(reason)
        self.tls = tls


class NoAnswer(WireError):
    """The request was sent and no answer began within the read timeout."""


class AnswerBroken(WireError):
    """The request was sent, then the connection broke or the answer was incomplete or not HTTP."""


class AnswerTooLarge(WireError):
    """The answer's body exceeded MAX_ANSWER_BYTES."""


class Headers:
    """An answer's headers, looked up without regard to case (the last of repeated headers wins)."""

    __slots__ = ("_values",)

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()):
        self._values = {name.lower(): value for name, value in pairs}

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return self._values[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values

    def __repr__(self) -> str:
        return f"Headers({sorted(self._values)})"  # names only: a header value may be a secret


class Answer:
    """Keycloak's answer: status, headers and the whole body."""

    __slots__ = ("status_code", "headers", "content")

    def __init__(self, status_code: int, headers: Headers, content: bytes):
        self.status_code = status_code
        self.headers = headers
        self.content = content

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return json.loads(self.content)


class _Connection:
    """One socket and the h11 state of the exchanges on it."""

    __slots__ = ("sock", "protocol")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.protocol = h11.Connection(h11.CLIENT)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def still_open(self) -> bool:
        """Whether this idle connection can carry a request: Keycloak has not closed it nor sent anything."""
        sock = self.sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return False
        try:
            poller = _zero_timeout_poll()
            poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
            return not poller.poll(0)  # readable while idle: end of stream, or bytes nobody asked for
        except (OSError, ValueError):
            return False


def _zero_timeout_poll() -> Any:
    """The operating system's poll() (not gevent's, whose zero timeout may return before it looked): a poll that
    does not wait cannot hold up the event loop, and poll, unlike select, takes descriptors above 1024."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("select"):
        return monkey.get_original("select", "poll")()
    return select.poll()


Origin = tuple[str, str, int]


class Wire:
    """Pooled HTTP/1.1 to any number of origins (in practice Keycloak's one), safe to share between threads."""

    def __init__(self, *, verify: bool | str = True, pool_size: int = 32, user_agent: str = "token-broker",
                 on_connect: Callable[[], None] | None = None):
        self._pool_size = pool_size
        self._user_agent = user_agent
        self._on_connect = on_connect
        self._idle: dict[Origin, list[_Connection]] = {}
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        self._verify = verify
        weakref.finalize(self, _close_all, self._idle)  # a wire dropped unclosed closes its idle sockets

    def request(self, method: str, url: str, *, headers: Iterable[tuple[str, str]] = (), body: bytes = b"",
                timeout: tuple[float, float]) -> Answer:
        """Send one request (never retried) and return the whole answer; raise a WireError when there is none.

        `timeout` is (connect, read): the connection is made within the first (a pooled one is reused at once), and
        the exchange, from sending the request to the end of its answer, takes at most the second.
        """
        origin, host, target = _parse(url)
        connection = self._take(origin) or self._connect(origin, timeout[0])
        try:
            answer, reusable = self._exchange(connection, method, host, target, headers, body, timeout[1])
        except BaseException:
            connection.close()
            raise
        if reusable:
            self._give_back(origin, connection)
        else:
            connection.close()
        return answer

    def close(self) -> None:
        """Close every idle connection (a connection in use closes when its request ends)."""
        with self._lock:
            _close_all(self._idle)

    def _take(self, origin: Origin) -> _Connection | None:
        while True:
            with self._lock:
                idle = self._idle.get(origin)
                if not idle:
                    return None
                connection = idle.pop()
            if connection.still_open():
                return connection
            connection.close()

    def _give_back(self, origin: Origin, connection: _Connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if len(idle) < self._pool_size:
                idle.append(connection)
                return
        connection.close()

    def _connect(self, origin: Origin, timeout: float) -> _Connection:
        """A new connection (TCP, then TLS for https), all of it within `timeout` seconds, whatever the number of
        addresses the name resolves to: the refresh's lease counts on it (app.broker.build_refresher)."""
        scheme, host, port = origin
        deadline = time.monotonic() + timeout
        try:
            sock = _connect_by(deadline, host, port)
        except UnicodeError:
            raise NotConnected("the host name cannot be encoded") from None
        except OSError as exc:
            raise NotConnected(_why(exc)) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a request is one write: send it now
            if scheme == "https":
                sock.settimeout(_left(deadline))
                sock = self._tls_context().wrap_socket(sock, server_hostname=host)
        except ssl.SSLError as exc:
            sock.close()
            raise NotConnected(f"TLS: {exc.reason or type(exc).__name__}", tls=True) from None
        except OSError as exc:
            sock.close()
            raise NotConnected(_why(exc)) from None
        if self._on_connect is not None:
            self._on_connect()
        return _Connection(sock)

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            # KEYCLOAK_CA_BUNDLE, else certifi's bundle (what requests verified against before): the same CAs
            # whatever the host's store or SSL_CERT_FILE says.
            import certifi

            self._tls = ssl.create_default_context(cafile=self._verify if isinstance(self._verify, str) else
                                                   certifi.where())
        return self._tls

    def _exchange(self, connection: _Connection, method: str, host: str, target: str,
                  headers: Iterable[tuple[str, str]], body: bytes, read_timeout: float) -> tuple[Answer, bool]:
        protocol, sock = connection.protocol, connection.sock
        head = [("Host", host), ("User-Agent", self._user_agent), *headers]
        if body or method not in ("GET", "HEAD", "DELETE"):
            head.append(("Content-Length", str(len(body))))
        try:
            data = protocol.send(h11.Request(method=method, target=target, headers=head))
            if body:
                data += protocol.send(h11.Data(data=body))
            data += protocol.send(h11.EndOfMessage())
        except (h11.LocalProtocolError, UnicodeError):
            # Nothing was written yet. h11's message would quote the offending header, perhaps a bearer token.
            raise NotConnected("the request has a header or target that HTTP cannot carry") from None
        # `read_timeout` bounds the whole exchange, not each wait: an answer trickling in a byte at a time must not
        # outlast the refresh's lease either.
        deadline = time.monotonic() + read_timeout
        try:
            sock.settimeout(_left(deadline))
            sock.sendall(data)  # head and body in one write: Keycloak reads the whole request at once
        except OSError as exc:
            raise AnswerBroken(f"while sending: {_why(exc)}") from None
        status: int | None = None
        answer_headers = Headers()
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                event = protocol.next_event()
            except h11.RemoteProtocolError as exc:
                raise AnswerBroken(f"not a usable HTTP answer: {exc}") from None
            if event is h11.NEED_DATA:
                try:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise socket.timeout()
                    sock.settimeout(left)
                    protocol.receive_data(sock.recv(_RECV_BYTES))
                except socket.timeout:
                    if status is None:
                        raise NoAnswer(f"no answer within {read_timeout:g} s") from None
                    raise AnswerBroken(f"the answer was not complete within {read_timeout:g} s") from None
                except OSError as exc:
                    raise AnswerBroken(_why(exc)) from None
            elif isinstance(event, h11.Response):
                status = event.status_code
                answer_headers = Headers((n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers)
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_ANSWER_BYTES:
                    raise AnswerTooLarge(f"an answer of more than {MAX_ANSWER_BYTES} bytes") from None
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise AnswerBroken("the connection closed before the answer") from None
            # an InformationalResponse (1xx) is followed by the real answer: read on
        # Reusable only after a clean exchange with nothing left over: bytes after the answer (a second answer, say)
        # would otherwise be read as the answer to the next request on this connection, perhaps another user's.
        reusable = (protocol.our_state is h11.DONE and protocol.their_state is h11.DONE
                    and not protocol.trailing_data[0])
        if reusable:
            protocol.start_next_cycle()
        return Answer(status or 0, answer_headers, b"".join(chunks)), reusable


def _close_all(idle: dict[Origin, list[_Connection]]) -> None:
    for connections in idle.values():
        while connections:
            connections.pop().close()


def _parse(url: str) -> tuple[Origin, str, str]:
    """(origin, Host header, request target) of an http(s) URL; NotConnected for anything else."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port if parts.port is not None else _DEFAULT_PORTS.get(scheme)
    except ValueError:
        port = None
    if scheme not in _DEFAULT_PORTS or not parts.hostname or port is None:
        raise NotConnected("not an http(s) URL with a host")
    host = parts.hostname
    header = parts.netloc.rpartition("@")[2]  # never send userinfo
    # Percent-encoded as requests did (a realm named "société"); what is encoded already stays as it is.
    target = quote(parts.path or "/", safe=_PATH_SAFE) + (f"?{quote(parts.query, safe=_QUERY_SAFE)}" if parts.query else "")
    return (scheme, host, port), header, target


def _connect_by(deadline: float, host: str, port: int) -> socket.socket:
    """socket.create_connection with one deadline for all the addresses `host` resolves to, tried in turn."""
    failure: OSError = socket.timeout()
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_left(deadline))
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            failure = exc
            if time.monotonic() >= deadline:
                break
    raise failure


def _left(deadline: float) -> float:
    """Seconds until `deadline`; a socket timeout of zero would mean non-blocking, so never less than 1 ms."""
    return max(0.001, deadline - time.monotonic())


def _why(exc: OSError) -> str:
    """An OSError in words without addresses or data: the kind, and the system's reason when there is one."""
    if isinstance(exc, socket.timeout):
        return "timed out"
    return f"{type(exc).__name__}: {exc.strerror}" if exc.strerror else type(exc).__name__
