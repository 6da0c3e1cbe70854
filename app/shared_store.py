"""The shared store (Redis) behind a circuit breaker: tight timeouts, and no waiting on a Redis that is out.

Redis helps the broker (refresh coalescing across processes); it is never allowed to hold requests up.
Every command has a socket timeout of BROKER_REDIS_TIMEOUT seconds. After a failure the breaker opens
for BROKER_REDIS_RETRY_SECONDS: calls fail at once with SharedStoreDown, without touching the network,
then one call tries Redis again. The outage is logged once when it starts and once when it ends, not
once per request. pybreaker provides the breaker (docs/architecture.md says why).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar

import pybreaker
import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

log = logging.getLogger(__name__)
T = TypeVar("T")


class SharedStoreDown(Exception):
    """Redis could not be used for this call (it failed, timed out, or the breaker is open)."""


class _OutageLog(pybreaker.CircuitBreakerListener):
    """One log line when Redis goes out, one when it is back."""

    def state_change(self, breaker: pybreaker.CircuitBreaker, old: Any, new: Any) -> None:
        if new.name == pybreaker.STATE_OPEN and old.name == pybreaker.STATE_CLOSED:
            log.warning("Redis is unavailable; retrying it every %.1fs meanwhile", breaker.reset_timeout)
        elif new.name == pybreaker.STATE_CLOSED and old.name != pybreaker.STATE_CLOSED:
            log.warning("Redis is available again")


class SharedStore:
    """A Redis client whose every call goes through one circuit breaker."""

    def __init__(self, client: Any, *, retry_seconds: float):
        self.redis = client
        self.breaker = pybreaker.CircuitBreaker(
            fail_max=1, reset_timeout=retry_seconds, listeners=[_OutageLog()], name="redis"
        )

    @classmethod
    def from_url(cls, url: str, *, timeout: float, retry_seconds: float) -> "SharedStore":
        """A store for REDIS_URL with `timeout` seconds per connect and per command, and no retries."""
        client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        return cls(client, retry_seconds=retry_seconds)

    def call(self, command: Callable[[Any], T]) -> T:
        """Run `command(redis_client)`; raise SharedStoreDown when Redis fails or the breaker is open."""
        try:
            return self.breaker.call(command, self.redis)
        except (RedisError, pybreaker.CircuitBreakerError, OSError) as exc:
            raise SharedStoreDown(type(exc).__name__) from None

    @property
    def available(self) -> bool:
        """False while the breaker is open (Redis failed less than BROKER_REDIS_RETRY_SECONDS ago)."""
        return self.breaker.current_state != pybreaker.STATE_OPEN
