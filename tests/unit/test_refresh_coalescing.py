"""RefreshCoalescer in one process, and sealed outcomes: single-flight, kept answers, drain, the breaker."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.errors import (
    AnswerKept,
    BrokerError,
    InvalidScope,
    RefreshConflict,
    RefreshRejected,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.refresh_coalescing import FlightKey, RefreshCoalescer, Stored, seal, unseal
from app.shared_store import CircuitBreaker, SharedStoreDown
from tests.support.answers import KEPT
from tests.support.fake_refresh import TOKENS, Keycloak


def test_a_shared_unavailability_keeps_its_retry_after_status():
    """A 503 read back from Redis is still a 503 (the handler adds Retry-After by status)."""
    key = FlightKey.of("rt")
    restored = unseal(key, seal(key, Stored(UpstreamUnavailable()))).outcome
    assert (restored.status, restored.error) == (503, "upstream_unavailable")


def test_a_sealed_outcome_opens_only_with_its_token():
    """Another token cannot open a sealed outcome; the scope and the client it was for come back with it."""
    blob = seal(FlightKey.of("rt-1"), Stored(TOKENS, "openid", "client-a"))
    assert unseal(FlightKey.of("rt-1"), blob) == Stored(TOKENS, "openid", "client-a")
    for other in (FlightKey.of("rt-2"), FlightKey.of("rt-1 ")):
        with pytest.raises(ValueError):
            unseal(other, blob)


def test_a_caller_that_stops_waiting_gets_the_answer_on_its_retry():
    """The caller's wait ends (504 that says the answer is kept); the flight lands and the retry gets its tokens."""
    keycloak = Keycloak(delay=0.4)
    coalescer = RefreshCoalescer(keycloak, grace=5, wait=0.1)
    with pytest.raises(AnswerKept) as gave_up:
        coalescer.refresh("rt")
    assert (gave_up.value.status, gave_up.value.error, gave_up.value.message) == (504, KEPT["error"], KEPT["message"])
    assert coalescer.drain(timeout=2)
    assert coalescer.refresh("rt") == TOKENS
    assert keycloak.grants == 1


def test_a_retry_while_the_flight_is_still_in_the_air_joins_it():
    """A retry after the caller gave up, while Keycloak is still answering, makes no second grant."""
    keycloak = Keycloak(delay=0.4)
    coalescer = RefreshCoalescer(keycloak, grace=5, wait=0.1)
    with pytest.raises(UpstreamTimeout):
        coalescer.refresh("rt")
    coalescer._wait = 2.0  # the retrying caller is patient
    assert coalescer.refresh("rt") == TOKENS
    assert keycloak.grants == 1


@pytest.mark.parametrize(
    ("outcome", "grants"),
    [(TOKENS, 1), (RefreshRejected("Session has ended"), 1), (UpstreamUnavailable(), 2), (UpstreamError(), 2),
     (UpstreamTimeout(), 2), (InvalidScope(), 2)],
)
def test_only_outcomes_that_tell_the_tokens_fate_are_kept(outcome, grants):
    """New tokens and refusals are kept for the grace window; faults are forgotten, so a retry asks Keycloak."""
    keycloak = Keycloak(outcome=outcome, delay=0)
    coalescer = RefreshCoalescer(keycloak, grace=5)
    for _ in range(2):
        try:
            coalescer.refresh("rt")
        except BrokerError:
            pass
    assert keycloak.grants == grants


def test_drain_waits_for_flights_in_the_air():
    """drain() returns once every flight has landed, and says False when its timeout came first."""
    keycloak = Keycloak(delay=0.3)
    coalescer = RefreshCoalescer(keycloak, grace=5, wait=0.01)
    with pytest.raises(UpstreamTimeout):
        coalescer.refresh("rt")
    assert coalescer.drain(timeout=0.05) is False
    assert coalescer.drain(timeout=2) is True
    assert keycloak.grants == 1


def test_the_breaker_opens_after_three_failures_and_lets_one_trial_through_per_interval():
    """Closed until three failures in a row; open refuses at once; after the interval one trial, whose success closes it."""
    now = [0.0]
    breaker = CircuitBreaker(failures=3, retry_seconds=5, clock=lambda: now[0])
    for _ in range(2):
        assert breaker.allow()
        breaker.failed("TimeoutError")
    assert breaker.allow() and not breaker.open
    breaker.failed("TimeoutError")
    assert (breaker.open, breaker.allow()) == (True, False)
    now[0] = 5.1
    assert [breaker.allow(), breaker.allow()] == [True, False]  # one trial at a time
    breaker.failed("TimeoutError")
    assert breaker.allow() is False  # a failed trial opens it for another interval
    now[0] = 10.2
    assert breaker.allow()
    breaker.succeeded()
    assert (breaker.open, breaker.allow()) == (False, True)


@pytest.mark.parametrize("outcome", [RefreshRejected("Session has ended"), UpstreamUnavailable(), UpstreamTimeout()])
def test_a_sealed_refusal_opens_as_the_same_kind_of_error(outcome):
    """What another process reads back is the same leaf of the error tree, with its status, code and message."""
    key = FlightKey.of("rt")
    restored = unseal(key, seal(key, Stored(outcome))).outcome
    assert (type(restored), restored.parts()) == (type(outcome), outcome.parts())


def test_another_scope_in_the_air_or_after_new_tokens_is_a_conflict():
    """The token with another scope while its refresh flies, or once it brought new tokens: 409, no second grant."""
    keycloak = Keycloak(delay=0.2)
    coalescer = RefreshCoalescer(keycloak, grace=5)
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(coalescer.refresh, "rt")
        time.sleep(0.05)
        with pytest.raises(RefreshConflict):
            coalescer.refresh("rt", "openid email")
        assert first.result() == TOKENS
    with pytest.raises(RefreshConflict):
        coalescer.refresh("rt", "openid email")
    assert keycloak.grants == 1


def test_another_scope_after_a_refusal_gets_the_refusal_or_asks_keycloak():
    """A dead token is dead for every scope (shared refusal); a refused scope spent nothing (Keycloak is asked)."""
    dead = Keycloak(outcome=RefreshRejected("Session has ended"), delay=0)
    coalescer = RefreshCoalescer(dead, grace=5)
    for scope in (None, "openid email"):
        with pytest.raises(RefreshRejected):
            coalescer.refresh("rt", scope)
    assert dead.grants == 1
    refused_scope = Keycloak(outcome=InvalidScope(), delay=0)
    coalescer = RefreshCoalescer(refused_scope, grace=5)
    with pytest.raises(InvalidScope):
        coalescer.refresh("rt", "admin")
    refused_scope.outcome = TOKENS
    assert coalescer.refresh("rt", None) == TOKENS
    assert refused_scope.grants == 2


def test_a_landed_refresh_goes_again_to_keycloak_for_another_client():
    """Within the grace window the same client gets the kept tokens; another client is sent to Keycloak."""
    keycloak = Keycloak(delay=0)
    coalescer = RefreshCoalescer(keycloak, grace=5)
    assert coalescer.refresh("rt", None, "browser-a") == TOKENS
    assert coalescer.refresh("rt", None, "browser-a") == TOKENS
    assert keycloak.grants == 1
    keycloak.outcome = RefreshRejected("Refresh token was already used; the session has been ended")
    with pytest.raises(RefreshRejected):
        coalescer.refresh("rt", None, "thief")
    assert keycloak.grants == 2


class _Shared:
    """A shared store that records what the coalescer asks of it: the claim finds `kept` (or takes the lead),
    and the first `failing` stores fail."""

    lease = 5.0
    poll_interval = 0.01

    def __init__(self, kept: Stored | None = None, failing: int = 0):
        self.kept = kept
        self.failing = failing
        self.calls: list[tuple] = []

    def claim_unless_kept(self, key, owner):
        self.calls.append(("claim_unless_kept", key, len(owner)))
        return (self.kept, False) if self.kept is not None else (None, True)

    def store_and_release(self, key, owner, stored, grace, *, force=False):
        self.calls.append(("store_and_release", key, stored, force))
        if self.failing:
            self.failing -= 1
            raise SharedStoreDown("blip")


def test_a_leader_flight_is_one_claim_and_one_store_and_release():
    """Across processes a leader asks its store two things: the lead (unless an outcome is kept), then to keep
    the outcome and free the lock."""
    keycloak = Keycloak(delay=0)
    shared = _Shared()
    assert RefreshCoalescer(keycloak, grace=5, shared=shared).refresh("rt", "openid", "browser-a") == TOKENS
    key = FlightKey.of("rt")
    assert (shared.calls, keycloak.grants) == (
        [("claim_unless_kept", key, 32), ("store_and_release", key, Stored(TOKENS, "openid", "browser-a"), False)], 1)


def test_a_kept_outcome_found_instead_of_the_lead_answers_without_a_grant():
    """A late duplicate from another process: the claim hands over the kept tokens, nothing is stored or granted."""
    keycloak = Keycloak(delay=0)
    shared = _Shared(kept=Stored(TOKENS, None, "browser-a"))
    assert RefreshCoalescer(keycloak, grace=5, shared=shared).refresh("rt", None, "browser-a") == TOKENS
    assert (shared.calls, keycloak.grants) == ([("claim_unless_kept", FlightKey.of("rt"), 32)], 0)


def test_a_store_that_fails_after_the_grant_is_retried_past_the_breaker_never_granted_again():
    """The token may be spent: the caller gets its tokens, and the outcome is stored later (force) with the lock
    released only then."""
    keycloak = Keycloak(delay=0)
    shared = _Shared(failing=1)
    coalescer = RefreshCoalescer(keycloak, grace=5, shared=shared)
    assert coalescer.refresh("rt") == TOKENS
    assert coalescer.drain(timeout=2)
    key, stored = FlightKey.of("rt"), Stored(TOKENS, None, "")
    assert (shared.calls, keycloak.grants) == (
        [("claim_unless_kept", key, 32), ("store_and_release", key, stored, False),
         ("store_and_release", key, stored, True)], 1)
