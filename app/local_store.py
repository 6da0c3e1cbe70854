"""Refresh coordination between the broker's processes on one host, without Redis: a small SQLite file.

Without Redis, a refresh's outcome would live only in the memory of the worker process that made it. A
worker that is replaced (a reload with `kill -HUP`, a crash, `max_requests`) would take it along, and a
client retrying the same refresh token against the new worker would send a spent token to Keycloak, which
ends the session. `LocalOutcomes` keeps the same lock-and-sealed-outcome records as `RedisOutcomes`, in a
SQLite database in BROKER_STATE_DIR (a directory gunicorn's master creates for its workers, like the
metrics one), so every process of this instance, old or new, sees them.

It has RedisOutcomes' interface, so the coalescer's cross-process logic serves both. Records are named by
a keyed hash of the token and outcomes are sealed with a key derived from it (app.refresh_coalescing), so the file
holds nothing usable without the token. SQLite errors (a full disk, say) raise SharedStoreDown.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

from app.refresh_coalescing import SHARE_BRIEFLY_SECONDS, FlightKey, Stored, keeps, seal, unseal
from app.shared_store import SharedStoreBusy, SharedStoreDown

log = logging.getLogger(__name__)
T = TypeVar("T")
FILE_NAME = "refresh-outcomes.sqlite"
# Writers wait at most this long for another process's write (they are a few statements each).
# A write waits for another process's write by retrying in Python (time.sleep yields under gevent; SQLite's own
# busy handler would sleep in C and freeze the worker), for at most this long; then the refresh answers 503.
BUSY_WAIT_SECONDS = 0.5
BUSY_RETRY_SECONDS = 0.01
# Expired outcomes are deleted by the next store at most this often (loads ignore them meanwhile).
PURGE_EVERY_SECONDS = 1.0


def _boot_id() -> str:
    """This boot of the host: records of an earlier boot (a persistent BROKER_STATE_DIR) are dropped."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


class LocalOutcomes:
    """Locks with a lease, and sealed outcomes with an expiry, shared by this host's broker processes.

    BROKER_STATE_DIR must be on a local filesystem and used by one instance only: liveness is judged by
    process id, and times are CLOCK_MONOTONIC, which all processes of one boot share (an NTP step cannot
    stretch or cut a lease).
    """

    def __init__(self, directory: str, *, lease: float, poll_interval: float = 0.02,
                 clock: Callable[[], float] = time.monotonic):
        self.directory = Path(directory)
        self.path = self.directory / FILE_NAME
        self.lease = lease
        self.poll_interval = poll_interval
        self.clock = clock
        # One connection per process, used under a lock: statements take microseconds, and under gevent a
        # connection per greenlet would mean one per refresh.
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._opened: tuple[int, int, int] | None = None  # (pid, device, inode) of the open file
        self._purged = float("-inf")

    def _connection(self) -> sqlite3.Connection:
        """The open database; reopened (and recreated) after a fork, or when the file was deleted or replaced."""
        if self._db is not None and self._opened == self._identity():
            return self._db
        if self._db is not None:
            self._db.close()
            self._db = None
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            db = self._open()
        except sqlite3.DatabaseError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise
            # Not a database any more (a torn write, say): its records live seconds, start afresh.
            log.warning("the local refresh store %s is unusable (%s); starting a new one", self.path, exc)
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            db = self._open()
        self._db, self._opened = db, self._identity()
        return db

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # in WAL mode: no fsync per write, and no corruption
            db.execute("BEGIN IMMEDIATE")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            db.execute("CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, owner TEXT, pid INTEGER, expires REAL)")
            db.execute("CREATE TABLE IF NOT EXISTS outcomes (name TEXT PRIMARY KEY, blob BLOB, expires REAL)")
            # Without it the purge reads every row, blobs and all (`expires` comes after the blob in a row).
            db.execute("CREATE INDEX IF NOT EXISTS outcomes_by_expiry ON outcomes (expires)")
            boot = _boot_id()
            row = db.execute("SELECT value FROM meta WHERE key = 'boot'").fetchone()
            if row is None or row[0] != boot:  # monotonic times of another boot mean nothing
                db.execute("DELETE FROM locks")
                db.execute("DELETE FROM outcomes")
                db.execute("INSERT OR REPLACE INTO meta VALUES ('boot', ?)", (boot,))
            db.execute("COMMIT")
        except BaseException:
            db.close()
            raise
        return db

    def _identity(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return os.getpid(), stat.st_dev, stat.st_ino

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` on the database; raise SharedStoreBusy when another process keeps it locked, and
        SharedStoreDown when it cannot be used at all."""
        deadline = time.monotonic() + BUSY_WAIT_SECONDS
        with self._lock:
            while True:
                try:
                    return work(self._connection())
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc):
                        raise SharedStoreDown(f"sqlite: {exc}") from None
                    if self._db is not None and self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    if time.monotonic() >= deadline:
                        raise SharedStoreBusy(f"sqlite: {exc}") from None
                    time.sleep(BUSY_RETRY_SECONDS)
                except (sqlite3.Error, OSError) as exc:
                    raise SharedStoreDown(f"sqlite: {exc}") from None

    def close(self) -> None:
        """Close this process's connection (tests; a worker's ends with the process)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

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

    def store(self, key: FlightKey, stored: Stored, grace: float, *, force: bool = False) -> None:
        """Keep a sealed outcome for `grace` seconds (briefly, when it is not one to keep)."""
        ttl = grace if keeps(stored.outcome) else min(grace, SHARE_BRIEFLY_SECONDS)
        blob = seal(key, stored)

        def work(db: sqlite3.Connection) -> None:
            now = self.clock()
            db.execute("INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?)", (key.name, blob, now + ttl))
            if now - self._purged >= PURGE_EVERY_SECONDS:
                db.execute("DELETE FROM outcomes WHERE expires <= ?", (now,))  # by the index: the expired rows only
                self._purged = now

        self._run(work)

    def load(self, key: FlightKey) -> Stored | None:
        """The outcome stored for this refresh, or None."""
        row = self._run(lambda db: db.execute("SELECT blob FROM outcomes WHERE name = ? AND expires > ?",
                                              (key.name, self.clock())).fetchone())
        return unseal(key, row[0]) if row is not None else None

    def locked(self, key: FlightKey) -> bool:
        """Whether a live process holds this refresh's lock (read only: stale locks are removed by claim)."""
        row = self._run(lambda db: db.execute("SELECT pid, expires FROM locks WHERE name = ?",
                                              (key.name,)).fetchone())
        return row is not None and row[1] > self.clock() and _alive(row[0])

    @staticmethod
    def _drop_dead_lock(db: sqlite3.Connection, key: FlightKey, now: float) -> None:
        """Within claim's transaction: remove the lock when its lease ran out or its process is gone (a killed
        worker's answer is lost anyway: waiting for its lease would only delay the retry)."""
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
