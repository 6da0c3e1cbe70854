"""LoginAttempts with a real Redis (counts shared by processes) and with a Redis that is down (counts in memory)."""

from __future__ import annotations

import logging

import pytest

from app.errors import RateLimited
from app.login_attempts import LoginAttempts, normalised_username


def attempts(storage_uri: str | None, **limits: str) -> LoginAttempts:
    return LoginAttempts(per_address_user=limits.get("per_address_user", "3 per minute"),
                         per_user=limits.get("per_user", "100 per minute"), storage_uri=storage_uri,
                         storage_options={"socket_timeout": 0.2, "socket_connect_timeout": 0.2})


def outcomes(guard: LoginAttempts, address: str, username: str, count: int) -> list[str]:
    """`count` attempts in a row: "admitted", or "429" with a Retry-After within the minute's window."""
    results = []
    for _ in range(count):
        try:
            guard.admit(address, username)
            results.append("admitted")
        except RateLimited as exc:
            assert 1 <= int(exc.headers["Retry-After"]) <= 61
            results.append("429")
    return results


def test_two_processes_share_the_count_through_redis(redis_url):
    """Two brokers on one Redis: the third attempt in either is the last one admitted."""
    first, second = attempts(redis_url), attempts(redis_url)
    name = f"user-{id(first)}"
    assert outcomes(first, "10.0.0.1", name, 2) + outcomes(second, "10.0.0.1", name, 2) == \
        ["admitted", "admitted", "admitted", "429"]


def test_a_given_back_attempt_is_uncounted(redis_url):
    """A login that succeeded gives its attempt back: it never uses up the limit."""
    guard = attempts(redis_url)
    name = f"user-{id(guard)}"
    for _ in range(5):
        guard.give_back(guard.admit("10.0.0.2", name))
    assert outcomes(guard, "10.0.0.2", name, 4) == ["admitted", "admitted", "admitted", "429"]


def test_a_redis_outage_counts_in_memory_and_is_logged_once(caplog):
    """Redis down: attempts are still limited (in this process) and the outage is one warning, not one per login."""
    guard = attempts("redis://127.0.0.1:1/0")
    with caplog.at_level(logging.WARNING, logger="app.login_attempts"):
        assert outcomes(guard, "10.0.0.3", "alice", 4) == ["admitted", "admitted", "admitted", "429"]
    assert [r.getMessage() for r in caplog.records] == [
        "the rate-limit store failed (ConnectionError); counting login attempts in memory for 5s"]


@pytest.mark.parametrize("spelling", ["Alice", " alice ", "ALICE", "\uff41lice"])
def test_spellings_of_one_username_are_one_user(spelling):
    """Case, outer spaces and compatibility forms (a full-width 'a') do not make a new user."""
    assert normalised_username(spelling) == "alice"
