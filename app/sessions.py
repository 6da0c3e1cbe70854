"""Refresh coalescing: identical refreshes share one Keycloak grant, in a process and across instances.

With refresh-token rotation, Keycloak treats a second use of a refresh token as theft and ends the
session. Browsers send such second uses all the time (two tabs, retrying interceptors, parallel requests
that all saw a 401). `RefreshCoalescer` makes them harmless: every refresh presenting the same refresh
token and scope within a short window gets the result of exactly one Keycloak call.

- In a process: single-flight. The first caller (the leader) calls Keycloak; callers arriving while it
  runs wait for its result; callers arriving within `grace` seconds afterwards get it from a memo.
- Across gunicorn workers and broker instances (when a Redis is configured): the leader of each process
  first takes a Redis lock (SET NX with a lease longer than a Keycloak call can take), calls Keycloak and
  stores the outcome for `grace` seconds; the other processes wait for that stored outcome.

Nothing stored is useful to someone who can read Redis or a memory dump of it: entries are named by a
keyed hash of the token, and the outcome is encrypted with AES-GCM under a key derived (HKDF) from the
refresh token itself, so only a caller who already holds the token can read the tokens it was exchanged
for. Failures are shared the same way: every caller of a coalesced refresh gets the same answer.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from cryptography.exceptions import InvalidTag
from redis.exceptions import RedisError
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from app.errors import BrokerError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from app.keycloak_client import TokenSet
from app.metrics import REFRESHES

log = logging.getLogger(__name__)

Outcome = TokenSet | BrokerError
Refresh = Callable[[str, "str | None"], TokenSet]


@dataclass(frozen=True)
class FlightKey:
    """Where a refresh's outcome lives (`name`) and the key that seals it (`secret`), both from the token."""

    name: str
    secret: bytes

    @classmethod
    def of(cls, refresh_token: str, scope: str | None) -> "FlightKey":
        material = f"{refresh_token}\x00{scope or ''}".encode()
        name = hashlib.sha256(b"token-broker/refresh-coalescing/name\x00" + material).hexdigest()
        secret = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"token-broker/refresh-coalescing",
                      info=b"outcome-key").derive(material)
        return cls(name, secret)


def seal(key: FlightKey, outcome: Outcome) -> bytes:
    """Serialise and encrypt an outcome so that only holders of the refresh token can open it."""
    if isinstance(outcome, TokenSet):
        payload = {"tokens": asdict(outcome)}
    else:
        payload = {"error": {"status": outcome.status, "error": outcome.error, "message": outcome.message,
                             "headers": outcome.headers}}
    nonce = os.urandom(12)
    return nonce + AESGCM(key.secret).encrypt(nonce, json.dumps(payload).encode(), key.name.encode())


def unseal(key: FlightKey, blob: bytes) -> Outcome:
    """Decrypt a sealed outcome; raise ValueError when it was not sealed for this token."""
    try:
        payload = json.loads(AESGCM(key.secret).decrypt(blob[:12], blob[12:], key.name.encode()))
    except (InvalidTag, ValueError) as exc:
        raise ValueError("sealed outcome does not open with this token") from exc
    if "tokens" in payload:
        return TokenSet(**payload["tokens"])
    stored = payload["error"]
    error = BrokerError(stored["message"], error=stored["error"], headers=stored["headers"])
    error.status = stored["status"]
    return error


class _Flight:
    """One in-process refresh in the air: its outcome, once known, and when it stops being shared."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.outcome: Outcome | None = None
        self.expires = float("inf")


class RedisOutcomes:
    """Cross-process coordination in Redis: a lock with a lease per refresh, and sealed outcomes."""

    PREFIX = "token-broker:refresh:"

    def __init__(self, client: Any, *, lease: float, poll_interval: float = 0.02):
        self.redis = client
        self.lease = lease
        self.poll_interval = poll_interval

    def claim(self, key: FlightKey, owner: str) -> bool:
        """Take the cross-process lead for this refresh; False when another process holds it."""
        return bool(self.redis.set(f"{self.PREFIX}lock:{key.name}", owner, nx=True, px=int(self.lease * 1000)))

    def release(self, key: FlightKey, owner: str) -> None:
        """Drop the lock if it is still ours (a lease that ran out may already belong to someone else)."""
        self.redis.eval(
            "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0",
            1, f"{self.PREFIX}lock:{key.name}", owner,
        )

    def store(self, key: FlightKey, outcome: Outcome, grace: float) -> None:
        self.redis.set(f"{self.PREFIX}outcome:{key.name}", seal(key, outcome), px=max(1, int(grace * 1000)))

    def load(self, key: FlightKey) -> Outcome | None:
        blob = self.redis.get(f"{self.PREFIX}outcome:{key.name}")
        return unseal(key, blob) if blob is not None else None

    def locked(self, key: FlightKey) -> bool:
        return bool(self.redis.exists(f"{self.PREFIX}lock:{key.name}"))


class RefreshCoalescer:
    """Refreshes through `refresh`, coalescing identical ones (same token and scope) into one Keycloak call."""

    def __init__(
        self,
        refresh: Refresh,
        *,
        grace: float,
        shared: RedisOutcomes | None = None,
        prepare: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._refresh = refresh
        self._prepare = prepare
        self._grace = grace
        self._shared = shared
        self._clock = clock
        self._flights: dict[str, _Flight] = {}
        self._lock = threading.Lock()

    def refresh(self, refresh_token: str, scope: str | None = None) -> TokenSet:
        """The outcome of refreshing `refresh_token`: a TokenSet, or the BrokerError every caller shares."""
        key = FlightKey.of(refresh_token, scope)
        with self._lock:
            self._forget_expired()
            flight = self._flights.get(key.name)
            leader = flight is None
            if leader:
                flight = self._flights[key.name] = _Flight()
        if leader:
            try:
                flight.outcome = self._lead(key, refresh_token, scope)
            except BrokerError as exc:
                flight.outcome = exc
            except BaseException:
                # A bug (or a worker timeout): forget the flight so later refreshes are not stuck behind it.
                with self._lock:
                    self._flights.pop(key.name, None)
                flight.outcome = UpstreamError()
                raise
            finally:
                flight.expires = self._clock() + self._grace
                flight.done.set()
        else:
            REFRESHES.labels("coalesced").inc()
            flight.done.wait()
        return _deliver(flight.outcome)

    def _lead(self, key: FlightKey, refresh_token: str, scope: str | None) -> Outcome:
        if self._shared is None:
            return self._call(refresh_token, scope)
        try:
            return self._lead_across_processes(key, refresh_token, scope)
        except RedisError as exc:
            # Redis is a helper, not a dependency: without it, coalescing still holds within this process.
            log.warning("Redis unavailable for refresh coalescing (%s); coalescing within this process only",
                        type(exc).__name__)
            return self._call(refresh_token, scope)

    def _call(self, refresh_token: str, scope: str | None) -> Outcome:
        REFRESHES.labels("upstream").inc()
        try:
            return self._refresh(refresh_token, scope)
        except BrokerError as exc:
            return exc

    def _lead_across_processes(self, key: FlightKey, refresh_token: str, scope: str | None) -> Outcome:
        shared = self._shared
        if self._prepare is not None:
            self._prepare()  # e.g. fetch the discovery document now, so it does not eat into the lease
        owner = os.urandom(16).hex()
        deadline = self._clock() + shared.lease + 1.0
        saw_other_leader = False
        while True:
            stored = self._load(key)
            if stored is not None:
                REFRESHES.labels("coalesced").inc()
                return stored
            if not saw_other_leader and shared.claim(key, owner):
                return self._grant_and_share(key, owner, refresh_token, scope)
            saw_other_leader = True
            if not shared.locked(key):
                # The other leader is gone without sharing an outcome (it crashed, or Redis failed under it).
                # It may have spent the token: refreshing it again here could be a reuse that ends the session.
                stored = self._load(key)
                if stored is not None:
                    REFRESHES.labels("coalesced").inc()
                    return stored
                log.warning("another instance's refresh of the same token ended without an outcome")
                return UpstreamUnavailable()
            if self._clock() > deadline:
                log.warning("gave up waiting for another instance's refresh of the same token")
                return UpstreamTimeout()
            time.sleep(shared.poll_interval)

    def _grant_and_share(self, key: FlightKey, owner: str, refresh_token: str, scope: str | None) -> Outcome:
        """As the cross-process leader: one Keycloak call, its outcome stored, then the lock released."""
        shared = self._shared
        stored = self._load(key)  # another process may have finished between our look and our claim
        if stored is not None:
            shared.release(key, owner)
            REFRESHES.labels("coalesced").inc()
            return stored
        outcome = self._call(refresh_token, scope)
        # From here on the token may be spent: a Redis failure must not make anyone refresh it again.
        try:
            shared.store(key, outcome, self._grace)
        except RedisError as exc:
            # Keep the lock (its lease runs out by itself): waiters then answer 503 instead of refreshing.
            log.warning("could not share a refresh outcome through Redis (%s)", type(exc).__name__)
            return outcome
        try:
            shared.release(key, owner)
        except RedisError:
            pass  # the lease runs out by itself
        return outcome

    def _load(self, key: FlightKey) -> Outcome | None:
        try:
            return self._shared.load(key)
        except ValueError:
            log.warning("a stored refresh outcome did not open with its token; ignoring it")
            return None

    def _forget_expired(self) -> None:
        now = self._clock()
        for name in [n for n, f in self._flights.items() if f.done.is_set() and f.expires <= now]:
            del self._flights[name]


class UncoalescedRefresh:
    """Every refresh goes to Keycloak on its own (BROKER_REFRESH_COALESCING=false; for tests and comparisons)."""

    def __init__(self, refresh: Refresh):
        self._refresh = refresh

    def refresh(self, refresh_token: str, scope: str | None = None) -> TokenSet:
        REFRESHES.labels("upstream").inc()
        return self._refresh(refresh_token, scope)


def _deliver(outcome: Outcome | None) -> TokenSet:
    if isinstance(outcome, TokenSet):
        return outcome
    if isinstance(outcome, BrokerError):
        # A copy per caller: threads must not share (and mutate) one exception object.
        duplicate = copy.copy(outcome)
        duplicate.headers = dict(outcome.headers)
        raise duplicate
    raise UpstreamError()
