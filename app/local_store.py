"""Refresh coordination between the broker's processes on one host, without Redis: a small SQLite file.

Without Redis, a refresh's outcome would live only in the memory of the worker process that made it. A
worker that is replaced (a reload with `kill -HUP`, a crash, `max_requests`) would take it along, and a
client retrying the same refresh token against the new worker would send a spent token to Keycloak, which
ends the session. `LocalOutcomes` keeps the same lock-and-sealed-outcome records as `RedisOutcomes`, in a
SQLite database in BROKER_STATE_DIR (a directory gunicorn's master creates for its workers, like the
metrics one), so every process of this instance, old or new, sees them.

It has the RedisOutcomes methods the coalescer calls (claim_unless_kept, store_and_release, load, locked), so
its cross-process logic serves both. Records are named by a keyed hash of the token and outcomes are sealed
with a key derived from it (app.refresh_coalescing), so the file holds nothing usable without the token.
SQLite errors (a full disk, say) raise SharedStoreDown.

A leader's flight costs two write transactions: `claim_unless_kept` (a kept outcome, else the lock) before the
Keycloak call and `store_and_release` after it. Each commit writes to the WAL and each trip through `_run`
costs a lock and a check of the file; as five separate trips (look, claim, look again, store, release) the
store took 0.3 ms of the 4 ms of CPU a refresh cost the running broker.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

from app.refresh_coalescing import SHARE_BRIEFLY_SECONDS, FlightKey, Stored, keeps, readable_outcome, seal, unseal
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

    def _connection(self, check_file: bool) -> sqlite3.Connection:
        """The open database; reopened after a fork and, with `check_file`, when the file was deleted or replaced
        (then recreated). The file check is a stat; the fork check, a getpid, is made every time: a connection
        must never be used in two processes."""
        if self._db is not None:
            if check_file:
                current = self._opened == self._identity()
            else:
                current = self._opened is not None and self._opened[0] == os.getpid()
            if current:
                return self._db
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
            # WITHOUT ROWID: a lock is one row in one b-tree (its name's), so taking or dropping it writes one page
            # to the WAL, not two (measured: a fifth less CPU for a leader's two transactions). A file made by an
            # earlier release keeps its rowid table: the statements are the same for both.
            db.execute("CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, owner TEXT, pid INTEGER, expires REAL)"
                       " WITHOUT ROWID")
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

    def _run(self, work: Callable[[sqlite3.Connection], T], *, write: bool = False, check_file: bool = True) -> T:
        """Run `work` on the database, with `write` in one IMMEDIATE transaction (rolled back if anything in it
        fails); raise SharedStoreBusy when another process keeps it locked, and SharedStoreDown when it cannot be
        used at all. Without `check_file` the open file is not compared with the one at the path (see callers)."""
        deadline = time.monotonic() + BUSY_WAIT_SECONDS
        with self._lock:
            while True:
                try:
                    db = self._connection(check_file)
                    if not write:
                        return work(db)
                    db.execute("BEGIN IMMEDIATE")
                    try:
                        result = work(db)
                        db.execute("COMMIT")
                    finally:
                        if db.in_transaction:  # work failed, or COMMIT did (SQLite may have rolled back already)
                            db.execute("ROLLBACK")
                    return result
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc):
                        raise SharedStoreDown(f"sqlite: {exc}") from None
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

    def claim_unless_kept(self, key: FlightKey, owner: str) -> tuple[Stored | None, bool]:
        """The kept outcome of this refresh, when another process stored one (no lock is taken then), or else
        whether this flight took the lead: (None, False) when another process holds it.

        One transaction: no outcome can be stored between the look and the claim, so there is no second look.
        An outcome found is opened inside it (a rare case: a late duplicate from another process), since
        whether to claim depends on what it says."""

        def work(db: sqlite3.Connection) -> tuple[Stored | None, bool]:
            now = self.clock()
            row = db.execute("SELECT blob FROM outcomes WHERE name = ? AND expires > ?", (key.name, now)).fetchone()
            if row is not None:
                stored = readable_outcome(lambda: unseal(key, row[0]), kept_only=True)
                if stored is not None:
                    return stored, False
            return None, self._take_lock(db, key, owner, now)

        return self._run(work, write=True)

    def claim(self, key: FlightKey, owner: str) -> bool:
        """Take the lead for this refresh across this host's processes whatever is stored; False when another
        holds it (tests plant locks with it)."""
        return self._run(lambda db: self._take_lock(db, key, owner, self.clock()), write=True)

    def store_and_release(self, key: FlightKey, owner: str, stored: Stored, grace: float, *,
                          force: bool = False) -> None:
        """Keep a sealed outcome for `grace` seconds (briefly, when it is not one to keep) and drop the lock if it
        is still ours (a lease that ran out may belong to someone else now), in one transaction: a waiter never
        sees the lock gone without the outcome.

        The first attempt, right after the claim, writes to the file the claim was made in without looking at the
        path again (what matters is where the lock is); a retry (`force`, from the coalescer's _share_later)
        looks, so a file deleted meanwhile is recreated."""
        ttl = grace if keeps(stored.outcome) else min(grace, SHARE_BRIEFLY_SECONDS)
        blob = seal(key, stored)

        def work(db: sqlite3.Connection) -> float | None:
            now = self.clock()
            db.execute("INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?)", (key.name, blob, now + ttl))
            db.execute("DELETE FROM locks WHERE name = ? AND owner = ?", (key.name, owner))
            if now - self._purged < PURGE_EVERY_SECONDS:
                return None
            db.execute("DELETE FROM outcomes WHERE expires <= ?", (now,))  # by the index: the expired rows only
            return now

        purged = self._run(work, write=True, check_file=force)
        if purged is not None:
            self._purged = purged  # once committed: a purge that was rolled back is made by the next store

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

    def _take_lock(self, db: sqlite3.Connection, key: FlightKey, owner: str, now: float) -> bool:
        """Within a write transaction: take the lock unless a live process holds it. A lock whose lease ran out or
        whose process is gone is taken over (a killed worker's answer is lost anyway: waiting for its lease would
        only delay the retry)."""
        lock = (key.name, owner, os.getpid(), now + self.lease)
        if db.execute("INSERT OR IGNORE INTO locks VALUES (?, ?, ?, ?)", lock).rowcount == 1:
            return True  # the usual case: nobody held it
        pid, expires = db.execute("SELECT pid, expires FROM locks WHERE name = ?", (key.name,)).fetchone()
        if expires > now and _alive(pid):
            return False
        db.execute("INSERT OR REPLACE INTO locks VALUES (?, ?, ?, ?)", lock)
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive, not ours to judge
    return True
