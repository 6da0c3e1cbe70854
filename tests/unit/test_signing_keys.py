"""SigningKeys and Introspection: single-flight refetches, rate bounds, keys that outlive an outage."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.access_tokens import Introspection, SigningKeys
from app.errors import UpstreamUnavailable
from tests.support.realm_keys import RealmKeys


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Jwks:
    """A JWKS endpoint that counts fetches and can be slow or down."""

    def __init__(self, realm: RealmKeys, delay: float = 0.0):
        self.realm = realm
        self.delay = delay
        self.down = False
        self.fetches = 0
        self._lock = threading.Lock()

    def __call__(self) -> dict:
        with self._lock:
            self.fetches += 1
        time.sleep(self.delay)
        if self.down:
            raise UpstreamUnavailable()
        return self.realm.jwks()


@pytest.fixture(scope="module")
def realm() -> RealmKeys:
    """One realm key pair with two signing keys."""
    keys = RealmKeys("a")
    keys.rotate("b")
    return keys


def keys_for(jwks: Jwks, clock: Clock, interval: float = 10, max_age: float = 600) -> SigningKeys:
    return SigningKeys(jwks, min_refetch_interval=interval, max_age=max_age, clock=clock)


def test_keys_are_fetched_once_and_kept(realm):
    """Known kids never cause another fetch."""
    jwks = Jwks(realm)
    keys = keys_for(jwks, Clock())
    assert [keys.get("a").kid, keys.get("b").kid, keys.get("a").kid] == ["a", "b", "a"]
    assert jwks.fetches == 1


def test_concurrent_unknown_kids_cause_one_refetch(realm):
    """Fifty threads asking for an unknown kid at once: one refetch in flight, the others wait for it."""
    jwks = Jwks(realm, delay=0.05)
    clock = Clock()
    keys = keys_for(jwks, clock)
    keys.get("a")
    clock.now += 60
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda _: keys.get("unknown"), range(50)))
    assert results == [None] * 50
    assert jwks.fetches == 2


def test_unknown_kids_refetch_at_most_once_per_interval(realm):
    """Within the minimum interval a second unknown kid does not refetch; after it, one refetch is allowed."""
    jwks = Jwks(realm)
    clock = Clock()
    keys = keys_for(jwks, clock, interval=10)
    keys.get("a")
    keys.get("x1")
    keys.get("x2")
    assert jwks.fetches == 2
    clock.now += 10.5
    keys.get("x3")
    assert jwks.fetches == 3


def test_a_new_kid_right_after_start_up_is_found(realm):
    """The first fetch does not start the interval: a key rotated in right after start-up is picked up."""
    fresh = RealmKeys("old")
    jwks = Jwks(fresh)
    keys = keys_for(jwks, Clock(), interval=10)
    keys.get("old")
    fresh.rotate("new")
    assert keys.get("new").kid == "new"


def test_keys_in_hand_survive_a_failed_refetch(realm):
    """When Keycloak is down, an unknown kid finds nothing but the keys in hand still work."""
    jwks = Jwks(realm)
    clock = Clock()
    keys = keys_for(jwks, clock)
    keys.get("a")
    jwks.down = True
    clock.now += 60
    assert keys.get("unknown") is None
    assert keys.get("a").kid == "a"


def test_no_keys_at_all_is_unavailable_and_retried_after_the_interval(realm):
    """Without any keys a lookup raises UpstreamUnavailable; attempts are spaced by the interval."""
    jwks = Jwks(realm)
    jwks.down = True
    clock = Clock()
    keys = keys_for(jwks, clock, interval=5)
    for _ in range(3):
        with pytest.raises(UpstreamUnavailable):
            keys.get("a")
    assert (jwks.fetches, keys.ready()) == (1, False)
    jwks.down = False
    clock.now += 6
    assert (keys.ready(), keys.get("a").kid, jwks.fetches) == (True, "a", 2)


def test_old_keys_are_refreshed_in_passing(realm):
    """Past max_age one lookup refreshes the keys; a key Keycloak removed then stops working."""
    shrinking = RealmKeys("keep")
    shrinking.rotate("drop")
    jwks = Jwks(shrinking)
    clock = Clock()
    keys = keys_for(jwks, clock, interval=10, max_age=300)
    assert keys.get("drop").kid == "drop"
    del shrinking.keys["drop"]
    clock.now += 301
    assert keys.get("keep").kid == "keep"
    assert keys.get("drop") is None
    assert keys.get("drop") is None
    assert jwks.fetches == 3  # the refresh in passing, then one (and only one) refetch for the missing kid


def test_a_jwks_without_signature_keys_is_not_taken(realm):
    """A JWKS with only encryption keys leaves the keys in hand in place."""
    jwks = Jwks(realm)
    clock = Clock()
    keys = keys_for(jwks, clock)
    keys.get("a")
    jwks.realm = RealmKeys("z")
    jwks.realm.keys.clear()
    clock.now += 700
    assert keys.get("a").kid == "a"


def test_introspection_caches_verdicts_by_token_hash():
    """A verdict is reused within its TTL, asked again after it, and the token itself is not stored."""
    asked: list[str] = []
    clock = Clock()
    check = Introspection(lambda t: asked.append(t) or t == "live", ttl=10, clock=clock)
    assert [check.active("live"), check.active("live"), check.active("dead")] == [True, True, False]
    clock.now += 11
    assert check.active("live") is True
    assert asked == ["live", "dead", "live"]
    assert "live" not in repr(check._verdicts)


def test_introspection_is_bounded():
    """The verdict cache never holds more than max_entries; the oldest goes first."""
    check = Introspection(lambda t: True, ttl=60, max_entries=3, clock=Clock())
    for token in "abcde":
        check.active(token)
    assert len(check._verdicts) == 3


def test_a_failing_refresh_in_passing_is_not_retried_on_every_request(realm):
    """Old keys and Keycloak down: one refresh attempt per interval, not one per request; old keys keep working."""
    jwks = Jwks(realm)
    clock = Clock()
    keys = keys_for(jwks, clock, interval=10, max_age=300)
    keys.get("a")
    jwks.down = True
    clock.now += 301
    for _ in range(20):
        assert keys.get("a").kid == "a"
    assert jwks.fetches == 2
    clock.now += 11
    keys.get("a")
    assert jwks.fetches == 3

