"""The shared store (Redis) behind a circuit breaker: tight timeouts, and no waiting on a Redis that is out.

Redis helps the broker coordinate refreshes across processes; it is never allowed to hold requests up.
Every command has a socket timeout of BROKER_REDIS_TIMEOUT seconds and no redis-py retries. After
FAILURES_TO_OPEN failures in a row the breaker opens for BROKER_REDIS_RETRY_SECONDS: calls fail at once
with SharedStoreDown, without touching the network; then one call at a time tries Redis again, and its
success closes the breaker. The outage is logged once when it starts (with the reason) and once when it
ends, not once per request.

The breaker is our own, 40 lines: pybreaker, the maintained library for it, runs every call inside its
lock, which would serialise all of a worker's Redis commands behind the slowest one (measured: 50
concurrent 10 ms commands took 0.55 s). Here the lock guards the state only; calls run outside it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# One slow reply should not stop coordination for everyone; three in a row is an outage.
FAILURES_TO_OPEN = 3


class SharedStoreDown(Exception):
    """The shared store could not be used for this call (it failed, timed out, or the breaker is open)."""


class SharedStoreBusy(SharedStoreDown):
    """The store is alive but another process keeps it locked (the local store): it is coordinating, so a
    refresh must not go ahead without it."""


class CircuitBreaker:
    """Closed → open after `failures` failures in a row → one trial call after `retry_seconds` → closed again."""

    def __init__(self, *, failures: int, retry_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.failures = failures
        self.retry_seconds = retry_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._failed = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def open(self) -> bool:
        """True while calls are refused without trying (an outage less than `retry_seconds` old)."""
        with self._lock:
            return self._opened_at is not None and (self._trial or self.clock() - self._opened_at < self.retry_seconds)

    def allow(self) -> bool:
        """Whether a call may go ahead now; while open, one caller per interval gets the trial."""
        with self._lock:
            if self._opened_at is None:
                return True
            if self._trial or self.clock() - self._opened_at < self.retry_seconds:
                return False
            self._trial = True
            return True

    def succeeded(self) -> None:
        with self._lock:
            recovered = self._opened_at is not None
            self._failed, self._opened_at, self._trial = 0, None, False
        if recovered:
            log.warning("Redis is available again")

    def failed(self, reason: str) -> None:
        with self._lock:
            self._failed += 1
            was_open = self._opened_at is not None
            if was_open or self._failed >= self.failures:
                self._opened_at, self._trial = self.clock(), False
        if not was_open and self._failed >= self.failures:
            log.warning("Redis is unavailable (%s); retrying it every %.1fs meanwhile", reason, self.retry_seconds)


class SharedStore:
    """A Redis client whose every call goes through one circuit breaker."""

    def __init__(self, client: Any, *, retry_seconds: float, failures: int = FAILURES_TO_OPEN):
        # Imported here, not with the module: a broker without Redis never loads redis-py (7 MiB per worker).
        from redis.exceptions import RedisError

        self.redis = client
        self.breaker = CircuitBreaker(failures=failures, retry_seconds=retry_seconds)
        self._failures = (RedisError, OSError)

    @classmethod
    def from_url(cls, url: str, *, timeout: float, retry_seconds: float) -> "SharedStore":
        """A store for BROKER_REDIS_URL with `timeout` seconds per connect and per command, and no retries."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        return cls(client, retry_seconds=retry_seconds)

    def call(self, command: Callable[[Any], T], *, force: bool = False) -> T:
        """Run `command(redis_client)`; raise SharedStoreDown when Redis fails or the breaker is open.

        `force` tries Redis even while the breaker is open: for an outcome that must reach the other
        processes (its token is spent), trying costs one timeout and is worth it.
        """
        if not force and not self.breaker.allow():
            raise SharedStoreDown("circuit open")
        try:
            result = command(self.redis)
        except self._failures as exc:
            self.breaker.failed(type(exc).__name__)
            raise SharedStoreDown(type(exc).__name__) from None
        self.breaker.succeeded()
        return result

    @property
    def available(self) -> bool:
        """False while the breaker is open (Redis failed less than BROKER_REDIS_RETRY_SECONDS ago)."""
        return not self.breaker.open
