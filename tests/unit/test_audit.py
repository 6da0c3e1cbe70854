"""Audit events without sockets: the schema, the screening of values, the log line, the labels, bounded queues."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client import REGISTRY

from app import audit as audit_module
from app.audit import (
    FIELDS,
    REDACTED,
    SCHEMA,
    AuditEvents,
    RedisStreamSink,
    WebhookSink,
    event_from_log,
    make_event,
    redact,
    stream_fields,
)
from app.config import Settings
from app.logs import JsonFormatter, throttle_outage_logs

NOW = datetime(2025, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)


def fixed_clock() -> datetime:
    return NOW


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# Shaped like a Keycloak token (header.payload.signature); a marker, not a real credential.
JWT_LIKE = ".".join([b64(b'{"alg":"RS256","typ":"JWT","kid":"k1"}'), b64(b'{"sub":"MARKER-sub","sid":"s"}'),
                     b64(b"MARKER-signature" * 4)])


def dropped(sink: str, cause: str) -> float:
    return REGISTRY.get_sample_value("broker_audit_dropped_total", {"sink": sink, "cause": cause}) or 0.0


def emitted(event: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("broker_audit_events_total", {"event": event, "outcome": outcome}) or 0.0


class Recording:
    """A sink that keeps what it is sent; `block()` holds its thread inside send() until `release()`."""

    name = "test"
    batch = 1

    def __init__(self, fail: Exception | None = None):
        self.got: list[dict] = []
        self.fail = fail
        self.entered = threading.Event()
        self._open = threading.Event()
        self._open.set()
        self.closed = False

    def block(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def send(self, events):
        self.entered.set()
        assert self._open.wait(10)
        if self.fail is not None:
            raise self.fail
        self.got.extend(events)

    def close(self):
        self.closed = True


def test_an_event_has_the_schema_fields_and_nothing_else():
    """The whole event, with a fixed clock: ten fields in the schema's order, UTC milliseconds."""
    audit = AuditEvents(clock=fixed_clock)
    event = audit.emit("login", "refused", reason="invalid_grant", message="Invalid user credentials",
                       user="alice", session=None, client_ip="203.0.113.7", request_id="req-1")
    assert event == {
        "schema": "token-broker.audit/1",
        "time": "2025-05-01T12:00:00.123+00:00",
        "event": "login",
        "outcome": "refused",
        "reason": "invalid_grant",
        "message": "Invalid user credentials",
        "user": "alice",
        "session": None,
        "client_ip": "203.0.113.7",
        "request_id": "req-1",
    }
    assert tuple(event) == FIELDS and event["schema"] == SCHEMA


def test_every_field_but_event_and_outcome_defaults_to_null():
    event = AuditEvents(clock=fixed_clock).emit("logout", "ok")
    assert [name for name, value in event.items() if value is not None] == ["schema", "time", "event", "outcome"]


def test_time_is_utc_whatever_the_clock_zone():
    """An aware time in another zone is written in UTC; a naive one is taken as UTC."""
    east = datetime(2025, 5, 1, 14, 0, 0, 5000, tzinfo=timezone(timedelta(hours=2)))
    assert make_event("login", "ok", now=east)["time"] == "2025-05-01T12:00:00.005+00:00"
    assert make_event("login", "ok", now=datetime(2025, 5, 1, 12, 0))["time"] == "2025-05-01T12:00:00.000+00:00"


def test_an_unknown_field_is_a_type_error():
    """A field the schema does not have (a typo, or a token someone meant to log) is refused outright."""
    audit = AuditEvents(clock=fixed_clock)
    with pytest.raises(TypeError):
        audit.emit("login", "ok", usr="alice")
    with pytest.raises(TypeError):
        audit.emit("refresh", "ok", refresh_token="MARKER")
    with pytest.raises(TypeError):
        audit.emit("login", "ok", "alice")  # fields are keyword-only


def test_an_outcome_outside_the_three_is_a_value_error():
    audit = AuditEvents(clock=fixed_clock)
    for outcome in ("error", "OK", ""):
        with pytest.raises(ValueError):
            audit.emit("login", outcome)
    with pytest.raises(ValueError):
        audit.emit("", "ok")


def test_a_jwt_looking_value_is_redacted_in_every_field():
    """A token in any field, alone or inside a sentence, becomes [redacted]; the sentence around it stays."""
    audit = AuditEvents(clock=fixed_clock)
    event = audit.emit("refresh", "refused", reason=JWT_LIKE, message=f"Token {JWT_LIKE} is not active",
                       user=JWT_LIKE, session=JWT_LIKE, client_ip=JWT_LIKE, request_id=JWT_LIKE)
    assert event["message"] == f"Token {REDACTED} is not active"
    for name in ("reason", "user", "session", "client_ip", "request_id"):
        assert event[name] == REDACTED
    assert "MARKER" not in json.dumps(event) and b64(b'{"sub"') not in json.dumps(event)


def test_redaction_covers_unsigned_and_encrypted_shapes_and_spares_short_dotted_values():
    header, payload = b64(b'{"alg":"none","typ":"JWT"}'), b64(b'{"sub":"MARKER-sub-0123456789"}')
    assert redact(f"{header}.{payload}.") == REDACTED  # alg none: an empty signature
    assert redact(".".join([header, "a" * 40, "b" * 16, "c" * 60, "d" * 22])) == REDACTED  # JWE: five segments
    for harmless in ("203.0.113.7", "login.example.com", "alice.smith", "v1.2.3", "Session not active.",
                     "a" * 60, "3f2b1c9e-0d5a-4c61-9a0e-6a0c4b8e2f11"):
        assert redact(harmless) == harmless


def test_screening_a_long_value_takes_linear_time():
    """A username of 100,000 letters (or dotted words) is screened at once: no quadratic regex on the request path."""
    for value in ("a" * 100_000, "ab." * 33_000, ("a" * 60 + " ") * 1600):
        started = time.perf_counter()
        make_event("login", "refused", now=NOW, user=value, message=value)
        assert time.perf_counter() - started < 0.1


def test_values_are_bounded_and_of_simple_types():
    """A long value is cut (after redaction, so a cut token is still redacted); ints stay ints, others strings."""
    event = make_event("login", "ok", now=NOW, user="u" * 5000, message=("x " * 300) + JWT_LIKE, reason=42,
                       session=3.5)
    assert event["user"] == "u" * audit_module.MAX_VALUE_CHARS
    assert event["message"] == ("x " * 300)[:audit_module.MAX_VALUE_CHARS]
    assert (event["reason"], event["session"]) == (42, "3.5")
    cut_at_the_token = make_event("login", "ok", now=NOW, user="x " * 250 + JWT_LIKE)["user"]
    assert cut_at_the_token == ("x " * 250 + REDACTED)[:audit_module.MAX_VALUE_CHARS]
    assert "eyJ" not in cut_at_the_token
    assert redact("x" * 20 + JWT_LIKE) == REDACTED  # glued to other characters, the whole word goes


def test_the_log_line_carries_the_event(caplog):
    """One INFO record on app.audit; rendered by JsonFormatter, the line gives the event back whole."""
    caplog.set_level(logging.INFO, logger="app.audit")
    event = AuditEvents(clock=fixed_clock).emit("location_blocked", "refused", reason="location_blocked",
                                                message="This session cannot be refreshed from here",
                                                user="bob", session="sid-1", client_ip="198.51.100.2",
                                                request_id="req-2")
    records = [r for r in caplog.records if r.name == "app.audit"]
    assert len(records) == 1
    (record,) = records
    assert (record.levelno, record.getMessage()) == (logging.INFO, "audit location_blocked refused")
    line = json.loads(JsonFormatter().format(record))
    assert event_from_log(line) == event
    assert line["audit_message"] == "This session cannot be refreshed from here"
    assert (line["logger"], line["level"], line["message"], line["time"]) == (
        "app.audit", "INFO", "audit location_blocked refused", "2025-05-01T12:00:00.123+00:00")


def test_a_redis_stream_entry_is_all_strings():
    event = make_event("login", "ok", now=NOW, user="alice", reason=None)
    assert stream_fields(event) == {
        "schema": SCHEMA, "time": "2025-05-01T12:00:00.123+00:00", "event": "login", "outcome": "ok", "reason": "",
        "message": "", "user": "alice", "session": "", "client_ip": "", "request_id": "",
    }


def test_events_are_counted_by_event_and_outcome_and_unknown_names_as_other():
    audit = AuditEvents(clock=fixed_clock)
    before = (emitted("register", "ok"), emitted("other", "failed"), emitted("made_up_event", "failed"))
    audit.emit("register", "ok")
    audit.emit("made_up_event", "failed")
    audit.emit(f"attacker-{time.time()}", "failed")
    after = (emitted("register", "ok"), emitted("other", "failed"), emitted("made_up_event", "failed"))
    assert [a - b for a, b in zip(after, before)] == [1, 2, 0]


def test_a_sink_gets_every_event_in_order():
    sink = Recording()
    audit = AuditEvents([sink], queue_size=100, clock=fixed_clock)
    sent = [audit.emit("refresh", "ok", request_id=str(i)) for i in range(20)]
    assert audit.close(5)
    assert sink.got == sent
    assert sink.closed


def test_a_full_queue_drops_for_that_sink_and_counts():
    """The sink's thread holds one event, the queue three more; the rest are dropped and counted, not waited for."""
    sink = Recording()
    sink.block()
    audit = AuditEvents([sink], queue_size=3, clock=fixed_clock)
    before = dropped("test", "queue_full")
    audit.emit("login", "ok", request_id="0")
    assert sink.entered.wait(5)
    started = time.monotonic()
    for i in range(1, 11):
        audit.emit("login", "ok", request_id=str(i))
    assert time.monotonic() - started < 0.5
    assert dropped("test", "queue_full") - before == 7
    assert not audit.flush(0.05)  # still blocked
    sink.release()
    assert audit.close(5)
    assert [e["request_id"] for e in sink.got] == ["0", "1", "2", "3"]


def test_emit_does_not_wait_for_a_stuck_sink():
    """1000 events with the sink stuck: emit returns at once each time (a behaviour bound, not a benchmark)."""
    sink = Recording()
    sink.block()
    audit = AuditEvents([sink], queue_size=10, clock=fixed_clock)
    started = time.monotonic()
    for i in range(1000):
        audit.emit("refresh", "ok", request_id=str(i))
    assert time.monotonic() - started < 1.0
    sink.release()
    assert audit.close(5)


def test_a_failing_sink_counts_delivery_failed_and_logs_no_detail(caplog):
    """The sink's error is counted per event and named by type in a warning; its message (a URL, say) is not."""
    throttle_outage_logs()  # a fresh count, as a new app starts with: no earlier line holds this one back
    sink = Recording(fail=ConnectionError("https://hooks.example/MARKER-path-credential"))
    audit = AuditEvents([sink], queue_size=100, clock=fixed_clock)
    before = dropped("test", "delivery_failed")
    for _ in range(5):
        audit.emit("logout", "ok")
    assert audit.close(5)
    assert dropped("test", "delivery_failed") - before == 5
    warnings = [r.getMessage() for r in caplog.records if r.name == "app.audit.delivery"]
    assert warnings and set(warnings) == {"Audit events could not be delivered to the test sink (ConnectionError)"}
    assert "MARKER" not in caplog.text


def test_close_then_emit_starts_again():
    sink = Recording()
    audit = AuditEvents([sink], queue_size=10, clock=fixed_clock)
    audit.emit("login", "ok", request_id="a")
    assert audit.close(5)
    audit.emit("login", "ok", request_id="b")
    assert audit.close(5)
    assert [e["request_id"] for e in sink.got] == ["a", "b"]


def test_a_forked_child_starts_with_an_empty_queue(monkeypatch):
    """What the parent queued is the parent's to deliver: a child (another pid, simulated) does not wait for it
    and delivers its own events through a queue and thread of its own. (Here the parent's thread lives on in the
    same process; after a real fork it would not exist in the child.)"""
    sink = Recording()
    sink.block()
    audit = AuditEvents([sink], queue_size=10, clock=fixed_clock)
    audit.emit("login", "ok", request_id="parent-0")
    assert sink.entered.wait(5)
    audit.emit("login", "ok", request_id="parent-1")  # queued behind the blocked one
    real_pid = audit_module.os.getpid()
    monkeypatch.setattr(audit_module.os, "getpid", lambda: real_pid + 1)
    assert audit.flush(0.5)  # the child has queued nothing
    audit.emit("login", "ok", request_id="child-0")
    sink.release()
    assert audit.flush(5)
    monkeypatch.setattr(audit_module.os, "getpid", lambda: real_pid)
    assert "child-0" in [e["request_id"] for e in sink.got]
    monkeypatch.undo()
    audit.close(0.5)


def test_from_settings_builds_only_the_configured_sinks():
    """No optional sink by default; the stream and the webhook from their settings (nothing connects yet)."""
    assert AuditEvents.from_settings(Settings(client_secret="s")).sinks == ()
    settings = Settings(client_secret="s", redis_url="redis://127.0.0.1:1/0", redis_timeout=0.3,
                        audit_stream="audit", audit_stream_maxlen=500, audit_queue_size=50,
                        audit_webhook_url="https://hooks.example/audit")
    audit = AuditEvents.from_settings(settings, webhook_timeout=1.5)
    redis_sink, webhook = audit.sinks
    assert isinstance(redis_sink, RedisStreamSink) and isinstance(webhook, WebhookSink)
    assert (redis_sink.stream, redis_sink.maxlen, redis_sink.approximate) == ("audit", 500, True)
    options = redis_sink.client.connection_pool.connection_kwargs
    assert (options["socket_timeout"], options["socket_connect_timeout"]) == (0.3, 0.3)
    assert options["retry"].get_retries() == 0
    assert (webhook.url, webhook.timeout) == ("https://hooks.example/audit", 1.5)
    assert (webhook.session.verify, webhook.session.trust_env) == (True, False)
    adapter = webhook.session.get_adapter("https://hooks.example/audit")
    assert adapter.max_retries.total == 0
    assert audit._channels[0].size == 50
    assert audit.close(1)


def test_a_stream_without_redis_is_refused():
    with pytest.raises(ValueError, match="BROKER_REDIS_URL"):
        AuditEvents.from_settings(Settings(client_secret="s", audit_stream="audit"))
