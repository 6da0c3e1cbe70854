"""Sessions that Keycloak ended (OpenID Connect Back-Channel Logout): remembered so /me and /verify refuse
their access tokens at once, with no call to Keycloak per request.

`EndedSessions.end` records a Keycloak session id (`sid`), or a subject (`sub`) when the logout token names
no session (then every session of that user counts as ended, up to the moment of the logout), for
BROKER_ENDED_SESSION_SECONDS: longer than any access token of the realm lives, in this process (bounded).
With Redis, every worker and instance learns it from the one that Keycloak called: `end` appends it to a Redis
Stream, which every process reads into its memory at most every `sync_seconds` (0.5 s).
`ended(claims)` is a local lookup: a dictionary in memory; at most once per `sync_seconds` one lookup also reads
the stream (behind the circuit breaker of app/shared_store.py: while Redis is out, what is in memory stands, so
an outage refuses no valid token, and at most one lookup per interval, or per breaker trial once the breaker is
open, waits for Redis, never longer than BROKER_REDIS_TIMEOUT).

`UsedLogoutTokens` remembers the `jti` of the logout tokens accepted, so a replayed one is refused (the same
store: Redis when there is one, else this process).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

from app.shared_store import SharedStore, SharedStoreDown

log = logging.getLogger(__name__)


class EndedSessions:
    """Session ids and subjects whose sessions ended, each with the time it ended, for `ttl` seconds.

    Every process answers `ended()` from its own memory. With Redis, `end()` also appends the ended key to a
    Redis Stream, and each process reads what others appended since its last read, at most every
    `sync_seconds`, on the first lookup after that interval (one XRANGE; concurrent lookups do not wait for it,
    they answer from memory meanwhile). So a logout that Keycloak told one process reaches every other process
    within about `sync_seconds`, and /verify pays one Redis call per interval and process, not per request.
    """

    STREAM = "token-broker:ended-sessions"
    BATCH = 10_000  # entries read per sync; a fresh process with a longer backlog reads on at the next lookups

    def __init__(self, store: SharedStore | None, *, ttl: float, max_entries: int = 200_000,
                 sync_seconds: float = 0.5, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self._store = store
        self._ttl = ttl
        self._max_entries = max_entries
        self._sync_seconds = sync_seconds
        self._clock = clock
        self._monotonic = monotonic
        self._local: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (ended at, forget at)
        self._lock = threading.Lock()
        self._syncing = threading.Lock()
        self._synced_at = float("-inf")
        self._cursor: str | None = None  # the next stream id to read; None until the first sync

    @staticmethod
    def _key(kind: str, value: str) -> str:
        return kind + ":" + hashlib.sha256(f"token-broker/ended\x00{kind}\x00{value}".encode()).hexdigest()

    def end(self, *, sid: str | None = None, sub: str | None = None) -> None:
        """Remember that the session `sid` (or, without one, every session of `sub` so far) has ended."""
        now = self._clock()
        for kind, value in (("sid", sid), ("sub", sub if not sid else None)):
            if value:
                key = self._key(kind, value)
                self._remember(key, now)  # this process refuses the session's tokens at once
                self._share(key, now)

    def ended(self, claims: dict[str, Any]) -> bool:
        """Whether the access token with these claims belongs to a session that has ended (a lookup in memory)."""
        self._sync_if_due()
        sid, sub, issued = claims.get("sid"), claims.get("sub"), claims.get("iat")
        if isinstance(sid, str) and self._lookup(self._key("sid", sid)) is not None:
            return True
        if isinstance(sub, str):
            ended_at = self._lookup(self._key("sub", sub))
            return ended_at is not None and (not isinstance(issued, (int, float)) or issued <= ended_at)
        return False

    def _share(self, key: str, ended_at: float) -> None:
        if self._store is None:
            return
        try:
            self._store.call(lambda r: r.xadd(self.STREAM, {"k": key, "t": repr(ended_at)},
                                              maxlen=self._max_entries, approximate=True), force=True)
        except SharedStoreDown:
            log.warning("could not share an ended session through Redis; only this process refuses its tokens")

    def _sync_if_due(self) -> None:
        """Read what other processes ended since the last read, at most every sync_seconds; never wait on another."""
        if self._store is None or self._monotonic() - self._synced_at < self._sync_seconds:
            return
        if not self._syncing.acquire(blocking=False):
            return  # another request is reading right now
        try:
            if self._monotonic() - self._synced_at < self._sync_seconds:
                return
            self._synced_at = self._monotonic()  # a failed read is not retried before the next interval either
            start = self._cursor or f"{max(0, int((self._clock() - self._ttl) * 1000))}-0"
            try:
                entries = self._store.call(lambda r: r.xrange(self.STREAM, min=start, count=self.BATCH))
            except SharedStoreDown:
                return  # an outage must not refuse valid tokens, nor hold requests up: go on with what is in memory
            for entry_id, fields in entries:
                try:
                    key, ended_at = fields[b"k"].decode(), float(fields[b"t"])
                except (KeyError, ValueError, UnicodeDecodeError):
                    continue  # not ours
                if ended_at + self._ttl > self._clock():
                    self._remember(key, ended_at)
            if entries:
                self._cursor = _next_id(entries[-1][0])
            if len(entries) >= self.BATCH:
                self._synced_at = float("-inf")  # more to read: the next lookup goes on
        finally:
            self._syncing.release()

    def _remember(self, key: str, ended_at: float) -> None:
        with self._lock:
            known = self._local.get(key)
            if known is not None and known[0] >= ended_at:
                return
            self._local[key] = (ended_at, ended_at + self._ttl)
            self._local.move_to_end(key)
            while len(self._local) > self._max_entries:
                self._local.popitem(last=False)

    def _lookup(self, key: str) -> float | None:
        with self._lock:
            entry = self._local.get(key)
            if entry is not None and entry[1] <= self._clock():
                del self._local[key]
                entry = None
        return entry[0] if entry is not None else None


def _next_id(entry_id: bytes | str) -> str:
    """The smallest stream id after `entry_id` (XRANGE's exclusive "(" start needs Redis 6.2)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    milliseconds, _, sequence = text.partition("-")
    return f"{milliseconds}-{int(sequence or 0) + 1}"


class UsedLogoutTokens:
    """The `jti` of every logout token accepted, each kept until the token could no longer be accepted anyway.

    In Redis when there is one (SET NX: of two workers or instances given the same token, one wins), else in
    this process (bounded, the oldest going first). While Redis is out, this process remembers on its own.
    Only tokens that passed every other check get here, so only the realm can fill it.
    """

    PREFIX = "token-broker:logout-jti:"

    def __init__(self, store: SharedStore | None, *, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.time):
        self._store = store
        self._max_entries = max_entries
        self._clock = clock
        self._local: OrderedDict[str, float] = OrderedDict()  # key -> forget at
        self._lock = threading.Lock()

    def first_use(self, jti: str, until: float) -> bool:
        """Record `jti` as used until `until` (epoch seconds); False when it was recorded before."""
        key = hashlib.sha256(f"token-broker/logout-jti\x00{jti}".encode()).hexdigest()
        now = self._clock()
        with self._lock:
            forget_at = self._local.get(key)
            if forget_at is not None and forget_at > now:
                return False  # remembered here during a Redis outage
        if self._store is not None:
            ttl_ms = max(1000, int((until - now) * 1000))
            try:
                return bool(self._store.call(lambda r: r.set(self.PREFIX + key, "1", nx=True, px=ttl_ms), force=True))
            except SharedStoreDown:
                log.warning("could not record a logout token's jti in Redis; only this process refuses its replay")
        with self._lock:
            forget_at = self._local.get(key)
            if forget_at is not None and forget_at > now:
                return False
            self._local[key] = until
            self._local.move_to_end(key)
            while len(self._local) > self._max_entries:
                self._local.popitem(last=False)
            return True
