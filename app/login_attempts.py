"""Limits on password guessing: attempts per client address and username, and per username alone.

An attempt is counted before Keycloak is asked (so parallel guesses cannot all slip past the check while
the first ones are still in flight) and given back when the login did not turn out to be a refused guess
(it succeeded, or Keycloak could not be asked). Usernames are compared normalised (Unicode NFKC, case-folded,
outer spaces dropped), so `Alice ` and `alice` are one user; the username itself is never stored, only a
hash. Counters live where the other rate limits live: in memory per process, or in Redis with
BROKER_REDIS_URL (every worker and instance sees the same counts). While Redis fails, counting goes on in
memory for BROKER_REDIS_RETRY_SECONDS, then Redis is tried again.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import unicodedata
from dataclasses import dataclass
from typing import Callable

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage, Storage, storage_from_string
from limits.strategies import FixedWindowRateLimiter

from app.errors import RateLimited
from app.metrics import RATE_LIMITED

log = logging.getLogger(__name__)


def normalised_username(username: str) -> str:
    """The username as Keycloak compares it: NFKC, case-folded, without outer spaces."""
    return unicodedata.normalize("NFKC", username).strip().casefold()


@dataclass(frozen=True)
class Attempt:
    """One counted login attempt: the counters it was added to, so that it can be given back."""

    counted: tuple[tuple[RateLimitItem, tuple[str, ...]], ...]
    strategy: FixedWindowRateLimiter


class LoginAttempts:
    """Counts login attempts before they reach Keycloak and refuses them (429) over either limit."""

    def __init__(self, *, per_address_user: str, per_user: str, storage_uri: str | None = None,
                 storage_options: dict | None = None, retry_seconds: float = 5.0, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self._limits = (("login-address-user", parse(per_address_user)), ("login-user", parse(per_user)))
        self._enabled = enabled
        self._memory = FixedWindowRateLimiter(MemoryStorage())
        self._shared: FixedWindowRateLimiter | None = None
        if storage_uri:
            storage: Storage = storage_from_string(storage_uri, **(storage_options or {}))
            self._shared = FixedWindowRateLimiter(storage)
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._shared_down_until = float("-inf")
        self._lock = threading.Lock()

    def admit(self, address: str, username: str) -> Attempt | None:
        """Count an attempt; raise RateLimited (with the seconds until the window resets) over either limit."""
        if not self._enabled:
            return None
        user = hashlib.sha256(normalised_username(username).encode()).hexdigest()[:32]
        keys = {"login-address-user": ("token-broker", address, user), "login-user": ("token-broker", user)}
        strategy = self._strategy()
        try:
            return self._count(strategy, keys)
        except RateLimited:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the shared store: count in memory meanwhile
            return self._count(self._shared_failed(exc), keys)

    def _count(self, strategy: FixedWindowRateLimiter, keys: dict[str, tuple[str, ...]]) -> Attempt:
        counted = []
        refused_for = 0
        for name, item in self._limits:
            identifiers = (*keys[name], name)
            allowed = strategy.hit(item, *identifiers)
            counted.append((item, identifiers))
            if not allowed:
                reset = strategy.get_window_stats(item, *identifiers).reset_time
                refused_for = max(refused_for, max(1, math.ceil(reset - time.time())))
        if refused_for:
            RATE_LIMITED.labels("auth.login").inc()
            raise RateLimited(refused_for)
        return Attempt(tuple(counted), strategy)

    def give_back(self, attempt: Attempt | None) -> None:
        """Uncount an attempt that was no refused guess (the login succeeded, or Keycloak could not be asked)."""
        if attempt is None:
            return
        for item, identifiers in attempt.counted:
            try:
                attempt.strategy.hit(item, *identifiers, cost=-1)
            except Exception:  # noqa: BLE001 - the count then stays until its window ends, which is safe
                log.warning("could not give back a login attempt to the rate-limit store")

    def _strategy(self) -> FixedWindowRateLimiter:
        if self._shared is None:
            return self._memory
        with self._lock:
            if self._clock() < self._shared_down_until:
                return self._memory
        return self._shared

    def _shared_failed(self, exc: Exception) -> FixedWindowRateLimiter:
        with self._lock:
            first = self._clock() >= self._shared_down_until
            self._shared_down_until = self._clock() + self._retry_seconds
        if first:
            log.warning("the rate-limit store failed (%s); counting login attempts in memory for %.0fs",
                        type(exc).__name__, self._retry_seconds)
        return self._memory
