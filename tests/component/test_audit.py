"""Audit events reaching real sinks: a real Redis Stream (trimmed by MAXLEN), a local webhook receiver, and
receivers that fail, are not there, or never answer: counted, never raised, never waited for."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
from prometheus_client import REGISTRY

from app.audit import SCHEMA, AuditEvents, RedisStreamSink, WebhookSink, stream_fields
from app.config import Settings
from app.logs import throttle_outage_logs

NOW = datetime(2025, 5, 1, 12, 0, 0, 123000, tzinfo=timezone.utc)


def fixed_clock() -> datetime:
    return NOW


@pytest.fixture(autouse=True)
def fresh_outage_filters():
    """Each test starts with fresh delivery-warning counts, as each app does (no earlier line holds one back)."""
    throttle_outage_logs()


def dropped(sink: str, cause: str) -> float:
    return REGISTRY.get_sample_value("broker_audit_dropped_total", {"sink": sink, "cause": cause}) or 0.0


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- Redis Stream ---------------------------------------------------------------------------------------------

@pytest.fixture
def redis_client(redis_url):
    """A client of the session's Redis, emptied before each test."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


def entries(client, stream: str) -> list[dict]:
    return [fields for _, fields in client.xrange(stream)]


def test_events_reach_the_redis_stream_as_strings(redis_url, redis_client):
    """Built from the settings as the broker builds it: each event one stream entry, every value a string."""
    settings = Settings(client_secret="s", redis_url=redis_url, audit_stream="audit:test", audit_stream_maxlen=1000)
    audit = AuditEvents.from_settings(settings)
    audit.clock = fixed_clock
    sent = [
        audit.emit("login", "ok", user="alice", session="sid-1", client_ip="203.0.113.7", request_id="r1"),
        audit.emit("refresh", "refused", reason="invalid_grant", message="Token is not active", session="sid-1",
                   client_ip="203.0.113.7", request_id="r2"),
        audit.emit("logout", "ok", session="sid-1", request_id="r3"),
    ]
    assert audit.close(5)
    assert entries(redis_client, "audit:test") == [
        {"schema": SCHEMA, "time": "2025-05-01T12:00:00.123+00:00", "event": "login", "outcome": "ok", "reason": "",
         "message": "", "user": "alice", "session": "sid-1", "client_ip": "203.0.113.7", "request_id": "r1"},
        {"schema": SCHEMA, "time": "2025-05-01T12:00:00.123+00:00", "event": "refresh", "outcome": "refused",
         "reason": "invalid_grant", "message": "Token is not active", "user": "", "session": "sid-1",
         "client_ip": "203.0.113.7", "request_id": "r2"},
        {"schema": SCHEMA, "time": "2025-05-01T12:00:00.123+00:00", "event": "logout", "outcome": "ok", "reason": "",
         "message": "", "user": "", "session": "sid-1", "client_ip": "", "request_id": "r3"},
    ]
    assert entries(redis_client, "audit:test") == [stream_fields(e) for e in sent]


def test_exact_maxlen_keeps_exactly_the_newest(redis_url, redis_client):
    sink = RedisStreamSink.from_url(redis_url, "audit:exact", maxlen=10, timeout=1.0, approximate=False)
    audit = AuditEvents([sink], queue_size=1000, clock=fixed_clock)
    for i in range(250):
        audit.emit("refresh", "ok", request_id=str(i))
    assert audit.close(5)
    assert [e["request_id"] for e in entries(redis_client, "audit:exact")] == [str(i) for i in range(240, 250)]


def test_approximate_maxlen_bounds_the_stream(redis_url, redis_client):
    """MAXLEN ~ (the default): Redis trims whole nodes, so the stream keeps at least maxlen and not much more.

    With Redis's default 100 entries per node, 5000 events into a stream of about 100 leave fewer than 300."""
    sink = RedisStreamSink.from_url(redis_url, "audit:approx", maxlen=100, timeout=1.0)
    audit = AuditEvents([sink], queue_size=10_000, clock=fixed_clock)
    for i in range(5000):
        audit.emit("refresh", "ok", request_id=str(i))
    assert audit.close(10)
    length = redis_client.xlen("audit:approx")
    assert 100 <= length < 300
    newest = redis_client.xrevrange("audit:approx", count=1)[0][1]
    assert newest["request_id"] == "4999"


def test_a_redis_that_is_not_there_counts_delivery_failed(caplog):
    """A refused connection: the batch is counted as delivery_failed, emit neither raises nor waits."""
    sink = RedisStreamSink.from_url(f"redis://127.0.0.1:{closed_port()}/0", "audit", maxlen=100, timeout=0.25)
    audit = AuditEvents([sink], queue_size=100, clock=fixed_clock)
    before = dropped("redis", "delivery_failed")
    for _ in range(3):
        audit.emit("login", "failed", reason="upstream_unavailable")
    assert audit.close(5)
    assert dropped("redis", "delivery_failed") - before == 3
    assert any(r.name == "app.audit.delivery" and "redis sink (ConnectionError)" in r.getMessage()
               for r in caplog.records)


# --- Webhook --------------------------------------------------------------------------------------------------

class Receiver:
    """A local HTTP receiver on 127.0.0.1: records each POST (path, headers, body), answers `status`."""

    def __init__(self, status: int = 204, headers: dict | None = None):
        self.status = status
        self.headers = headers or {}
        self.requests: list[tuple[str, dict, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.requests.append((self.path, dict(self.headers), body))
                self.send_response(receiver.status)
                for name, value in receiver.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


def test_events_reach_the_webhook_as_json(receiver):
    """Built from the settings: one POST per event, the event as the whole JSON body."""
    audit = AuditEvents.from_settings(Settings(client_secret="s", audit_webhook_url=receiver.url))
    audit.clock = fixed_clock
    audit.emit("register", "ok", user="carol", session="sid-9", client_ip="198.51.100.4", request_id="r9")
    audit.emit("rate_limited", "refused", reason="rate_limited", message="Too many login attempts",
               user="carol", client_ip="198.51.100.4", request_id="r10")
    assert audit.close(5)
    assert [(path, headers["Content-Type"], json.loads(body)) for path, headers, body in receiver.requests] == [
        ("/hook", "application/json",
         {"schema": SCHEMA, "time": "2025-05-01T12:00:00.123+00:00", "event": "register", "outcome": "ok",
          "reason": None, "message": None, "user": "carol", "session": "sid-9", "client_ip": "198.51.100.4",
          "request_id": "r9"}),
        ("/hook", "application/json",
         {"schema": SCHEMA, "time": "2025-05-01T12:00:00.123+00:00", "event": "rate_limited", "outcome": "refused",
          "reason": "rate_limited", "message": "Too many login attempts", "user": "carol", "session": None,
          "client_ip": "198.51.100.4", "request_id": "r10"}),
    ]


def test_the_webhook_keeps_no_cookies():
    """A receiver's Set-Cookie is not sent back with the next event."""
    receiver = Receiver(headers={"Set-Cookie": "tracker=MARKER; Path=/"})
    try:
        audit = AuditEvents([WebhookSink(receiver.url)], queue_size=10, clock=fixed_clock)
        audit.emit("login", "ok")
        audit.emit("login", "ok")
        assert audit.close(5)
        assert len(receiver.requests) == 2
        assert all("Cookie" not in headers for _, headers, _ in receiver.requests)
    finally:
        receiver.stop()


@pytest.mark.parametrize("status", [500, 404, 302])
def test_a_webhook_answering_other_than_2xx_counts_delivery_failed(status):
    """No retry and no redirect followed: each event is POSTed once, and counted as failed."""
    receiver = Receiver(status=status, headers={"Location": "/elsewhere"} if status == 302 else {})
    try:
        audit = AuditEvents([WebhookSink(receiver.url)], queue_size=10, clock=fixed_clock)
        before = (dropped("webhook", "delivery_failed"), dropped("webhook", "queue_full"))
        for _ in range(3):
            audit.emit("logout", "ok")
        assert audit.close(5)
        after = (dropped("webhook", "delivery_failed"), dropped("webhook", "queue_full"))
        assert (after[0] - before[0], after[1] - before[1]) == (3, 0)
        assert [path for path, _, _ in receiver.requests] == ["/hook"] * 3
    finally:
        receiver.stop()


def test_an_unreachable_webhook_counts_delivery_failed_and_logs_no_url(caplog):
    url = f"http://127.0.0.1:{closed_port()}/MARKER-path-credential"
    audit = AuditEvents([WebhookSink(url, timeout=1.0)], queue_size=10, clock=fixed_clock)
    before = dropped("webhook", "delivery_failed")
    for _ in range(4):
        audit.emit("login", "ok")  # never raises
    assert audit.close(5)
    assert dropped("webhook", "delivery_failed") - before == 4
    assert "webhook sink (ConnectionError)" in caplog.text
    assert "MARKER" not in caplog.text


def test_delivery_warnings_are_throttled_to_one_per_interval(caplog):
    """With the broker's outage filter (create_app installs it), a dead receiver logs once, not once per event."""
    throttle_outage_logs(interval=60)
    try:
        url = f"http://127.0.0.1:{closed_port()}/hook"
        audit = AuditEvents([WebhookSink(url, timeout=1.0)], queue_size=100, clock=fixed_clock)
        for _ in range(20):
            audit.emit("login", "ok")
        assert audit.close(5)
        assert [r.getMessage() for r in caplog.records if r.name == "app.audit.delivery"] == [
            "Audit events could not be delivered to the webhook sink (ConnectionError)"]
    finally:
        throttle_outage_logs()


def test_emit_returns_at_once_with_a_blackholed_webhook(caplog):
    """A receiver that accepts connections and never answers: 1000 emits still take well under a second; what does
    not fit in the queue is counted as queue_full, and the stuck POST as delivery_failed once the receiver goes."""
    caplog.set_level(logging.INFO, logger="app.audit")  # the log line is written for every event, synchronously
    # fresh_outage_filters installed the filter create_app does: one queue-full warning per interval, not 900
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(64)  # the kernel completes the handshake; nothing ever reads or answers
    url = f"http://127.0.0.1:{blackhole.getsockname()[1]}/hook"
    audit = AuditEvents([WebhookSink(url, timeout=5.0)], queue_size=100, clock=fixed_clock)
    before = (dropped("webhook", "queue_full"), dropped("webhook", "delivery_failed"))
    try:
        started = time.monotonic()
        for i in range(1000):
            audit.emit("refresh", "ok", request_id=str(i))
        elapsed = time.monotonic() - started
        assert elapsed < 0.5, f"1000 emits took {elapsed:.3f}s"
        assert len([r for r in caplog.records if r.name == "app.audit"]) == 1000
        assert not audit.flush(0.2)  # the first POST is still waiting for its answer
    finally:
        blackhole.close()  # the waiting POST is reset; the queued ones are refused
    assert audit.close(10)
    assert len([r for r in caplog.records if r.name == "app.audit.delivery"]) <= 2  # one per message and interval
    full, failed = dropped("webhook", "queue_full") - before[0], dropped("webhook", "delivery_failed") - before[1]
    assert full + failed == 1000
    assert 1000 - 100 - 1 <= full <= 1000 - 100  # the queue held 100, the thread one (or none yet)
