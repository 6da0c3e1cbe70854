"""RefreshCoalescer across processes through a real Redis, and what Redis holds: nothing usable without the token.

Also a Redis that refuses connections (a closed port) or swallows them (a loopback server that never answers).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from app.errors import BrokerError, RefreshConflict, RefreshRejected, UpstreamUnavailable
from app.refresh_coalescing import FlightKey, RedisOutcomes, RefreshCoalescer
from app.shared_store import SharedStore, SharedStoreDown
from tests.support.answers import UNCOORDINATED
from tests.support.fake_refresh import TOKENS, Keycloak


@pytest.fixture
def redis_client(redis_url):
    """A client of the session's Redis, emptied before each test."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    return client


def processes(keycloak: Keycloak, redis_client, count: int, grace: float = 5.0) -> list[RefreshCoalescer]:
    """`count` coalescers that share only Redis, as separate gunicorn workers or instances would."""
    return [RefreshCoalescer(keycloak, grace=grace, shared=RedisOutcomes(SharedStore(redis_client, retry_seconds=0.1), lease=5.0))
            for _ in range(count)]


def test_identical_refreshes_in_several_processes_make_one_grant(redis_client):
    """Four processes, five threads each, one token: one grant, twenty identical TokenSets."""
    keycloak = Keycloak()
    coalescers = processes(keycloak, redis_client, 4)
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda i: coalescers[i % 4].refresh("RT-MARKER-old"), range(20)))
    assert keycloak.grants == 1
    assert results == [TOKENS] * 20


def test_a_refusal_is_shared_across_processes(redis_client):
    """When the one grant is refused, every process raises the same refusal."""
    keycloak = Keycloak(outcome=RefreshRejected("Session has ended"))
    coalescers = processes(keycloak, redis_client, 3)

    def attempt(i):
        try:
            coalescers[i % 3].refresh("RT-MARKER-old")
        except BrokerError as exc:  # read back from Redis, a refusal keeps status, code and message
            return (exc.status, exc.error, exc.message)

    with ThreadPoolExecutor(max_workers=9) as pool:
        results = list(pool.map(attempt, range(9)))
    assert keycloak.grants == 1
    assert results == [(400, "invalid_grant", "Session has ended")] * 9


def test_redis_holds_nothing_usable_without_the_token(redis_client):
    """Keys are hashes, values are ciphertext: no token, old or new, appears anywhere in Redis."""
    processes(Keycloak(delay=0), redis_client, 1)[0].refresh("RT-MARKER-old")
    dump = b"".join(key + (redis_client.get(key) or b"") for key in redis_client.keys("*"))
    assert dump, "the outcome should be in Redis during the grace window"
    assert b"MARKER" not in dump and b"openid" not in dump


def test_outcomes_expire_after_the_grace_window(redis_client):
    """After the grace window a refresh with the same token goes to Keycloak again."""
    keycloak = Keycloak(delay=0)
    coalescer = processes(keycloak, redis_client, 1, grace=0.2)[0]
    coalescer.refresh("rt")
    coalescer.refresh("rt")
    time.sleep(0.3)
    coalescer.refresh("rt")
    assert keycloak.grants == 2


def test_a_crashed_leader_blocks_others_only_until_its_lease_ends(redis_client):
    """A lock left by a dead process: waiters answer 503 once its lease runs out (it may have spent the token);
    the client's next attempt finds no lock and refreshes."""
    keycloak = Keycloak(delay=0)
    shared = RedisOutcomes(SharedStore(redis_client, retry_seconds=0.1), lease=0.3)
    assert shared.claim(FlightKey.of("rt"), "dead-process")
    coalescer = RefreshCoalescer(keycloak, grace=5, shared=shared)
    started = time.monotonic()
    with pytest.raises(BrokerError) as waited:
        coalescer.refresh("rt")
    assert (waited.value.status, keycloak.grants) == (503, 0)
    assert 0.2 < time.monotonic() - started < 2
    # The next attempt (here from another process, whose memo does not hold the shared 503) refreshes.
    assert RefreshCoalescer(keycloak, grace=5, shared=shared).refresh("rt") == TOKENS
    assert keycloak.grants == 1


def test_an_unreachable_redis_degrades_to_in_process_coalescing_for_a_single_instance():
    """The only broker process on its Redis (BROKER_SINGLE_INSTANCE): with Redis down, refreshes still work
    and still coalesce within the process."""
    keycloak = Keycloak(delay=0.2)
    dead = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    coalescer = RefreshCoalescer(keycloak, grace=5, shared=RedisOutcomes(SharedStore(dead, retry_seconds=0.1), lease=5.0),
                                 redis_required=False)
    with ThreadPoolExecutor(max_workers=5) as pool:
        results = list(pool.map(lambda _: coalescer.refresh("rt"), range(5)))
    assert results == [TOKENS] * 5 and keycloak.grants == 1


class _FailingStore(RedisOutcomes):
    """Redis that takes the lock but fails when the outcome is stored, and when the lock is released."""

    def store(self, key, outcome, grace, **kwargs):
        raise SharedStoreDown("lost Redis after the grant")

    def release(self, key, owner):
        raise SharedStoreDown("still lost")


def test_redis_failing_after_the_grant_never_causes_a_second_grant(redis_client):
    """Once Keycloak has answered, a Redis failure is logged and the outcome returned: no second refresh."""
    keycloak = Keycloak(delay=0)
    coalescer = RefreshCoalescer(keycloak, grace=5, shared=_FailingStore(SharedStore(redis_client, retry_seconds=0.1), lease=5.0))
    assert coalescer.refresh("rt") == TOKENS
    assert keycloak.grants == 1


class _StoreFailsOnce(RedisOutcomes):
    """Redis whose first attempt to store an outcome fails (a reconnect, say); everything else works."""

    failed = False

    def store(self, key, outcome, grace, **kwargs):
        if not _StoreFailsOnce.failed:
            _StoreFailsOnce.failed = True
            raise SharedStoreDown("blip")
        super().store(key, outcome, grace, **kwargs)


def test_an_outcome_redis_refused_once_still_reaches_the_other_process(redis_client):
    """The leader's first store fails: it keeps the lock and stores again, and the waiting process gets the tokens."""
    keycloak = Keycloak(delay=0.2)
    coalescers = [RefreshCoalescer(keycloak, grace=5, shared=_StoreFailsOnce(SharedStore(redis_client, retry_seconds=0.1), lease=0.6))
                  for _ in range(2)]

    def attempt(i):
        try:
            return coalescers[i].refresh("rt")
        except BrokerError as exc:
            return exc.status

    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(attempt, 0)
        time.sleep(0.05)
        second = pool.submit(attempt, 1)
        results = [first.result(), second.result()]
    assert keycloak.grants == 1
    assert results == [TOKENS, TOKENS]


class _Blackhole:
    """A TCP port that accepts connections and never answers, like a Redis behind a dropped route."""

    def __init__(self):
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def close(self):
        self.sock.close()


def test_a_blackholed_redis_costs_a_few_timeouts_then_nothing_while_the_breaker_is_open():
    """Redis that never answers: each call waits one socket timeout until three failed, then Redis is skipped at once."""
    hole = _Blackhole()
    try:
        store = SharedStore.from_url(f"redis://127.0.0.1:{hole.port}/0", timeout=0.2, retry_seconds=30)
        keycloak = Keycloak(delay=0)
        coalescer = RefreshCoalescer(keycloak, grace=5, shared=RedisOutcomes(store, lease=5.0), redis_required=False)
        timings = []
        for i in range(5):
            started = time.monotonic()
            assert coalescer.refresh(f"rt-{i}") == TOKENS
            timings.append(time.monotonic() - started)
        assert all(t < 1.0 for t in timings[:3]) and all(t < 0.1 for t in timings[3:]), timings
        assert not store.available and keycloak.grants == 5
        store.redis.close()
    finally:
        hole.close()


def test_a_redis_outage_answers_503_rather_than_refresh_uncoordinated():
    """Other processes may share the Redis (the default): an outage must not let a refresh through uncoordinated."""
    keycloak = Keycloak(delay=0)
    dead = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    coalescer = RefreshCoalescer(keycloak, grace=5, shared=RedisOutcomes(SharedStore(dead, retry_seconds=5), lease=5))
    with pytest.raises(UpstreamUnavailable) as refused:
        coalescer.refresh("rt")
    assert (refused.value.status, refused.value.message, keycloak.grants) == (503, UNCOORDINATED["message"], 0)


class _FailsAfterClaim(RedisOutcomes):
    """Redis that goes away right after another process took the lead."""

    def claim(self, key, owner):
        return False

    def load(self, key):
        if getattr(self, "looked", False):
            raise SharedStoreDown("gone")
        self.looked = True
        return None


def test_redis_failing_while_another_process_leads_never_refreshes_here(redis_client):
    """Another process holds the lead when Redis fails: answer 503 instead of spending the token a second time."""
    keycloak = Keycloak(delay=0)
    shared = _FailsAfterClaim(SharedStore(redis_client, retry_seconds=5), lease=5.0)
    coalescer = RefreshCoalescer(keycloak, grace=5, shared=shared)
    with pytest.raises(UpstreamUnavailable) as refused:
        coalescer.refresh("rt")
    assert (refused.value.message, keycloak.grants) == (UNCOORDINATED["message"], 0)


def test_redis_commands_run_side_by_side_not_one_at_a_time(redis_client):
    """The breaker guards its state only: twenty slow commands from twenty threads overlap."""
    store = SharedStore(redis_client, retry_seconds=5)

    def slow(_):
        return store.call(lambda r: time.sleep(0.1) or r.ping())

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=20) as pool:
        assert list(pool.map(slow, range(20))) == [True] * 20
    assert time.monotonic() - started < 1.0


def test_across_processes_a_landed_outcome_goes_only_to_the_same_client(redis_client):
    """Through Redis too: the same client gets the kept tokens, another client is sent to Keycloak."""
    keycloak = Keycloak(delay=0)
    first, second = processes(keycloak, redis_client, 2)
    assert first.refresh("RT-MARKER-old", None, "browser-a") == TOKENS
    assert second.refresh("RT-MARKER-old", None, "browser-a") == TOKENS
    assert keycloak.grants == 1
    keycloak.outcome = RefreshRejected("Refresh token was already used; the session has been ended")
    with pytest.raises(RefreshRejected):
        second.refresh("RT-MARKER-old", None, "thief")
    assert keycloak.grants == 2


def test_across_processes_another_scope_after_new_tokens_is_a_conflict(redis_client):
    """A second process asking for another scope of a token another process just refreshed: 409, no grant."""
    keycloak = Keycloak(delay=0)
    first, second = processes(keycloak, redis_client, 2)
    assert first.refresh("RT-MARKER-old", None, "browser-a") == TOKENS
    with pytest.raises(RefreshConflict):
        second.refresh("RT-MARKER-old", "openid email", "browser-a")
    assert keycloak.grants == 1
