"""Refresh coalescing: identical refreshes share one Keycloak grant, in a process and across instances.

With refresh-token rotation, Keycloak treats a second use of a refresh token as theft and ends the
session. Browsers send such second uses all the time (two tabs, retrying interceptors, parallel requests
that all saw a 401). `RefreshCoalescer` makes them harmless: every refresh presenting the same refresh
token within a short window gets the result of exactly one Keycloak call. Flights are keyed by the token
alone: the same token asked with another scope while its refresh flies, or after it brought new tokens, is
a 409 RefreshConflict that spends nothing (a second grant would be a reuse).

- In a process: single-flight. The first caller starts a flight (the Keycloak call runs in a task of its
  own); callers arriving while it is in the air join it, whoever they are; callers arriving within `grace`
  seconds after it landed get its outcome from a memo only if they are the same client (the fingerprint of
  app.web.rate_limits: address and User-Agent). Another client presenting the spent token then is sent to
  Keycloak, which sees the reuse, as it would without a broker: a thief's replay gets nothing.
- No lost answers: a caller waits at most `wait` seconds, but the flight goes on until Keycloak answers
  (bounded by the client's own answer limit), and its outcome is kept for `grace` seconds from then. A
  caller that gave up (504) or whose connection dropped gets the new tokens when it retries the same token.
- Across gunicorn workers and broker instances (when a Redis is configured): the flight first takes a Redis
  lock (SET NX with a lease longer than a refresh can take), calls Keycloak and stores the outcome; flights
  of the same token in other processes wait for that stored outcome. Redis sits behind a circuit breaker
  (app/shared_store.py). When it is out, refreshes answer 503 rather than risk a second use of the token,
  unless the operator said this is the only broker process on that Redis (BROKER_SINGLE_INSTANCE, one
  worker): then coalescing within the process is complete and refreshes go on. An outcome that Redis did
  not take is retried past the breaker for the grace window, with the lock held, so no other process
  refreshes the spent token meanwhile.

Only outcomes that say what became of the token are kept for the grace window: new tokens, and Keycloak's
refusals of the token. A failure that leaves the token's fate unknown or untouched (Keycloak unreachable, a
lost answer, a 5xx, a scope the client may not have) is shared with the callers already waiting, then
forgotten, so the next retry asks Keycloak again.

Nothing stored is useful to someone who can read Redis or a memory dump of it: entries are named by a
keyed hash of the token, and the outcome is encrypted with AES-GCM under a key derived (HKDF) from the
refresh token itself, so only a caller who already holds the token can read the tokens it was exchanged for.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from app.errors import (
    AnswerKept,
    AnswerLost,
    BrokerError,
    CoordinationUnavailable,
    RefreshConflict,
    RefreshRejected,
    UpstreamError,
    UpstreamTimeout,
)
from app.keycloak_client import TokenSet
from app.metrics import REFRESHES
from app.shared_store import SharedStore, SharedStoreBusy, SharedStoreDown

log = logging.getLogger(__name__)

Outcome = TokenSet | BrokerError
Refresh = Callable[[str, "str | None"], TokenSet]


@dataclass(frozen=True)
class FlightKey:
    """Where a refresh's outcome lives (`name`) and the key that seals it (`secret`), both from the token."""

    name: str
    secret: bytes

    @classmethod
    def of(cls, refresh_token: str) -> "FlightKey":
        # The token alone: two scopes asked at once for one token must meet, not spend it twice. (The trailing
        # NUL keeps the names of earlier releases, which added the scope there, for refreshes without one.)
        material = f"{refresh_token}\x00".encode()
        name = hashlib.sha256(b"token-broker/refresh-coalescing/name\x00" + material).hexdigest()
        secret = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"token-broker/refresh-coalescing",
                      info=b"outcome-key").derive(material)
        return cls(name, secret)


@dataclass(frozen=True)
class Stored:
    """A refresh's outcome as processes share it, with the scope it was asked for and the client that asked.

    `client` is an opaque fingerprint of the caller (app.web.rate_limits.client_fingerprint); None means any
    client (an outcome stored by an earlier release, which did not record it).
    """

    outcome: Outcome
    scope: str | None = None
    client: str | None = None

    def for_client(self, client: str) -> bool:
        """Whether a caller arriving after the refresh landed may be given this outcome (see `keeps`)."""
        return self.client is None or self.client == client


def seal(key: FlightKey, stored: Stored) -> bytes:
    """Serialise and encrypt an outcome so that only holders of the refresh token can open it."""
    outcome = stored.outcome
    if isinstance(outcome, TokenSet):
        # Its fields are strings and numbers: dataclasses.asdict's deep copy of them cost more than the encryption.
        payload = {"tokens": {field.name: getattr(outcome, field.name) for field in fields(outcome)}}
    else:
        payload = {"error": outcome.parts()}
    payload.update(scope=stored.scope, client=stored.client)
    nonce = os.urandom(12)
    return nonce + AESGCM(key.secret).encrypt(nonce, json.dumps(payload).encode(), key.name.encode())


def unseal(key: FlightKey, blob: bytes) -> Stored:
    """Decrypt a sealed outcome; raise ValueError when it was not sealed for this token."""
    try:
        payload = json.loads(AESGCM(key.secret).decrypt(blob[:12], blob[12:], key.name.encode()))
    except (InvalidTag, ValueError) as exc:
        raise ValueError("sealed outcome does not open with this token") from exc
    outcome = TokenSet(**payload["tokens"]) if "tokens" in payload else BrokerError.restore(**payload["error"])
    return Stored(outcome, payload.get("scope"), payload.get("client"))


class _Flight:
    """One refresh in the air in this process: its outcome, once known, and when it stops being shared."""

    def __init__(self, scope: str | None, client: str) -> None:
        self.scope = scope
        self.client = client
        self.done = threading.Event()
        self.outcome: Outcome | None = None
        self.expires = float("inf")


def keeps(outcome: Outcome) -> bool:
    """Whether an outcome says what became of the token (new tokens, or Keycloak refused the token itself), so
    retries may reuse it. Anything else (a scope the client may not have, a fault) spent nothing: ask again."""
    return isinstance(outcome, (TokenSet, RefreshRejected))


def readable_outcome(load: Callable[[], Stored | None], *, kept_only: bool = False) -> Stored | None:
    """What `load()` read from a shared store, an outcome that does not open with the token counting as none;
    with `kept_only`, only one that tells the token's fate (a new flight must not take up a fault that was
    shared briefly for the callers who were waiting for it). The stores' claim_unless_kept use it too."""
    try:
        stored = load()
    except ValueError:
        log.warning("a stored refresh outcome did not open with its token; ignoring it")
        return None
    if stored is not None and kept_only and not keeps(stored.outcome):
        return None
    return stored


# How long an outcome that is not kept stays in Redis: long enough for waiting processes to read it.
SHARE_BRIEFLY_SECONDS = 1.0
# How often a flight retries sharing an outcome that Redis did not take at once.
SHARE_RETRY_SECONDS = 0.25


class RedisOutcomes:
    """Cross-process coordination in Redis: a lock with a lease per refresh, and sealed outcomes.

    Every call goes through `store` (app.shared_store.SharedStore, with its circuit breaker) and raises
    SharedStoreDown when Redis cannot be used.
    """

    PREFIX = "token-broker:refresh:"

    def __init__(self, store: SharedStore, *, lease: float, poll_interval: float = 0.02):
        self.store_ = store
        self.lease = lease
        self.poll_interval = poll_interval

    def claim_unless_kept(self, key: FlightKey, owner: str) -> tuple[Stored | None, bool]:
        """A kept outcome of this refresh (and no lock), or else whether this flight took the lead.

        Redis has no transaction across a look and a SET NX here, so it looks, claims, and looks again: another
        process may have stored its outcome and released the lock between the first look and the claim."""
        stored = readable_outcome(lambda: self.load(key), kept_only=True)
        if stored is not None:
            return stored, False
        try:
            claimed = self.claim(key, owner)
        except SharedStoreDown:
            _quietly(self.release, key, owner)  # the claim may have been applied with its reply lost
            raise
        if not claimed:
            return None, False
        stored = readable_outcome(lambda: self.load(key), kept_only=True)
        if stored is not None:
            _quietly(self.release, key, owner)
            return stored, False
        return None, True

    def store_and_release(self, key: FlightKey, owner: str, stored: Stored, grace: float, *,
                          force: bool = False) -> None:
        """store(), then the lock released; SharedStoreDown only when the outcome was not stored (a lock that
        could not be released runs out with its lease). `force` goes past the breaker for both."""
        self.store(key, stored, grace, force=force)
        _quietly(self.release_forced if force else self.release, key, owner)

    def claim(self, key: FlightKey, owner: str) -> bool:
        """Take the cross-process lead for this refresh; False when another process holds it."""
        return bool(self.store_.call(lambda r: r.set(f"{self.PREFIX}lock:{key.name}", owner, nx=True,
                                                     px=int(self.lease * 1000))))

    def release(self, key: FlightKey, owner: str) -> None:
        """Drop the lock if it is still ours (a lease that ran out may already belong to someone else)."""
        self.store_.call(lambda r: r.eval(
            "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0",
            1, f"{self.PREFIX}lock:{key.name}", owner,
        ))

    def store(self, key: FlightKey, stored: Stored, grace: float, *, force: bool = False) -> None:
        ttl = grace if keeps(stored.outcome) else min(grace, SHARE_BRIEFLY_SECONDS)
        blob = seal(key, stored)
        self.store_.call(lambda r: r.set(f"{self.PREFIX}outcome:{key.name}", blob, px=max(1, int(ttl * 1000))),
                         force=force)

    def release_forced(self, key: FlightKey, owner: str) -> None:
        """release() even while the breaker is open (after an outcome was finally stored)."""
        self.store_.call(lambda r: r.eval(
            "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0",
            1, f"{self.PREFIX}lock:{key.name}", owner,
        ), force=True)

    def load(self, key: FlightKey) -> Stored | None:
        blob = self.store_.call(lambda r: r.get(f"{self.PREFIX}outcome:{key.name}"))
        return unseal(key, blob) if blob is not None else None

    def locked(self, key: FlightKey) -> bool:
        return bool(self.store_.call(lambda r: r.exists(f"{self.PREFIX}lock:{key.name}")))


class RefreshCoalescer:
    """Refreshes through `refresh`, coalescing identical ones (same token and scope) into one Keycloak call."""

    def __init__(
        self,
        refresh: Refresh,
        *,
        grace: float,
        wait: float = 30.0,
        shared: RedisOutcomes | None = None,
        redis_required: bool = True,
        prepare: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._refresh = refresh
        self._prepare = prepare
        self._grace = grace
        self._wait = wait
        self._shared = shared
        # Redis out: refreshing without it is safe only when this process is the only one using that Redis.
        self._redis_required = redis_required
        self._clock = clock
        self._flights: dict[str, _Flight] = {}
        # Landed flights in the order their grace windows end (one grace for all: landing order), so forgetting
        # the expired ones costs nothing per refresh but the ones that expired.
        self._expiring: deque[tuple[float, str, _Flight]] = deque()
        self._lock = threading.Lock()
        self._in_air = 0
        self._landed = threading.Condition(self._lock)

    def refresh(self, refresh_token: str, scope: str | None = None, client: str = "") -> TokenSet:
        """The outcome of refreshing `refresh_token`: a TokenSet, or the BrokerError every caller shares.

        `client` fingerprints the caller: a refresh that is still in the air is shared with anyone presenting
        the token, but once it has landed its kept outcome goes only to the same client; another one is sent
        to Keycloak, which then sees the reuse (a replayed, stolen token ends the session, as without a broker).
        Raises AnswerKept when the flight is still in the air after `wait` seconds; it goes on, and a
        retry with the same token joins it or gets its outcome. Raises RefreshConflict when the token is
        being (or was just) refreshed with another scope: nothing is spent then.
        """
        key = FlightKey.of(refresh_token)
        with self._lock:
            self._forget_expired()
            flight = self._flights.get(key.name)
            leader = flight is None
            landed = None
            if leader:
                flight = self._flights[key.name] = _Flight(scope, client)
                self._in_air += 1
            elif flight.done.is_set() and (flight.scope != scope or flight.client != client):
                landed = flight  # asked again with another scope, or by another client: no honest duplicate
            elif flight.scope != scope:
                raise RefreshConflict()  # in the air with another scope: whatever it brings spends the token
        if landed is not None:
            if landed.scope != scope:
                return _deliver(self._for_other_scope(landed.outcome, refresh_token, scope))
            return _deliver(self._for_other_client(refresh_token, scope))
        if leader:
            # The flight runs on its own, so it survives its caller giving up or disconnecting.
            try:
                threading.Thread(target=self._fly, args=(flight, key, refresh_token, scope, client),
                                 name="refresh-flight", daemon=True).start()
            except BaseException:
                self._land(flight, key, UpstreamError())  # no stranded waiters, no flight left in the air
                raise
        else:
            REFRESHES.labels("coalesced").inc()
        if not flight.done.wait(self._wait):
            REFRESHES.labels("caller_gave_up").inc()
            raise AnswerKept()
        return _deliver(flight.outcome)

    def drain(self, timeout: float) -> bool:
        """Wait until every flight in the air has landed (at most `timeout` seconds); True when none is left."""
        deadline = time.monotonic() + timeout
        with self._landed:
            while self._in_air:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._landed.wait(left)
        return True

    def _fly(self, flight: _Flight, key: FlightKey, refresh_token: str, scope: str | None, client: str) -> None:
        try:
            outcome = self._lead(key, refresh_token, scope, client)
        except BrokerError as exc:
            outcome = exc
        except BaseException:  # a bug: the waiting callers get a 502, later refreshes are not stuck behind it
            log.exception("refresh flight failed")
            outcome = UpstreamError()
        self._land(flight, key, outcome)

    def _land(self, flight: _Flight, key: FlightKey, outcome: Outcome) -> None:
        with self._lock:
            flight.outcome = outcome
            if keeps(outcome):
                flight.expires = self._clock() + self._grace
                self._expiring.append((flight.expires, key.name, flight))
            elif self._flights.get(key.name) is flight:
                del self._flights[key.name]  # nothing learnt about the token: the next retry asks Keycloak
            self._in_air -= 1
            self._landed.notify_all()
        flight.done.set()

    def _lead(self, key: FlightKey, refresh_token: str, scope: str | None, client: str) -> Outcome:
        if self._shared is None:
            return self._call(refresh_token, scope)
        try:
            return self._lead_across_processes(key, refresh_token, scope, client)
        except SharedStoreDown as exc:
            # Nothing was sent to Keycloak yet (the store fails before a claim, or while the lock is ours).
            # A busy store means another live process is coordinating through it: never go it alone then.
            if self._redis_required or isinstance(exc, SharedStoreBusy):
                return CoordinationUnavailable()
            log.warning("the shared refresh store failed (%s); coalescing within this process only", exc)
            return self._call(refresh_token, scope)  # the only process on this store: coalescing here is complete

    def _call(self, refresh_token: str, scope: str | None) -> Outcome:
        REFRESHES.labels("upstream").inc()
        try:
            return self._refresh(refresh_token, scope)
        except BrokerError as exc:
            return exc

    def _lead_across_processes(self, key: FlightKey, refresh_token: str, scope: str | None, client: str) -> Outcome:
        shared = self._shared
        if self._prepare is not None:
            self._prepare()  # e.g. fetch the discovery document now, so it does not eat into the lease
        owner = os.urandom(16).hex()
        stored, claimed = shared.claim_unless_kept(key, owner)
        if stored is not None:  # another process's refresh of this token landed before this flight began
            return self._landed_elsewhere(stored, refresh_token, scope, client)
        if claimed:
            return self._grant_and_share(key, owner, refresh_token, scope, client)
        try:
            return self._wait_for_other_process(key, refresh_token, scope)
        except SharedStoreDown:
            # Another process holds the lead and may be spending the token: refreshing here could be a reuse.
            log.warning("Redis failed while waiting for another process's refresh of the same token")
            return CoordinationUnavailable()

    def _for_other_scope(self, outcome: Outcome, refresh_token: str, scope: str | None) -> Outcome:
        """The answer to a refresh whose token already has an outcome, for another scope."""
        if isinstance(outcome, TokenSet):
            return RefreshConflict()  # the token is spent: asking Keycloak again would be a reuse
        if isinstance(outcome, RefreshRejected):
            return outcome  # the token is dead whatever the scope
        return self._call(refresh_token, scope)  # nothing was spent (that scope was not allowed, say)

    def _for_other_client(self, refresh_token: str, scope: str | None) -> Outcome:
        """A landed refresh asked again by another client: Keycloak answers it (and sees a reuse, if it is one)."""
        REFRESHES.labels("other_client").inc()
        try:
            return self._refresh(refresh_token, scope)
        except BrokerError as exc:
            return exc

    def _landed_elsewhere(self, stored: Stored, refresh_token: str, scope: str | None, client: str) -> Outcome:
        """A kept outcome another process stored before this flight began: a late duplicate's answer."""
        if stored.scope != scope:
            return self._for_other_scope(stored.outcome, refresh_token, scope)
        if not stored.for_client(client):
            return self._for_other_client(refresh_token, scope)
        REFRESHES.labels("coalesced").inc()
        return stored.outcome

    def _joined(self, stored: Stored, refresh_token: str, scope: str | None) -> Outcome:
        """The outcome of another process's flight that was in the air with ours: shared with any client."""
        if stored.scope != scope:
            return self._for_other_scope(stored.outcome, refresh_token, scope)
        REFRESHES.labels("coalesced").inc()
        return stored.outcome

    def _wait_for_other_process(self, key: FlightKey, refresh_token: str, scope: str | None) -> Outcome:
        shared = self._shared
        deadline = self._clock() + shared.lease + 1.0
        while True:
            time.sleep(shared.poll_interval)
            stored = readable_outcome(lambda: shared.load(key))
            if stored is not None:
                return self._joined(stored, refresh_token, scope)
            if not shared.locked(key):
                # The other leader is gone without sharing an outcome (it crashed, or Redis failed under it).
                # It may have spent the token: refreshing it again here could be a reuse that ends the session.
                stored = readable_outcome(lambda: shared.load(key))
                if stored is not None:
                    return self._joined(stored, refresh_token, scope)
                log.warning("another process's refresh of the same token ended without an outcome")
                return AnswerLost()
            if self._clock() > deadline:
                log.warning("gave up waiting for another process's refresh of the same token")
                return UpstreamTimeout()

    def _grant_and_share(self, key: FlightKey, owner: str, refresh_token: str, scope: str | None,
                         client: str) -> Outcome:
        """As the cross-process leader: one Keycloak call, its outcome stored, then the lock released."""
        outcome = self._call(refresh_token, scope)
        sealed = Stored(outcome, scope, client)
        # From here on the token may be spent: a Redis failure must not make anyone refresh it again.
        try:
            self._shared.store_and_release(key, owner, sealed, self._grace)
        except SharedStoreDown:
            # Keep the lock, so nobody else refreshes, and keep trying to share the outcome in the background:
            # the other processes' callers of this token are waiting for it.
            log.warning("could not share a refresh outcome through Redis; retrying for the grace window")
            with self._lock:
                self._in_air += 1  # drain() waits for it too
            threading.Thread(target=self._share_later, args=(key, owner, sealed), name="refresh-share",
                             daemon=True).start()
        return outcome

    def _share_later(self, key: FlightKey, owner: str, sealed: Stored) -> None:
        """Store an outcome that could not be stored at once, trying past the breaker until the grace window ends."""
        try:
            self._keep_sharing(key, owner, sealed)
        finally:
            with self._lock:
                self._in_air -= 1
                self._landed.notify_all()

    def _keep_sharing(self, key: FlightKey, owner: str, sealed: Stored) -> None:
        deadline = self._clock() + self._grace
        while self._clock() < deadline:
            time.sleep(SHARE_RETRY_SECONDS)
            try:
                # The lock is released only with the outcome stored (a lock that cannot be released runs out with
                # its lease; the outcome is there for the waiters meanwhile).
                self._shared.store_and_release(key, owner, sealed, max(0.001, deadline - self._clock()), force=True)
            except SharedStoreDown:
                continue
            return
        log.warning("a refresh outcome could not be shared through Redis within the grace window")

    def _forget_expired(self) -> None:
        now = self._clock()
        while self._expiring and self._expiring[0][0] <= now:
            _, name, flight = self._expiring.popleft()
            if self._flights.get(name) is flight:
                del self._flights[name]


def _quietly(call: Callable[..., object], *args: object) -> None:
    try:
        call(*args)
    except SharedStoreDown:
        pass  # the lock's lease runs out by itself


class UncoalescedRefresh:
    """Every refresh goes to Keycloak on its own (BROKER_REFRESH_COALESCING=false; for tests and comparisons)."""

    def __init__(self, refresh: Refresh):
        self._refresh = refresh

    def refresh(self, refresh_token: str, scope: str | None = None, client: str = "") -> TokenSet:
        REFRESHES.labels("upstream").inc()
        return self._refresh(refresh_token, scope)

    def drain(self, timeout: float) -> bool:
        """Nothing runs on its own here: each refresh is its request's, which gunicorn lets finish."""
        return True


def _deliver(outcome: Outcome | None) -> TokenSet:
    if isinstance(outcome, TokenSet):
        return outcome
    if isinstance(outcome, BrokerError):
        # A copy per caller: threads must not share (and mutate) one exception object.
        duplicate = copy.copy(outcome)
        duplicate.headers = dict(outcome.headers)
        raise duplicate
    raise UpstreamError()
