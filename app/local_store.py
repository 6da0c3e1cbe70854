"""Refresh coordination between the broker's processes on one host, without Redis: a small SQLite file.

Without Redis, a refresh's outcome would live only in the memory of the worker process that made it. A
worker that is replaced (a reload with `kill -HUP`, a crash, `max_requests`) would take it along, and a
client retrying the same refresh token against the new worker would send a spent token to Keycloak, which
ends the session. `LocalOutcomes` keeps the same lock-and-sealed-outcome records as `RedisOutcomes`, in a
SQLite database in BROKER_STATE_DIR (a directory gunicorn's master creates for its workers, like the
metrics one), so every process of this instance, old or new, sees them.

It has RedisOutcomes' interface, so the coalescer's cross-process logic serves both. Records are named by
a keyed hash of the token and outcomes are sealed with a key derived from it (app.sessions), so the file
holds nothing usable without the token. SQLite errors (a full disk, say) raise SharedStoreDown.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

from app.sessions import SHARE_BRIEFLY_SECONDS, FlightKey, Outcome, keeps, seal, unseal
from app.shared_store import SharedStoreDown

T = TypeVar("T")
FILE_NAME = "refresh-outcomes.sqlite"
# Writers wait at most this long for another process's write (they are a few statements each).
BUSY_TIMEOUT_MS = 200


class LocalOutcomes:
    """Locks with a lease, and sealed outcomes with an expiry, shared by this host's broker processes."""

    def __init__(self, directory: str, *, lease: float, poll_interval: float = 0.02,
                 clock: Callable[[], float] = time.time):
        self.path = Path(directory) / FILE_NAME
        self.lease = lease
        self.poll_interval = poll_interval
        self.clock = clock  # wall time: the records are read by other processes
        # One connection per process, used under a lock: statements take microseconds, and under gevent a
        # connection per greenlet would mean one per refresh.
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pid: int | None = None
        self._run(self._create)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None or self._pid != os.getpid():  # a forked child opens its own
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")  # records live seconds; a host crash may lose them
            self._db, self._pid = db, os.getpid()
        return self._db

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            with self._lock:
                return work(self._connection())
        except sqlite3.Error as exc:
            raise SharedStoreDown(f"sqlite: {exc}") from None

    def close(self) -> None:
        """Close this process's connection (tests; a worker's ends with the process)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @staticmethod
    def _create(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, owner TEXT, pid INTEGER, expires REAL)")
        db.execute("CREATE TABLE IF NOT EXISTS outcomes (name TEXT PRIMARY KEY, blob BLOB, expires REAL)")

    def claim(self, key: FlightKey, owner: str) -> bool:
        """Take the lead for this refresh across this host's processes; False when another holds it."""

        def work(db: sqlite3.Connection) -> bool:
            now = self.clock()
            db.execute("BEGIN IMMEDIATE")
            try:
                self._drop_dead_lock(db, key, now)
                taken = db.execute("INSERT OR IGNORE INTO locks VALUES (?, ?, ?, ?)",
                                   (key.name, owner, os.getpid(), now + self.lease)).rowcount == 1
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return taken

        return self._run(work)

    def release(self, key: FlightKey, owner: str) -> None:
        """Drop the lock if it is still ours."""
        self._run(lambda db: db.execute("DELETE FROM locks WHERE name = ? AND owner = ?", (key.name, owner)))

    release_forced = release

    def store(self, key: FlightKey, outcome: Outcome, grace: float, *, force: bool = False) -> None:
        """Keep a sealed outcome for `grace` seconds (briefly, when it is not one to keep)."""
        ttl = grace if keeps(outcome) else min(grace, SHARE_BRIEFLY_SECONDS)
        blob = seal(key, outcome)

        def work(db: sqlite3.Connection) -> None:
            now = self.clock()
            db.execute("INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?)", (key.name, blob, now + ttl))
            db.execute("DELETE FROM outcomes WHERE expires <= ?", (now,))  # a few rows: refreshes of `grace` s

        self._run(work)

    def load(self, key: FlightKey) -> Outcome | None:
        """The outcome stored for this refresh, or None."""
        row = self._run(lambda db: db.execute("SELECT blob FROM outcomes WHERE name = ? AND expires > ?",
                                              (key.name, self.clock())).fetchone())
        return unseal(key, row[0]) if row is not None else None

    def locked(self, key: FlightKey) -> bool:
        """Whether a live process holds this refresh's lock."""

        def work(db: sqlite3.Connection) -> bool:
            self._drop_dead_lock(db, key, self.clock())
            return db.execute("SELECT 1 FROM locks WHERE name = ?", (key.name,)).fetchone() is not None

        return self._run(work)

    @staticmethod
    def _drop_dead_lock(db: sqlite3.Connection, key: FlightKey, now: float) -> None:
        """Remove the lock when its lease ran out or its process is gone (a killed worker's answer is lost
        anyway: waiting for its lease would only delay the retry)."""
        row = db.execute("SELECT pid, expires FROM locks WHERE name = ?", (key.name,)).fetchone()
        if row is not None and (row[1] <= now or not _alive(row[0])):
            db.execute("DELETE FROM locks WHERE name = ?", (key.name,))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive, not ours to judge
    return True
