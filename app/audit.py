"""Audit events: one structured, versioned event per security-relevant action, to the log and optional sinks.

The schema
----------
`SCHEMA` = "token-broker.audit/1". An event is a flat JSON object of strings, integers and nulls, always
with these ten fields, in this order:

=============  ===========================================================================================
`schema`       "token-broker.audit/1"; a change that removes or redefines a field gets a new version
`time`         when the event was emitted: UTC, ISO 8601 with milliseconds ("2025-05-01T12:00:00.123+00:00")
`event`        what happened: one of `EVENTS` (login, refresh, logout, register, account_setup_required,
               location_blocked, rate_limited, reuse_detected, backchannel_logout); another name is accepted and passed on as
               it is, but counted as "other" in the metrics
`outcome`      "ok" (done), "refused" (the client was told no: wrong password, spent token, a limit) or
               "failed" (the broker could not do it: Keycloak or Redis out)
`reason`       the broker's error code (docs/errors.md: invalid_grant, rate_limited, ...) or null
`message`      the broker's one-sentence message to the client, or null
`user`         the username (as typed, for a login) or the subject (`sub`), or null
`session`      Keycloak's session id (`sid`), or null
`client_ip`    the client's address as the broker sees it (through BROKER_TRUSTED_PROXY_HOPS), or null
`request_id`   the request's X-Request-ID, or null
=============  ===========================================================================================

Never a secret: `AuditEvents.emit` takes only these fields, by name (a misspelt or extra one is a
TypeError, so a test catches it), and no field is meant to hold a token, password or client secret. As
defence in depth every value is screened: anything that looks like a JWT (three or more base64url
segments joined by dots, over 40 characters: access, refresh and ID tokens all are) is replaced by
"[redacted]"; then each string is cut to `MAX_VALUE_CHARS`. (A long dotted host name can be redacted too;
a password typed into the username field cannot be recognised.)

The sinks
---------
1. **The JSON log, always**: logger "app.audit", one INFO line per event, written synchronously by `emit`
   (app/logs.py's JsonFormatter). The line carries the event's fields at its top level, except `message`,
   which a log line already has: the line's `message` is "audit <event> <outcome>", and the event's message
   is `audit_message`. `event_from_log()` turns a parsed line back into the event.
2. **A Redis Stream**, with BROKER_AUDIT_REDIS_STREAM (and BROKER_REDIS_URL): `XADD <stream> MAXLEN ~
   <BROKER_AUDIT_STREAM_MAXLEN> * field value ...`, every value a string (null as ""). Up to 100 queued
   events go in one pipelined round trip. Redis trims whole nodes, so the stream holds at least the
   maximum length and a little more. Its own client: BROKER_REDIS_TIMEOUT per connect and per command,
   no redis-py retries.
3. **A webhook**, with BROKER_AUDIT_WEBHOOK_URL: one `POST` per event, the event as the JSON body
   (`Content-Type: application/json`). Only a 2xx answer counts as delivered; redirects are not followed;
   `WEBHOOK_TIMEOUT` seconds to connect and between bytes of the answer; TLS verified (requests' CA
   bundle: no proxy, netrc or CA variables from the environment); no cookies kept; no retries. User and
   password in the URL go as Basic authentication.

The guarantees
--------------
- **A request is never slowed or failed by a sink**: `emit` writes the log line and puts the event on each
  optional sink's queue without waiting. Each sink has one background thread (under gunicorn's gevent
  worker, a greenlet) that delivers from its queue.
- **Bounded memory**: each queue holds at most BROKER_AUDIT_QUEUE_SIZE events (of at most ten values of
  `MAX_VALUE_CHARS` characters each). When a queue is full the event is dropped for that sink (the log
  line is written all the same) and counted: `broker_audit_dropped_total{sink, cause="queue_full"}`.
- **At most once, no retry**: an event that a sink fails to take (Redis error or timeout; a webhook
  error, timeout or non-2xx answer) is counted as `broker_audit_dropped_total{sink,
  cause="delivery_failed"}` and not tried again: a retry could duplicate what a receiver got but did not
  acknowledge, and would hold up the events behind it. For a pipelined Redis batch, every event of a
  failed batch is counted, though Redis may have taken some of them. The log is the complete record; the
  stream and the webhook are feeds. A warning names the sink and the cause (never the URL, which may hold
  a credential), through logger "app.audit.delivery", one line per interval (app/logs.py's
  OUTAGE_LOGGERS).
- **Counted**: every emitted event, `broker_audit_events_total{event, outcome}`.
- `flush(timeout)` waits until every queued event was delivered or given up on; `close(timeout)` does that
  and stops the threads (for gunicorn's worker_exit, and tests). An `emit` after `close` starts them again.
- A forked child (gunicorn's workers, when the app is loaded before the fork) starts with empty queues and
  threads of its own, so no event is delivered twice.

`emit` raises only for a programming error (an unknown field: TypeError; an outcome other than ok, refused
or failed: ValueError); it never raises or waits for a sink.

The standard library, redis and requests: no Flask (app/*.py is the framework-free core).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from http.cookiejar import DefaultCookiePolicy
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol

from app.config import Settings
from app.metrics import AUDIT_DROPPED, AUDIT_EVENTS

if TYPE_CHECKING:
    import requests

# redis and requests are imported by the sinks that use them (off by default): 13 MiB of a worker's memory
# that a broker without BROKER_AUDIT_REDIS_URL or BROKER_AUDIT_WEBHOOK_URL does not need (docs/benchmarks.md, P6).

SCHEMA = "token-broker.audit/1"

# The events the broker emits (metric labels: any other name is counted as "other").
EVENTS = frozenset({
    "login", "refresh", "logout", "register", "account_setup_required", "location_blocked", "rate_limited",
    "reuse_detected", "backchannel_logout",
})
OUTCOMES = frozenset({"ok", "refused", "failed"})
# Every event has exactly these fields, in this order.
FIELDS = ("schema", "time", "event", "outcome", "reason", "message", "user", "session", "client_ip", "request_id")
# The log line has a `message` of its own: the event's goes as this field.
LOG_MESSAGE_FIELD = "audit_message"

REDACTED = "[redacted]"
MAX_VALUE_CHARS = 512
JWT_MIN_CHARS = 41  # "over 40 characters": the shortest real token is far longer, a host name rarely is
# A match starts only where a run of base64url characters starts (the lookbehind): linear time, where without it
# a long run with no dot costs quadratic time (20,000 characters: 0.36 s).
_JWT_LIKE = re.compile(r"(?<![A-Za-z0-9_=-])[A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]+(?:\.[A-Za-z0-9_=-]*)+")

WEBHOOK_TIMEOUT = 2.0  # seconds to connect, and between bytes of the answer
REDIS_BATCH = 100  # queued events sent to Redis in one pipelined round trip
USER_AGENT = "token-broker"

log = logging.getLogger("app.audit")
delivery_log = logging.getLogger("app.audit.delivery")

Value = str | int | None


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def redact(text: str) -> str:
    """`text` with everything that looks like a JWT (base64url segments with two or more dots, > 40 chars) redacted."""
    return _JWT_LIKE.sub(lambda m: REDACTED if len(m.group()) >= JWT_MIN_CHARS else m.group(), text)


def _clean(value: Any) -> Value:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return redact(str(value))[:MAX_VALUE_CHARS]


def format_time(moment: datetime) -> str:
    """UTC, ISO 8601 with milliseconds, as app/logs.py writes a log line's time (a naive datetime is taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def make_event(event: str, outcome: str, *, now: datetime, reason: str | None = None, message: str | None = None,
               user: str | None = None, session: str | None = None, client_ip: str | None = None,
               request_id: str | None = None) -> dict[str, Value]:
    """One event of the schema, its values screened (see the module's docstring); ValueError for a bad outcome."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(sorted(OUTCOMES))}, got {outcome!r}")
    if not isinstance(event, str) or not event:
        raise ValueError(f"event must be a non-empty string, got {event!r}")
    return {
        "schema": SCHEMA,
        "time": format_time(now),
        "event": _clean(event),
        "outcome": outcome,
        "reason": _clean(reason),
        "message": _clean(message),
        "user": _clean(user),
        "session": _clean(session),
        "client_ip": _clean(client_ip),
        "request_id": _clean(request_id),
    }


def event_label(event: str) -> str:
    """The event's name as a metric label: one of EVENTS, or "other" (so the series stay a fixed set)."""
    return event if event in EVENTS else "other"


def log_fields(event: Mapping[str, Value]) -> dict[str, Value]:
    """The `extra=` of the event's log line: its fields, with `message` as `audit_message`."""
    return {(LOG_MESSAGE_FIELD if name == "message" else name): value for name, value in event.items()}


def event_from_log(entry: Mapping[str, Any]) -> dict[str, Value]:
    """The event a parsed "app.audit" JSON log line carries (the inverse of the log sink)."""
    return {name: entry.get(LOG_MESSAGE_FIELD if name == "message" else name) for name in FIELDS}


def stream_fields(event: Mapping[str, Value]) -> dict[str, str]:
    """The event as a Redis Stream entry: every value a string, null as ""."""
    return {name: "" if value is None else str(value) for name, value in event.items()}


class Sink(Protocol):
    """Where a background thread delivers events. `send` raises when the events were not (all) taken."""

    name: str  # the metric label: "redis" or "webhook"
    batch: int  # at most this many events per send()

    def send(self, events: list[dict[str, Value]]) -> None: ...

    def close(self) -> None: ...


class DeliveryFailed(Exception):
    """A sink answered, but not with a success (the message is safe to log: no URL, no body)."""


@dataclass
class RedisStreamSink:
    """XADD to one stream, trimmed to about `maxlen` entries (exactly, with approximate=False)."""

    client: Any  # a redis.Redis
    stream: str
    maxlen: int
    approximate: bool = True
    name: str = "redis"
    batch: int = REDIS_BATCH

    @classmethod
    def from_url(cls, url: str, stream: str, *, maxlen: int, timeout: float, approximate: bool = True
                 ) -> "RedisStreamSink":
        """A sink with its own client of `url`: `timeout` seconds per connect and per command, no retries."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry as RedisRetry

        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                      retry=RedisRetry(NoBackoff(), 0), health_check_interval=0)
        return cls(client, stream, maxlen=maxlen, approximate=approximate)

    def send(self, events: list[dict[str, Value]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for event in events:
            pipe.xadd(self.stream, stream_fields(event), maxlen=self.maxlen, approximate=self.approximate)
        pipe.execute()

    def close(self) -> None:
        self.client.close()


class _NoCookies(DefaultCookiePolicy):
    """A receiver's cookies are not kept: every POST stands alone."""

    def set_ok(self, cookie, request) -> bool:  # noqa: ANN001 - cookiejar's signature
        return False


def webhook_session(verify: bool | str = True) -> requests.Session:
    """A session that never retries or follows a redirect, keeps no cookies, verifies TLS, ignores the environment."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    no_retries = Retry(total=0, connect=0, read=False, redirect=0, status=0, other=0, raise_on_status=False)
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=no_retries)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.cookies.set_policy(_NoCookies())
    session.headers["User-Agent"] = USER_AGENT
    session.verify = verify
    session.trust_env = False  # no proxy, netrc or CA bundle from the process environment
    return session


class WebhookSink:
    """One POST per event to `url`; anything but a 2xx answer is a failed delivery."""

    name = "webhook"
    batch = 1

    def __init__(self, url: str, *, timeout: float = WEBHOOK_TIMEOUT, session: requests.Session | None = None):
        self.url = url
        self.timeout = timeout
        self.session = session or webhook_session()

    def send(self, events: list[dict[str, Value]]) -> None:
        for event in events:
            body = json.dumps(event, separators=(",", ":")).encode()
            with self.session.post(self.url, data=body, headers={"Content-Type": "application/json"},
                                   timeout=self.timeout, allow_redirects=False) as response:
                status = response.status_code
            if not 200 <= status < 300:
                raise DeliveryFailed(f"HTTP {status}")

    def close(self) -> None:
        self.session.close()


_STOP = object()


def _cause(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, DeliveryFailed) else type(exc).__name__


class _Lane:
    """A queue, the count of its events not yet settled, and the thread that delivers them. A forked child gets a
    new lane: the parent's queued events, and its thread, are the parent's."""

    def __init__(self, size: int):
        self.pid = os.getpid()
        self.queue: queue.Queue = queue.Queue(maxsize=size)
        # Queued or being sent. Counted here, not with Queue.join(): under gevent, queue.Queue is gevent's.
        self.pending = 0
        self.done = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stop = threading.Event()

    def settle(self, change: int) -> None:
        with self.done:
            self.pending += change
            if self.pending <= 0:
                self.done.notify_all()

    def wait(self, deadline: float) -> bool:
        with self.done:
            while self.pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.done.wait(left)
        return True


class _Channel:
    """One sink behind a bounded queue and one background thread (started on first use, again after a fork)."""

    def __init__(self, sink: Sink, size: int):
        self.sink = sink
        self.size = size
        self._lock = threading.Lock()
        self._lane = _Lane(size)
        # Format strings per sink: the outage filter passes each message once per interval.
        self._full_message = f"Audit queue of the {sink.name} sink is full; events are dropped for it"
        self._failed_message = f"Audit events could not be delivered to the {sink.name} sink (%s)"
        for cause in ("queue_full", "delivery_failed"):
            AUDIT_DROPPED.labels(sink.name, cause)  # the series exist (at 0) before the first drop

    def offer(self, event: dict[str, Value]) -> None:
        try:
            lane = self._running()
        except Exception as exc:  # a thread that cannot start: drop, never fail the request
            AUDIT_DROPPED.labels(self.sink.name, "queue_full").inc()
            delivery_log.warning(self._failed_message, type(exc).__name__)
            return
        lane.settle(+1)
        try:
            lane.queue.put_nowait(event)
        except queue.Full:
            lane.settle(-1)
            AUDIT_DROPPED.labels(self.sink.name, "queue_full").inc()
            delivery_log.warning(self._full_message)

    def _running(self) -> _Lane:
        """This process's lane, with a live thread behind it."""
        with self._lock:
            lane = self._lane
            if lane.pid != os.getpid():
                lane = self._lane = _Lane(self.size)
            if lane.thread is None or not lane.thread.is_alive() or lane.stop.is_set():
                lane.stop = threading.Event()
                lane.thread = threading.Thread(target=self._run, args=(lane, lane.stop),
                                               name=f"audit-{self.sink.name}", daemon=True)
                lane.thread.start()
            return lane

    def _run(self, lane: _Lane, stop: threading.Event) -> None:
        while not stop.is_set():
            taken = [lane.queue.get()]
            while len(taken) < self.sink.batch and taken[-1] is not _STOP:
                try:
                    taken.append(lane.queue.get_nowait())
                except queue.Empty:
                    break
            events = [e for e in taken if e is not _STOP]
            if events:
                try:
                    self.sink.send(events)
                except Exception as exc:
                    AUDIT_DROPPED.labels(self.sink.name, "delivery_failed").inc(len(events))
                    delivery_log.warning(self._failed_message, _cause(exc))
                finally:
                    lane.settle(-len(events))
            if taken[-1] is _STOP:
                return

    def flush(self, deadline: float) -> bool:
        lane = self._lane
        if lane.pid != os.getpid():
            return True  # forked, and nothing queued here since
        return lane.wait(deadline)

    def close(self, deadline: float) -> bool:
        drained = self.flush(deadline)
        with self._lock:
            lane = self._lane
            thread, stop = (lane.thread, lane.stop) if lane.pid == os.getpid() else (None, lane.stop)
            lane.thread = None  # an emit after this starts a new thread
        if thread is not None:
            stop.set()  # seen after the batch in hand, if the queue is too full for the sentinel
            try:
                lane.queue.put_nowait(_STOP)
            except queue.Full:
                pass
            thread.join(max(0.0, deadline - time.monotonic()))
        stopped = thread is None or not thread.is_alive()
        if stopped:
            self.sink.close()
        return drained and stopped


class AuditEvents:
    """Emits audit events to the log and to each sink's bounded queue; see the module's docstring."""

    def __init__(self, sinks: Iterable[Sink] = (), *, queue_size: int = 10_000,
                 clock: Callable[[], datetime] = _utcnow):
        self.clock = clock
        self._channels = tuple(_Channel(sink, queue_size) for sink in sinks)

    @classmethod
    def from_settings(cls, settings: Settings, *, webhook_timeout: float = WEBHOOK_TIMEOUT) -> "AuditEvents":
        """The log; the Redis Stream with BROKER_AUDIT_REDIS_STREAM; the webhook with BROKER_AUDIT_WEBHOOK_URL."""
        sinks: list[Sink] = []
        if settings.audit_stream:
            if not settings.redis_url:
                raise ValueError("BROKER_AUDIT_REDIS_STREAM needs BROKER_REDIS_URL: the stream lives in that Redis")
            sinks.append(RedisStreamSink.from_url(settings.redis_url, settings.audit_stream,
                                                  maxlen=settings.audit_stream_maxlen, timeout=settings.redis_timeout))
        if settings.audit_webhook_url:
            sinks.append(WebhookSink(settings.audit_webhook_url, timeout=webhook_timeout))
        return cls(sinks, queue_size=settings.audit_queue_size)

    @property
    def sinks(self) -> tuple[Sink, ...]:
        """The optional sinks (the log is always written)."""
        return tuple(channel.sink for channel in self._channels)

    def emit(self, event: str, outcome: str, *, reason: str | None = None, message: str | None = None,
             user: str | None = None, session: str | None = None, client_ip: str | None = None,
             request_id: str | None = None) -> dict[str, Value]:
        """Log the event and queue it for each sink, without waiting; return it (a copy).

        TypeError for a field the schema does not have, ValueError for an outcome other than ok, refused or
        failed; nothing else is raised, and no sink is waited for.
        """
        record = make_event(event, outcome, now=self.clock(), reason=reason, message=message, user=user,
                            session=session, client_ip=client_ip, request_id=request_id)
        AUDIT_EVENTS.labels(event_label(record["event"]), outcome).inc()
        log.info("audit %s %s", record["event"], outcome, extra=log_fields(record))
        for channel in self._channels:
            channel.offer(record)  # the sinks only read it
        return dict(record)

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until every queued event was delivered or given up; True if all were."""
        deadline = time.monotonic() + timeout
        return all([channel.flush(deadline) for channel in self._channels])

    def close(self, timeout: float) -> bool:
        """Flush (up to `timeout` seconds in all), stop the threads, close the sinks' connections; True if drained."""
        deadline = time.monotonic() + timeout
        return all([channel.close(deadline) for channel in self._channels])
