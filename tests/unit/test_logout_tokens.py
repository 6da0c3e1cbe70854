"""Back-channel logout tokens checked with local keys, their single use, and the ended sessions /verify consults."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from joserfc.jwk import RSAKey

from app.access_tokens import LOGOUT_EVENT, LogoutTokenPolicy, LogoutTokenValidator, SigningKeys
from app.ended_sessions import EndedSessions, UsedLogoutTokens
from app.errors import InvalidRequest, UpstreamUnavailable
from app.shared_store import SharedStore, SharedStoreDown
from tests.support.realm_keys import ISSUER, RealmKeys, b64

NOW = 1_800_000_000.0
CLIENT = "token-broker"


class Clock:
    """A hand-driven wall clock."""

    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def realm() -> RealmKeys:
    """One realm signing key."""
    return RealmKeys()


def logout_claims(**overrides) -> dict:
    """The claims Keycloak 26 sends (probed: docs/api.md), for the session sid-1 of bob; None drops a claim."""
    claims = {
        "exp": int(NOW) + 120, "iat": int(NOW), "jti": "5f0c-jti-1", "iss": ISSUER, "aud": CLIENT,
        "sub": "0b2f0d3e-bob", "typ": "Logout", "sid": "sid-1", "events": {LOGOUT_EVENT: {}},
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def logout_token(realm: RealmKeys, header: dict | None = None, key=None, **claims) -> str:
    """A logout token signed with the realm's key (or `key`), header typ logout+jwt as Keycloak sends it.

    Signed by hand (RS256), so the header is exactly what the test says (joserfc would add or check typ).
    """
    header = {"alg": "RS256", "typ": "logout+jwt", "kid": realm.current, **(header or {})}
    header = {k: v for k, v in header.items() if v is not None}
    signing_input = f"{b64(header)}.{b64(logout_claims(**claims))}".encode()
    private = (key or realm.keys[realm.current]).private_key
    return f"{signing_input.decode()}.{b64(private.sign(signing_input, padding.PKCS1v15(), hashes.SHA256()))}"


class Uses:
    """Records what the validator asks to remember; a jti is used once."""

    def __init__(self):
        self.seen: dict[str, float] = {}

    def __call__(self, jti: str, until: float) -> bool:
        if jti in self.seen:
            return False
        self.seen[jti] = until
        return True


def validator(realm: RealmKeys, uses=None, clock=None, leeway: int = 10) -> LogoutTokenValidator:
    keys = SigningKeys(realm.jwks, min_refetch_interval=10, max_age=600)
    policy = lambda: LogoutTokenPolicy(issuer=ISSUER, client_id=CLIENT, leeway=leeway)  # noqa: E731
    return LogoutTokenValidator(keys, policy, uses if uses is not None else Uses(), clock=clock or Clock())


def refusal(check, token: str) -> str:
    with pytest.raises(InvalidRequest) as caught:
        check.validate(token)
    assert (caught.value.status, caught.value.error) == (400, "invalid_request")
    return caught.value.message


def test_a_keycloak_logout_token_is_accepted(realm):
    """The token Keycloak 26 sends passes, and its claims come back."""
    assert validator(realm).validate(logout_token(realm)) == logout_claims()


@pytest.mark.parametrize("header, claims", [
    ({"typ": None}, {}),
    ({"typ": "application/logout+jwt"}, {}),
    ({"typ": "Logout+JWT"}, {}),
    ({}, {"aud": ["account", CLIENT]}),
    ({}, {"sid": None}),
    ({}, {"sub": None}),
    ({}, {"exp": None}),
    ({}, {"typ": None}),
    ({}, {"events": {LOGOUT_EVENT: {}, "http://example.com/other-event": {"x": 1}}}),
], ids=["no-typ-header", "application-typ", "typ-case", "aud-list", "sub-only", "sid-only", "no-exp",
        "no-keycloak-typ", "another-event-too"])
def test_what_the_spec_allows_is_accepted(realm, header, claims):
    """Variants the spec allows (no typ header, aud as a list, sid or sub alone, no exp) pass."""
    assert validator(realm).validate(logout_token(realm, header=header, **claims)) == logout_claims(**claims)


@pytest.mark.parametrize("claims, message", [
    ({"iss": "http://keycloak.test:8080/realms/other"}, "Logout token was issued by another issuer"),
    ({"aud": "another-client"}, "Logout token is not meant for this client"),
    ({"aud": ["account"]}, "Logout token is not meant for this client"),
    ({"aud": None}, "Logout token is not meant for this client"),
    ({"iat": None}, "Logout token has no valid 'iat' claim"),
    ({"iat": "1800000000"}, "Logout token has no valid 'iat' claim"),
    ({"iat": True}, "Logout token has no valid 'iat' claim"),
    ({"iat": int(NOW) + 11}, "Logout token was issued in the future"),
    ({"iat": int(NOW) - 611, "exp": int(NOW) + 60}, "Logout token is too old"),
    ({"exp": int(NOW) - 10}, "Logout token expired"),
    ({"exp": "soon"}, "Logout token has no valid 'exp' claim"),
    ({"nbf": int(NOW) + 60}, "Logout token is not valid yet"),
    ({"typ": "Bearer"}, "Token is not a logout token"),
    ({"typ": "ID"}, "Token is not a logout token"),
    ({"events": None}, "Logout token has no back-channel logout event"),
    ({"events": [LOGOUT_EVENT]}, "Logout token has no back-channel logout event"),
    ({"events": {}}, "Logout token has no back-channel logout event"),
    ({"events": {"http://schemas.openid.net/event/other": {}}}, "Logout token has no back-channel logout event"),
    ({"events": {LOGOUT_EVENT: "yes"}}, "Logout token has no back-channel logout event"),
    ({"nonce": "n-0S6_WzA2Mj"}, "Logout token must not have a 'nonce' claim"),
    ({"sid": None, "sub": None}, "Logout token names neither a session ('sid') nor a subject ('sub')"),
    ({"sid": 42}, "Logout token has a malformed 'sid' or 'sub' claim"),
    ({"sub": ""}, "Logout token has a malformed 'sid' or 'sub' claim"),
    ({"jti": None}, "Logout token has no valid 'jti' claim"),
    ({"jti": ""}, "Logout token has no valid 'jti' claim"),
    ({"jti": 7}, "Logout token has no valid 'jti' claim"),
], ids=lambda value: str(value)[:40])
def test_a_claim_that_breaks_the_rules_is_refused(realm, claims, message):
    """Each rule of section 2.6 (and Keycloak's own typ claim) refuses a token that breaks it, saying which."""
    uses = Uses()
    assert refusal(validator(realm, uses), logout_token(realm, **claims)) == message
    assert uses.seen == {}


def test_leeway_covers_small_clock_differences(realm):
    """An iat a little ahead and an exp a little behind, within the leeway, still pass."""
    token = logout_token(realm, iat=int(NOW) + 9, exp=int(NOW) - 9)
    assert validator(realm).validate(token)["jti"] == "5f0c-jti-1"


@pytest.mark.parametrize("typ, message", [
    ("JWT", "Logout token is not of type logout+jwt"),
    ("at+jwt", "Logout token is not of type logout+jwt"),
    ("secevent+jwt", "Logout token is not of type logout+jwt"),
    (7, "Logout token signature is invalid"),  # joserfc refuses a header whose typ is no string
])
def test_a_header_typ_other_than_logout_jwt_is_refused(realm, typ, message):
    """An explicitly typed token of another kind (an access or ID token says JWT) is no logout token."""
    assert refusal(validator(realm), logout_token(realm, header={"typ": typ})) == message


def test_a_forged_signature_is_refused(realm):
    """Signed by a key the realm does not have, under the realm key's kid: refused, nothing remembered."""
    impostor = RSAKey.generate_key(2048, parameters={"kid": realm.current, "alg": "RS256"})
    uses = Uses()
    assert refusal(validator(realm, uses), logout_token(realm, key=impostor)) == "Logout token signature is invalid"
    assert uses.seen == {}


def test_a_tampered_payload_is_refused(realm):
    """A genuine header and signature around other claims (another sid) are refused."""
    header, _, signature = logout_token(realm).split(".")
    forged = f"{header}.{b64(logout_claims(sid='someone-else'))}.{signature}"
    assert refusal(validator(realm), forged) == "Logout token signature is invalid"


@pytest.mark.parametrize("make, message", [
    (lambda r: f"{b64({'alg': 'none', 'kid': r.current})}.{b64(logout_claims())}.", "Logout token is malformed"),
    (lambda r: f"{b64({'alg': 'none', 'kid': r.current})}.{b64(logout_claims())}.c2ln",
     "Logout token uses a signature algorithm that is not accepted"),
    (lambda r: r.hmac_token_with_public_key(), "Logout token uses a signature algorithm that is not accepted"),
    (lambda r: logout_token(r, header={"kid": "unknown-kid"}), "Logout token was signed with an unknown key"),
    (lambda r: logout_token(r, header={"kid": None}), "Logout token names no signing key"),
    (lambda r: "not-a-jwt", "Logout token is malformed"),
    (lambda r: "a.b.c", "Logout token is malformed"),
    (lambda r: logout_token(r)[:-2] + " " + logout_token(r)[-1:], "Logout token is malformed"),
    (lambda r: "x" * 9000, "Logout token is too large"),
], ids=["alg-none", "alg-none-with-signature", "hmac-confusion", "unknown-kid", "no-kid", "no-dots", "junk",
        "whitespace", "huge"])
def test_tokens_that_are_no_realm_jws_are_refused(realm, make, message):
    """alg none, HMAC with the public key, unknown kids, junk and huge strings: the access-token rules apply."""
    assert refusal(validator(realm), make(realm)) == message


def test_a_jti_is_accepted_once(realm):
    """The same logout token a second time is a replay: refused."""
    check = validator(realm)
    token = logout_token(realm)
    check.validate(token)
    assert refusal(check, token) == "Logout token was already used"


def test_a_refused_token_does_not_spend_its_jti(realm):
    """A bad token carrying a jti leaves that jti usable by the genuine token."""
    check = validator(realm)
    assert refusal(check, logout_token(realm, aud="another-client")) == "Logout token is not meant for this client"
    assert check.validate(logout_token(realm))["jti"] == "5f0c-jti-1"


@pytest.mark.parametrize("claims, until", [
    ({}, NOW + 120 + 10),                       # Keycloak's: exp = iat + 120
    ({"exp": None}, NOW + 600 + 10),            # no exp: the age bound
    ({"exp": int(NOW) + 3600}, NOW + 600 + 10),  # a long exp: the age bound still ends it sooner
])
def test_a_jti_is_remembered_while_its_token_could_be_accepted(realm, claims, until):
    """The jti is kept until exp or iat + 10 minutes, whichever is sooner, plus the leeway."""
    uses = Uses()
    validator(realm, uses).validate(logout_token(realm, **claims))
    assert uses.seen == {"5f0c-jti-1": until}


def test_no_keys_is_an_upstream_failure_not_a_bad_token(realm):
    """Without the realm's keys the broker cannot judge: 503, not a 400 that tells Keycloak the token was bad."""
    def down():
        raise UpstreamUnavailable()

    keys = SigningKeys(down, min_refetch_interval=10, max_age=600)
    check = LogoutTokenValidator(keys, lambda: LogoutTokenPolicy(issuer=ISSUER, client_id=CLIENT), Uses())
    with pytest.raises(UpstreamUnavailable):
        check.validate(logout_token(realm))


# --- the jti memory and the ended sessions, in memory and over a fake Redis ---------------------------------


class FakeRedis:
    """The few Redis commands these classes use, over dicts, with a clock for expiry; counts the commands."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.values: dict[str, tuple[bytes, float]] = {}
        self.streams: dict[str, list[tuple[tuple[int, int], dict[bytes, bytes]]]] = {}
        self.commands: list[str] = []
        self.down = False

    def _live(self, key: str) -> bytes | None:
        entry = self.values.get(key)
        return entry[0] if entry is not None and entry[1] > self.clock() else None

    def _command(self, name: str) -> None:
        self.commands.append(name)
        if self.down:
            raise ConnectionError("refused")

    def set(self, key: str, value, *, px: int, nx: bool = False):
        self._command("SET")
        if nx and self._live(key) is not None:
            return None
        self.values[key] = (str(value).encode(), self.clock() + px / 1000)
        return True

    def xadd(self, name: str, fields: dict, *, maxlen: int, approximate: bool):
        self._command("XADD")
        stream = self.streams.setdefault(name, [])
        ms = int(self.clock() * 1000)
        entry_id = (ms, stream[-1][0][1] + 1 if stream and stream[-1][0][0] == ms else 0)
        stream.append((entry_id, {k.encode(): str(v).encode() for k, v in fields.items()}))
        del stream[:-maxlen]
        return f"{entry_id[0]}-{entry_id[1]}".encode()

    def xrange(self, name: str, *, min: str, count: int):
        self._command("XRANGE")
        ms, _, seq = min.partition("-")
        start = (int(ms), int(seq or 0))
        found = [(f"{i[0]}-{i[1]}".encode(), fields) for i, fields in self.streams.get(name, []) if i >= start]
        return found[:count]


def store_over(redis: FakeRedis) -> SharedStore:
    return SharedStore(redis, retry_seconds=5)


@pytest.mark.parametrize("with_redis", [False, True], ids=["memory", "redis"])
def test_used_logout_tokens_refuse_a_jti_until_it_is_forgotten(with_redis):
    """A jti is new once; again while remembered it is not; after `until` it is forgotten."""
    clock = Clock()
    used = UsedLogoutTokens(store_over(FakeRedis(clock)) if with_redis else None, clock=clock)
    assert used.first_use("j1", NOW + 130) is True
    assert used.first_use("j1", NOW + 130) is False
    assert used.first_use("j2", NOW + 130) is True
    clock.now = NOW + 131
    assert used.first_use("j1", NOW + 300) is True


def test_used_logout_tokens_in_memory_are_bounded():
    """Beyond max_entries the oldest jti goes first."""
    used = UsedLogoutTokens(None, max_entries=2, clock=Clock())
    for jti in ("a", "b", "c"):
        assert used.first_use(jti, NOW + 100)
    assert [used.first_use(jti, NOW + 100) for jti in ("c", "b", "a")] == [False, False, True]


def test_used_logout_tokens_share_through_redis():
    """Two processes over one Redis: the second one refuses the jti the first one accepted."""
    clock = Clock()
    redis = FakeRedis(clock)
    first, second = UsedLogoutTokens(store_over(redis), clock=clock), UsedLogoutTokens(store_over(redis), clock=clock)
    assert first.first_use("j1", NOW + 130) is True
    assert second.first_use("j1", NOW + 130) is False
    assert [key.split(":")[1] for key in redis.values] == ["logout-jti"]
    assert "j1" not in "".join(redis.values)  # keys are hashes


def test_used_logout_tokens_fall_back_to_memory_while_redis_is_out():
    """Redis out: this process still refuses its own replays; and remembers them when Redis is back."""
    clock = Clock()
    redis = FakeRedis(clock)
    used = UsedLogoutTokens(store_over(redis), clock=clock)
    redis.down = True
    assert used.first_use("j1", NOW + 130) is True
    assert used.first_use("j1", NOW + 130) is False
    redis.down = False
    assert used.first_use("j1", NOW + 130) is False


class Monotonic(Clock):
    """A hand-driven monotonic clock, for the sync interval."""

    def __init__(self):
        super().__init__(1000.0)


def ended_sessions(redis: FakeRedis | None, clock: Clock, monotonic: Monotonic | None = None, **options):
    return EndedSessions(store_over(redis) if redis is not None else None, ttl=3600, clock=clock,
                         monotonic=monotonic or Monotonic(), **options)


@pytest.mark.parametrize("with_redis", [False, True], ids=["memory", "redis"])
def test_an_ended_sid_refuses_every_token_of_that_session(with_redis):
    """end(sid=) ends that session only, whenever its tokens were issued, for ttl seconds."""
    clock = Clock()
    ended = ended_sessions(FakeRedis(clock) if with_redis else None, clock)
    ended.end(sid="sid-1", sub="bob")
    assert ended.ended({"sid": "sid-1", "sub": "bob", "iat": NOW + 5}) is True
    assert ended.ended({"sid": "sid-2", "sub": "bob", "iat": NOW - 5}) is False  # sub goes with a sid: not all
    clock.now = NOW + 3601
    assert ended.ended({"sid": "sid-1", "sub": "bob", "iat": NOW}) is False


@pytest.mark.parametrize("with_redis", [False, True], ids=["memory", "redis"])
def test_an_ended_sub_refuses_the_tokens_issued_before_it(with_redis):
    """end(sub=) alone: every session of the user so far, but not a login after it."""
    clock = Clock()
    ended = ended_sessions(FakeRedis(clock) if with_redis else None, clock)
    ended.end(sub="bob")
    assert ended.ended({"sid": "sid-1", "sub": "bob", "iat": NOW - 100}) is True
    assert ended.ended({"sid": "sid-9", "sub": "bob", "iat": NOW}) is True
    assert ended.ended({"sid": "sid-9", "sub": "bob", "iat": NOW + 1}) is False
    assert ended.ended({"sid": "sid-1", "sub": "alice", "iat": NOW - 100}) is False


def test_other_processes_learn_an_ended_session_within_the_sync_interval():
    """Over one Redis: the process Keycloak called knows at once, another one at its first lookup after 0.5 s."""
    clock, monotonic, redis = Clock(), Monotonic(), FakeRedis(Clock())
    called, other = ended_sessions(redis, clock), ended_sessions(redis, clock, monotonic)
    token = {"sid": "sid-1", "sub": "bob", "iat": NOW}
    assert other.ended(token) is False  # its first lookup read the (empty) stream
    called.end(sid="sid-1")
    assert called.ended(token) is True
    monotonic.now += 0.4
    assert other.ended(token) is False  # not due yet: memory only
    monotonic.now += 0.1
    assert other.ended(token) is True


def test_lookups_between_syncs_cost_no_redis_command():
    """A hundred lookups within one interval: one XRANGE in all, the rest answered from memory."""
    clock, monotonic, redis = Clock(), Monotonic(), FakeRedis(Clock())
    ended = ended_sessions(redis, clock, monotonic)
    for i in range(100):
        ended.ended({"sid": f"sid-{i}", "sub": "bob", "iat": NOW})
    assert redis.commands == ["XRANGE"]
    monotonic.now += 0.5
    ended.ended({"sid": "sid-1", "sub": "bob", "iat": NOW})
    assert redis.commands == ["XRANGE", "XRANGE"]


def test_a_fresh_process_reads_the_backlog_of_the_last_ttl():
    """A process started later learns the sessions ended in the last ttl seconds, in batches, and not older ones."""
    clock, redis = Clock(), FakeRedis(Clock())
    writer = ended_sessions(redis, clock)
    writer.end(sid="long-ago")
    clock.now = redis.clock.now = NOW + 3000
    for i in range(5):
        writer.end(sid=f"sid-{i}")
    clock.now = NOW + 3700  # "long-ago" has outlived the ttl; the others have not
    fresh = ended_sessions(redis, clock)
    fresh.BATCH = 2
    redis.commands.clear()
    # A full batch lets the next lookup read on at once: each of the first three lookups reads two entries.
    assert [fresh.ended({"sid": f"sid-{i}", "sub": "x", "iat": NOW}) for i in range(5)] == [True] * 5
    assert fresh.ended({"sid": "long-ago", "sub": "x", "iat": NOW}) is False
    assert redis.commands == ["XRANGE"] * 3


def test_a_redis_outage_refuses_no_valid_token_and_ends_sessions_locally():
    """Redis out: lookups answer from memory; a session ended meanwhile is refused by this process."""
    clock, monotonic, redis = Clock(), Monotonic(), FakeRedis(Clock())
    ended = ended_sessions(redis, clock, monotonic)
    redis.down = True
    assert ended.ended({"sid": "sid-1", "sub": "bob", "iat": NOW}) is False
    ended.end(sid="sid-1")
    assert ended.ended({"sid": "sid-1", "sub": "bob", "iat": NOW}) is True
    monotonic.now += 0.5
    assert ended.ended({"sid": "sid-1", "sub": "bob", "iat": NOW}) is True
    assert redis.commands == ["XRANGE", "XADD", "XRANGE"]  # one read per interval, even while failing


def test_redis_holds_no_session_id():
    """The stream holds hashes of sid and sub, not the values themselves."""
    redis = FakeRedis(Clock())
    ended_sessions(redis, Clock()).end(sid="sid-secretive", sub="bob")
    ((_, fields),) = redis.streams[EndedSessions.STREAM]
    assert fields[b"k"].startswith(b"sid:") and b"secretive" not in fields[b"k"]


def test_the_fake_redis_fails_like_a_shared_store_down():
    """The fake's outage reaches the callers as SharedStoreDown (as a real connection error does)."""
    redis = FakeRedis(Clock())
    redis.down = True
    with pytest.raises(SharedStoreDown):
        store_over(redis).call(lambda r: r.xrange("s", min="0-0", count=1))
