"""RefreshCoalescer across processes through a real Redis, and what Redis holds: nothing usable without the token."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from app.errors import BrokerError, RefreshRejected, UpstreamUnavailable
from app.keycloak_client import TokenSet
from app.sessions import FlightKey, RedisOutcomes, RefreshCoalescer, seal, unseal

TOKENS = TokenSet(access_token="AT-MARKER-new", token_type="Bearer", expires_in=300,
                  refresh_token="RT-MARKER-new", refresh_expires_in=1800, scope="openid")


class Keycloak:
    """A refresh function that counts grants and takes a while, like the real one."""

    def __init__(self, outcome=TOKENS, delay: float = 0.2):
        self.outcome = outcome
        self.delay = delay
        self.grants = 0
        self._lock = threading.Lock()

    def __call__(self, refresh_token: str, scope: str | None) -> TokenSet:
        with self._lock:
            self.grants += 1
        time.sleep(self.delay)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


@pytest.fixture
def redis_client(redis_url):
    """A client of the session's Redis, emptied before each test."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    return client


def processes(keycloak: Keycloak, redis_client, count: int, grace: float = 5.0) -> list[RefreshCoalescer]:
    """`count` coalescers that share only Redis, as separate gunicorn workers or instances would."""
    return [RefreshCoalescer(keycloak, grace=grace, shared=RedisOutcomes(redis_client, lease=5.0))
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


def test_a_shared_unavailability_keeps_its_retry_after_status(redis_client):
    """A 503 read back from Redis is still a 503 (the handler adds Retry-After by status)."""
    key = FlightKey.of("rt", None)
    restored = unseal(key, seal(key, UpstreamUnavailable()))
    assert (restored.status, restored.error) == (503, "upstream_unavailable")


def test_redis_holds_nothing_usable_without_the_token(redis_client):
    """Keys are hashes, values are ciphertext: no token, old or new, appears anywhere in Redis."""
    processes(Keycloak(delay=0), redis_client, 1)[0].refresh("RT-MARKER-old")
    dump = b"".join(key + (redis_client.get(key) or b"") for key in redis_client.keys("*"))
    assert dump, "the outcome should be in Redis during the grace window"
    assert b"MARKER" not in dump and b"openid" not in dump


def test_a_sealed_outcome_opens_only_with_its_token():
    """Another token (or another scope) cannot open a sealed outcome."""
    blob = seal(FlightKey.of("rt-1", None), TOKENS)
    assert unseal(FlightKey.of("rt-1", None), blob) == TOKENS
    for other in (FlightKey.of("rt-2", None), FlightKey.of("rt-1", "openid")):
        with pytest.raises(ValueError):
            unseal(other, blob)


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
    shared = RedisOutcomes(redis_client, lease=0.3)
    assert shared.claim(FlightKey.of("rt", None), "dead-process")
    coalescer = RefreshCoalescer(keycloak, grace=5, shared=shared)
    started = time.monotonic()
    with pytest.raises(BrokerError) as waited:
        coalescer.refresh("rt")
    assert (waited.value.status, keycloak.grants) == (503, 0)
    assert 0.2 < time.monotonic() - started < 2
    # The next attempt (here from another process, whose memo does not hold the shared 503) refreshes.
    assert RefreshCoalescer(keycloak, grace=5, shared=shared).refresh("rt") == TOKENS
    assert keycloak.grants == 1


def test_an_unreachable_redis_degrades_to_in_process_coalescing():
    """With Redis down, refreshes still work and still coalesce within the process."""
    keycloak = Keycloak(delay=0.2)
    dead = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    coalescer = RefreshCoalescer(keycloak, grace=5, shared=RedisOutcomes(dead, lease=5.0))
    with ThreadPoolExecutor(max_workers=5) as pool:
        results = list(pool.map(lambda _: coalescer.refresh("rt"), range(5)))
    assert results == [TOKENS] * 5 and keycloak.grants == 1


class _FailingStore(RedisOutcomes):
    """Redis that takes the lock but fails when the outcome is stored, and when the lock is released."""

    def store(self, key, outcome, grace):
        raise redis.ConnectionError("lost Redis after the grant")

    def release(self, key, owner):
        raise redis.ConnectionError("still lost")


def test_redis_failing_after_the_grant_never_causes_a_second_grant(redis_client):
    """Once Keycloak has answered, a Redis failure is logged and the outcome returned: no second refresh."""
    keycloak = Keycloak(delay=0)
    coalescer = RefreshCoalescer(keycloak, grace=5, shared=_FailingStore(redis_client, lease=5.0))
    assert coalescer.refresh("rt") == TOKENS
    assert keycloak.grants == 1


class _StoreFailsOnce(RedisOutcomes):
    """Redis whose first attempt to store an outcome fails (a reconnect, say); everything else works."""

    failed = False

    def store(self, key, outcome, grace):
        if not _StoreFailsOnce.failed:
            _StoreFailsOnce.failed = True
            raise redis.ConnectionError("blip")
        super().store(key, outcome, grace)


def test_a_lost_outcome_is_never_refreshed_again_by_another_process(redis_client):
    """Leader's outcome not stored: waiting processes answer 503 rather than spend the token a second time."""
    keycloak = Keycloak(delay=0.2)
    coalescers = [RefreshCoalescer(keycloak, grace=5, shared=_StoreFailsOnce(redis_client, lease=0.6))
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
    assert results == [TOKENS, 503]
