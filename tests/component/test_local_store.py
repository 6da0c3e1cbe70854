"""LocalOutcomes: refresh coordination between this host's processes in a SQLite file, without Redis."""

from __future__ import annotations

import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.errors import UpstreamTimeout, UpstreamUnavailable
from app.local_store import FILE_NAME, LocalOutcomes
from app.refresh_coalescing import FlightKey, RefreshCoalescer, Stored
from tests.support.answers import LOST, UNCOORDINATED
from tests.support.fake_refresh import TOKENS, Keycloak


def worker(keycloak: Keycloak, directory, *, wait: float = 30.0, lease: float = 5.0) -> RefreshCoalescer:
    """A coalescer with its own connection to the shared file, as one gunicorn worker process has."""
    return RefreshCoalescer(keycloak, grace=5, wait=wait, shared=LocalOutcomes(str(directory), lease=lease),
                            redis_required=False)


def test_identical_refreshes_in_several_workers_make_one_grant(tmp_path):
    """Four workers, five callers each, one token: one grant, twenty identical TokenSets."""
    keycloak = Keycloak()
    workers = [worker(keycloak, tmp_path) for _ in range(4)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda i: workers[i % 4].refresh("RT-MARKER-old"), range(20)))
    assert (keycloak.grants, results) == (1, [TOKENS] * 20)


def test_a_retry_on_a_new_worker_gets_the_old_workers_answer(tmp_path):
    """A reload: the caller gave up on the old worker, whose flight lands; the retry on the new one gets its
    tokens, and Keycloak saw one grant."""
    keycloak = Keycloak(delay=0.4)
    old = worker(keycloak, tmp_path, wait=0.1)
    with pytest.raises(UpstreamTimeout):
        old.refresh("rt")
    new = worker(keycloak, tmp_path)  # joins while the old flight is still in the air
    assert new.refresh("rt") == TOKENS
    assert old.drain(timeout=2)
    assert worker(keycloak, tmp_path).refresh("rt") == TOKENS  # and later, from the stored outcome
    assert keycloak.grants == 1


def test_a_dead_workers_lock_holds_only_until_its_lease_ends(tmp_path):
    """A lock left by a killed worker: waiters answer 503 once its lease ends; the next attempt refreshes."""
    keycloak = Keycloak(delay=0)
    store = LocalOutcomes(str(tmp_path), lease=0.3)
    assert store.claim(FlightKey.of("rt"), "killed-worker")
    with pytest.raises(UpstreamUnavailable) as waited:
        worker(keycloak, tmp_path, lease=0.3).refresh("rt")
    assert (waited.value.message, keycloak.grants) == (LOST["message"], 0)
    assert worker(keycloak, tmp_path, lease=0.3).refresh("rt") == TOKENS


def test_the_file_holds_nothing_usable_without_the_token(tmp_path):
    """Names are hashes and outcomes ciphertext: no token, old or new, is in the database file."""
    worker(Keycloak(delay=0), tmp_path).refresh("RT-MARKER-old")
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(FILE_NAME))
    assert data and b"MARKER" not in data and b"openid" not in data


def test_outcomes_expire_after_the_grace_window(tmp_path):
    """Past the grace window the stored outcome is gone and a refresh asks Keycloak again."""
    keycloak = Keycloak(delay=0)
    now = [1000.0]
    store = LocalOutcomes(str(tmp_path), lease=5, clock=lambda: now[0])
    coalescer = RefreshCoalescer(keycloak, grace=5, shared=store, redis_required=False,
                                 clock=lambda: now[0] - 1000.0)
    coalescer.refresh("rt")
    now[0] += 6
    coalescer.refresh("rt")
    assert keycloak.grants == 2


def test_a_lock_whose_process_is_gone_is_taken_over_at_once(tmp_path):
    """A worker killed mid-refresh leaves its lock: the next refresh does not wait for the lease, it refreshes."""
    keycloak = Keycloak(delay=0)
    store = LocalOutcomes(str(tmp_path), lease=60)
    assert store.claim(FlightKey.of("rt"), "killed-worker")
    gone = subprocess.Popen(["true"])  # a process that has exited: its pid names nobody now
    gone.wait()
    db = sqlite3.connect(store.path)
    with db:
        db.execute("UPDATE locks SET pid = ?", (gone.pid,))
    db.close()
    assert worker(keycloak, tmp_path, lease=60).refresh("rt") == TOKENS
    assert keycloak.grants == 1


def test_a_fault_shared_with_waiters_is_not_taken_up_by_the_next_refresh(tmp_path):
    """A 503 stored briefly for the waiting processes: a retry right after it asks Keycloak again."""
    keycloak = Keycloak(outcome=UpstreamUnavailable(), delay=0)
    with pytest.raises(UpstreamUnavailable):
        worker(keycloak, tmp_path).refresh("rt")
    keycloak.outcome = TOKENS
    assert worker(keycloak, tmp_path).refresh("rt") == TOKENS
    assert keycloak.grants == 2


def test_a_deleted_state_directory_is_recreated_and_never_stops_the_broker(tmp_path):
    """The directory removed under a running worker (a /tmp clean-up): the next refresh recreates it and works."""
    import shutil

    keycloak = Keycloak(delay=0)
    directory = tmp_path / "state"
    directory.mkdir()
    coalescer = worker(keycloak, directory)
    assert coalescer.refresh("rt-1") == TOKENS
    shutil.rmtree(directory)
    assert worker(keycloak, directory).refresh("rt-2") == TOKENS  # a new worker starting now
    assert coalescer.refresh("rt-3") == TOKENS  # and the old one reopens the new file
    assert (directory / FILE_NAME).exists() and keycloak.grants == 3


def test_a_file_that_is_not_a_database_is_replaced(tmp_path):
    """A torn or foreign file where the store should be: it is set aside and refreshes go on coordinated."""
    (tmp_path / FILE_NAME).write_bytes(b"not a database" * 100)
    keycloak = Keycloak(delay=0)
    assert worker(keycloak, tmp_path).refresh("rt") == TOKENS
    assert worker(keycloak, tmp_path).refresh("rt") == TOKENS  # the stored outcome, from the new file
    assert keycloak.grants == 1


def test_a_store_kept_locked_by_another_process_answers_503_never_refreshes_alone(tmp_path, monkeypatch):
    """Another process holding the write lock is alive and coordinating: 503 after a short wait, no grant."""
    import app.local_store as local_store

    monkeypatch.setattr(local_store, "BUSY_WAIT_SECONDS", 0.1)
    keycloak = Keycloak(delay=0)
    coalescer = worker(keycloak, tmp_path)
    coalescer.refresh("warm-up")  # the file exists and is open
    other = sqlite3.connect(tmp_path / FILE_NAME, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(UpstreamUnavailable) as refused:
            coalescer.refresh("rt")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert (refused.value.message, keycloak.grants) == (UNCOORDINATED["message"], 1)


def test_looking_at_a_stale_lock_never_removes_a_lock_taken_meanwhile(tmp_path):
    """locked() only reads: a waiter judging an expired lock cannot delete the lock another process took since."""
    now = [100.0]
    store = LocalOutcomes(str(tmp_path), lease=1, clock=lambda: now[0])
    key = FlightKey.of("rt")
    assert store.claim(key, "first")
    now[0] += 2  # the first lease ran out
    assert store.locked(key) is False
    assert store.claim(key, "second")  # another process takes it over
    assert store.locked(key) is True


def lock_rows(store: LocalOutcomes) -> list[tuple]:
    """The locks table as another process would read it: (owner, pid) of every lock."""
    db = sqlite3.connect(store.path)
    try:
        return db.execute("SELECT owner, pid FROM locks ORDER BY owner").fetchall()
    finally:
        db.close()


def test_a_claim_that_finds_a_kept_outcome_returns_it_and_takes_no_lock(tmp_path):
    """Another process's kept outcome: claim_unless_kept hands it over and leaves no lock behind."""
    store = LocalOutcomes(str(tmp_path), lease=5)
    key = FlightKey.of("rt")
    assert store.claim_unless_kept(key, "leader") == (None, True)
    store.store_and_release(key, "leader", Stored(TOKENS, "openid", "browser-a"), grace=5)
    assert store.claim_unless_kept(key, "late-duplicate") == (Stored(TOKENS, "openid", "browser-a"), False)
    assert (lock_rows(store), store.locked(key)) == ([], False)


def test_a_claim_past_a_fault_shared_briefly_takes_the_lock(tmp_path):
    """A fault stored for the waiters says nothing of the token: the next claim takes the lead, not the fault."""
    import os

    store = LocalOutcomes(str(tmp_path), lease=5)
    key = FlightKey.of("rt")
    assert store.claim_unless_kept(key, "leader") == (None, True)
    store.store_and_release(key, "leader", Stored(UpstreamUnavailable()), grace=5)
    assert store.claim_unless_kept(key, "retry") == (None, True)
    assert lock_rows(store) == [("retry", os.getpid())]


def test_a_claim_while_a_live_process_holds_the_lock_takes_nothing(tmp_path):
    """The lock of a live process within its lease: no outcome, no lead, and the lock is still its owner's."""
    import os

    store = LocalOutcomes(str(tmp_path), lease=5)
    key = FlightKey.of("rt")
    assert store.claim_unless_kept(key, "leader") == (None, True)
    assert store.claim_unless_kept(key, "other") == (None, False)
    assert lock_rows(store) == [("leader", os.getpid())]


def test_store_and_release_leaves_the_outcome_and_frees_the_lock(tmp_path):
    """After the leader's store_and_release another process reads the outcome and finds no lock."""
    store = LocalOutcomes(str(tmp_path), lease=5)
    key = FlightKey.of("rt")
    assert store.claim_unless_kept(key, "leader") == (None, True)
    assert store.locked(key) is True
    store.store_and_release(key, "leader", Stored(TOKENS, None, "browser-a"), grace=5)
    other = LocalOutcomes(str(tmp_path), lease=5)
    assert (other.load(key), other.locked(key), lock_rows(store)) == (Stored(TOKENS, None, "browser-a"), False, [])


def test_store_and_release_never_frees_a_lock_taken_over_by_another_owner(tmp_path):
    """A leader whose lease ran out (and was taken over) stores its outcome, but the new owner's lock stays."""
    import os

    now = [100.0]
    store = LocalOutcomes(str(tmp_path), lease=1, clock=lambda: now[0])
    key = FlightKey.of("rt")
    assert store.claim_unless_kept(key, "first") == (None, True)
    now[0] += 2  # the first lease ran out
    assert store.claim_unless_kept(key, "second") == (None, True)
    store.store_and_release(key, "first", Stored(TOKENS), grace=5)
    assert (store.load(key), lock_rows(store), store.locked(key)) == (Stored(TOKENS), [("second", os.getpid())], True)


def test_a_retried_store_after_the_file_was_deleted_goes_to_the_new_file(tmp_path):
    """The state directory removed while a flight held the lock: the retried store (force, from _share_later)
    recreates the file and the outcome is there for every process."""
    import shutil

    directory = tmp_path / "state"
    store = LocalOutcomes(str(directory), lease=5)
    key = FlightKey.of("rt")
    assert store.claim_unless_kept(key, "leader") == (None, True)
    shutil.rmtree(directory)
    store.store_and_release(key, "leader", Stored(TOKENS), grace=5, force=True)
    assert LocalOutcomes(str(directory), lease=5).load(key) == Stored(TOKENS)


def test_a_connection_is_never_used_across_a_fork_even_right_after_a_claim(tmp_path, monkeypatch):
    """The store after a claim skips the file check, not the process check: in another process it reopens."""
    import app.local_store as local_store

    store = LocalOutcomes(str(tmp_path), lease=5)
    key = FlightKey.of("rt")
    assert store.claim_unless_kept(key, "leader") == (None, True)
    inherited = store._db
    monkeypatch.setattr(local_store.os, "getpid", lambda: 1)  # as in a child forked since the claim
    store.store_and_release(key, "leader", Stored(TOKENS), grace=5)
    assert (store._db is inherited, store._opened[0], store.load(key)) == (False, 1, Stored(TOKENS))
