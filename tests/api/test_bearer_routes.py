"""GET /api/auth/me and /api/auth/verify with locally signed tokens: every way a bearer token can be wrong."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import requests

from app import create_app
from tests.support.keycloak_stub import INTROSPECTION_URL, JWKS_URL, body_of
from tests.support.realm_keys import RealmKeys, b64

BOB = {
    "sub": "0b2f0d3e-bob",
    "username": "bob",
    "email": "bob@example.com",
    "email_verified": True,
    "name": "Bob Builder",
    "given_name": "Bob",
    "family_name": "Builder",
    "roles": ["admin", "default-roles-demo", "user"],
    "client_roles": {"account": ["manage-account", "view-profile"]},
    "scope": "openid email profile",
}
CHALLENGE = 'Bearer realm="token-broker"'


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def invalid(message: str) -> dict:
    return {"error": "invalid_token", "message": message}


def test_me_answers_the_callers_identity(client, keycloak):
    """A valid token: 200 with the contract's identity fields, realm and client roles included."""
    token = keycloak.realm_keys.token()
    response = client.get("/api/auth/me", headers=bearer(token))
    expected = {**BOB, "expires_at": keycloak.realm_keys.claims()["exp"]}
    body = body_of(response)
    assert response.status_code == 200
    assert abs(body.pop("expires_at") - expected.pop("expires_at")) <= 2
    assert body == expected
    assert response.headers["Cache-Control"] == "no-store"


def test_me_answers_nulls_for_claims_the_token_lacks(client, keycloak):
    """A token without profile or email claims: those fields are null, roles empty."""
    token = keycloak.realm_keys.token(email=None, email_verified=None, name=None, given_name=None, family_name=None,
                                      realm_access=None, resource_access=None, scope=None)
    body = body_of(client.get("/api/auth/me", headers=bearer(token)))
    assert {k: body[k] for k in ("email", "email_verified", "name", "roles", "client_roles", "scope")} == {
        "email": None, "email_verified": None, "name": None, "roles": [], "client_roles": {}, "scope": None,
    }


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
def test_verify_is_204_with_identity_headers(client, keycloak, method):
    """A valid token: 204, no body, and X-Auth-* headers for the gateway, whatever the original method."""
    response = client.open("/api/auth/verify", method=method, headers=bearer(keycloak.realm_keys.token()))
    assert (response.status_code, response.get_data()) == (204, b"")
    assert "Content-Type" not in response.headers
    assert {k: v for k, v in response.headers.items() if k.startswith("X-Auth-")} == {
        "X-Auth-Subject": "0b2f0d3e-bob",
        "X-Auth-Username": "bob",
        "X-Auth-Email": "bob@example.com",
        "X-Auth-Roles": "admin,default-roles-demo,user",
    }


def test_verify_percent_encodes_what_a_header_cannot_carry(client, keycloak):
    """Non-ASCII, control characters and '%' in identity values reach the gateway percent-encoded."""
    token = keycloak.realm_keys.token(preferred_username="zoë\r\nX-Evil: 1", email="100%@example.com")
    response = client.get("/api/auth/verify", headers=bearer(token))
    assert response.headers["X-Auth-Username"] == "zo%C3%AB%0D%0AX-Evil: 1"
    assert response.headers["X-Auth-Email"] == "100%25@example.com"
    assert "X-Evil" not in response.headers


def test_verify_headers_keep_outer_spaces_and_commas_inside_roles(client, keycloak):
    """' bob ' keeps its spaces, and the roles "user" and "admin,superuser" stay two roles, not three."""
    token = keycloak.realm_keys.token(preferred_username=" bob ", realm_access={"roles": ["user", "admin,superuser"]})
    response = client.get("/api/auth/verify", headers=bearer(token))
    assert (response.headers["X-Auth-Username"], response.headers["X-Auth-Roles"]) == (
        "%20bob%20", "admin%2Csuperuser,user")


@pytest.mark.parametrize("path", ["/api/auth/me", "/api/auth/verify"])
@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer   ", "Basic YWxpY2U6cHc=", "token-without-scheme"])
def test_no_bearer_token_is_access_token_required(client, keycloak, path, authorization):
    """No usable `Authorization: Bearer`: 401 access_token_required with a bare Bearer challenge."""
    headers = {} if authorization is None else {"Authorization": authorization}
    response = client.get(path, headers=headers)
    assert (response.status_code, body_of(response)) == (
        401,
        {"error": "access_token_required", "message": "An access token is required"},
    )
    assert response.headers["WWW-Authenticate"] == CHALLENGE
    assert "X-Token-Expired" not in response.headers


def test_the_scheme_is_case_insensitive(client, keycloak):
    """`bearer <token>` works like `Bearer <token>` (RFC 7235 schemes are case-insensitive)."""
    response = client.get("/api/auth/me", headers={"Authorization": f"bearer {keycloak.realm_keys.token()}"})
    assert response.status_code == 200


def _refused(client, token: str) -> tuple[int, dict, dict]:
    response = client.get("/api/auth/verify", headers=bearer(token))
    return response.status_code, body_of(response), dict(response.headers)


def _case(name, make, message):
    return pytest.param(make, message, id=name)


now = int(time.time())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        _case("forged-signature", lambda k: k.token()[:-6] + "AAAAAA", "Access token signature is invalid"),
        _case("signed-by-another-key-same-kid", lambda k: RealmKeys(k.current).token(),
              "Access token signature is invalid"),
        _case("wrong-issuer", lambda k: k.token(iss="http://evil.test/realms/demo"),
              "Access token was issued by another issuer"),
        _case("refresh-token", lambda k: k.token(typ="Refresh"), "Token is not an access token"),
        _case("id-token", lambda k: k.token(typ="ID"), "Token is not an access token"),
        _case("no-typ", lambda k: k.token(typ=None), "Token is not an access token"),
        _case("not-yet-valid", lambda k: k.token(nbf=int(time.time()) + 600), "Access token is not valid yet"),
        _case("issued-in-the-future", lambda k: k.token(iat=int(time.time()) + 600),
              "Access token was issued in the future"),
        _case("no-exp", lambda k: k.token(exp=None), "Access token has no valid 'exp' claim"),
        _case("string-exp", lambda k: k.token(exp="never"), "Access token has no valid 'exp' claim"),
        _case("alg-none", lambda k: k.unsigned_token(), "Access token is malformed"),
        _case("alg-none-with-signature", lambda k: k.unsigned_token() + "c2ln",
              "Access token uses a signature algorithm that is not accepted"),
        _case("hmac-with-public-key", lambda k: k.hmac_token_with_public_key(),
              "Access token uses a signature algorithm that is not accepted"),
        _case("alg-a-list", lambda k: f"{b64({'alg': ['RS256'], 'kid': k.current})}.e30.c2ln",
              "Access token uses a signature algorithm that is not accepted"),
        _case("alg-mismatch", lambda k: k.with_header({"alg": "RS512", "kid": k.current}), "Access token's algorithm does not match its key"),
        _case("unknown-kid", lambda k: RealmKeys("no-such-kid").token(), "Access token was signed with an unknown key"),
        _case("no-kid", lambda k: f"{b64({'alg': 'RS256'})}.{b64(k.claims())}.c2ln", "Access token names no signing key"),
        _case("two-segments", lambda k: "abc.def", "Access token is malformed"),
        _case("five-segments-jwe", lambda k: "a.b.c.d.e", "Access token is malformed"),
        _case("bad-base64-header", lambda k: "!!!notbase64.eyJ9.c2ln", "Access token is malformed"),
        _case("header-not-json", lambda k: f"{b64(b'not json')}.e30.c2ln", "Access token is malformed"),
        _case("header-a-list", lambda k: f"{b64(b'[1]')}.e30.c2ln", "Access token is malformed"),
        _case("oversized-header", lambda k: f"{b64({'alg': 'RS256', 'kid': 'x' * 2000})}.e30.c2ln",
              "Access token header is too large"),
        _case("oversized-token", lambda k: k.token(pad="x" * 9000), "Access token is too large"),
        _case("payload-not-json", lambda k: k.token()[: k.token().index(".")] + ".bm90IGpzb24.c2ln",
              "Access token signature is invalid"),
    ],
)
def test_bad_tokens_are_invalid_token(client, keycloak, make, message):
    """Every malformed, forged or misdirected token: 401 invalid_token naming the fault, no X-Token-Expired."""
    status, body, headers = _refused(client, make(keycloak.realm_keys))
    assert (status, body) == (401, invalid(message))
    assert headers["WWW-Authenticate"] == (
        f'Bearer realm="token-broker", error="invalid_token", error_description="{message.replace(chr(34), chr(39))}"'
    )
    assert "X-Token-Expired" not in headers


def test_an_expired_token_says_so(client, keycloak):
    """A token whose only fault is expiry: 401 invalid_token and X-Token-Expired: true."""
    token = keycloak.realm_keys.token(exp=int(time.time()) - 60)
    status, body, headers = _refused(client, token)
    assert (status, body, headers["X-Token-Expired"]) == (401, invalid("Access token expired"), "true")


def test_an_expired_token_with_another_fault_does_not_say_expired(client, keycloak):
    """Expired and from another issuer: the other fault wins, and X-Token-Expired is absent."""
    token = keycloak.realm_keys.token(exp=int(time.time()) - 60, iss="http://evil.test/realms/demo")
    status, body, headers = _refused(client, token)
    assert (status, body) == (401, invalid("Access token was issued by another issuer"))
    assert "X-Token-Expired" not in headers


def test_leeway_accepts_a_token_just_past_exp(client, keycloak):
    """A token expired 5 seconds ago passes with the default 10-second leeway."""
    token = keycloak.realm_keys.token(exp=int(time.time()) - 5)
    assert client.get("/api/auth/verify", headers=bearer(token)).status_code == 204


@pytest.mark.parametrize(
    ("setting", "value", "claims", "message"),
    [
        ("token_audiences", frozenset({"orders-api"}), {"aud": "account"}, "Access token is not meant for this audience"),
        ("token_authorized_parties", frozenset({"web-app"}), {"azp": "token-broker"},
         "Access token was issued to a client that is not accepted"),
    ],
)
def test_audience_and_authorized_party_are_checked_when_configured(settings, keycloak, setting, value, claims, message):
    """BROKER_TOKEN_AUDIENCES / BROKER_TOKEN_AUTHORIZED_PARTIES refuse tokens meant for others."""
    client = create_app(replace(settings, **{setting: value})).test_client()
    status, body, _ = _refused(client, keycloak.realm_keys.token(**claims))
    assert (status, body) == (401, invalid(message))


@pytest.mark.parametrize(
    ("setting", "value", "claims"),
    [
        ("token_audiences", frozenset({"orders-api", "account"}), {"aud": ["account", "other"]}),
        ("token_authorized_parties", frozenset({"token-broker"}), {}),
    ],
)
def test_matching_audience_and_authorized_party_pass(settings, keycloak, setting, value, claims):
    """A token whose aud (string or list) or azp is listed passes."""
    client = create_app(replace(settings, **{setting: value})).test_client()
    assert client.get("/api/auth/verify", headers=bearer(keycloak.realm_keys.token(**claims))).status_code == 204


def test_keys_are_fetched_once_for_many_requests(client, keycloak):
    """The JWKS is fetched on first use and kept."""
    for _ in range(5):
        client.get("/api/auth/verify", headers=bearer(keycloak.realm_keys.token()))
    assert keycloak.calls_to(JWKS_URL) == 1


def test_a_rotated_key_is_picked_up_without_a_failure(settings, keycloak):
    """After Keycloak starts signing with a new key, the first token with the new kid refetches and passes."""
    keycloak.realm_keys = RealmKeys("old")
    client = create_app(settings).test_client()
    assert client.get("/api/auth/verify", headers=bearer(keycloak.realm_keys.token())).status_code == 204
    keycloak.realm_keys.rotate("new")
    assert client.get("/api/auth/verify", headers=bearer(keycloak.realm_keys.token())).status_code == 204
    assert client.get("/api/auth/verify", headers=bearer(keycloak.realm_keys.token(kid="old"))).status_code == 204
    assert keycloak.calls_to(JWKS_URL) == 2


def test_unknown_kids_do_not_refetch_more_than_once_per_interval(client, keycloak):
    """A stream of tokens with unknown kids causes one refetch per BROKER_JWKS_MIN_REFETCH_SECONDS, not one each."""
    client.get("/api/auth/verify", headers=bearer(keycloak.realm_keys.token()))
    stranger = RealmKeys("stranger")
    for _ in range(10):
        assert client.get("/api/auth/verify", headers=bearer(stranger.token())).status_code == 401
    assert keycloak.calls_to(JWKS_URL) == 2


def test_keys_in_hand_keep_working_while_keycloak_is_down(client, keycloak):
    """Once the keys are in hand, validation needs no Keycloak at all."""
    token = keycloak.realm_keys.token()
    assert client.get("/api/auth/verify", headers=bearer(token)).status_code == 204
    keycloak.is_down()
    assert client.get("/api/auth/verify", headers=bearer(token)).status_code == 204
    assert client.get("/api/auth/me", headers=bearer(token)).status_code == 200


def test_no_keys_and_no_keycloak_is_503_not_401(client, keycloak):
    """Without any keys the broker cannot judge a token: 503, so the client keeps its tokens."""
    keycloak.is_down()
    response = client.get("/api/auth/verify", headers=bearer(keycloak.realm_keys.token()))
    assert (response.status_code, body_of(response)) == (
        503,
        {"error": "upstream_unavailable", "message": "The realm's signing keys are not available yet"},
    )


@pytest.fixture
def introspecting(settings, keycloak):
    """A client of a broker with introspection (BROKER_TOKEN_INTROSPECTION) on."""
    return create_app(replace(settings, token_introspection=True, introspection_cache_seconds=30)).test_client()


def test_introspection_accepts_an_active_token_and_caches_the_verdict(introspecting, keycloak):
    """With introspection on, an active token passes, and a repeat within the cache time asks Keycloak nothing."""
    keycloak.introspects(active=True)
    token = keycloak.realm_keys.token()
    assert introspecting.get("/api/auth/verify", headers=bearer(token)).status_code == 204
    assert introspecting.get("/api/auth/verify", headers=bearer(token)).status_code == 204
    assert keycloak.calls_to(INTROSPECTION_URL) == 1


def test_introspection_refuses_a_token_whose_session_ended(introspecting, keycloak):
    """With introspection on, a validly signed token of an ended session is 401 invalid_token."""
    keycloak.introspects(active=False)
    status, body, headers = _refused(introspecting, keycloak.realm_keys.token())
    assert (status, body) == (401, invalid("The session of this access token has ended"))
    assert "X-Token-Expired" not in headers


def test_introspection_is_503_when_keycloak_cannot_say(introspecting, keycloak):
    """With introspection on and Keycloak unreachable, the answer is 503, not a 401 that would log users out."""
    introspecting.get("/ready")  # keys in hand
    keycloak.mock.post(INTROSPECTION_URL, body=requests.ConnectionError("refused"))
    response = introspecting.get("/api/auth/verify", headers=bearer(keycloak.realm_keys.token()))
    assert response.status_code == 503


def test_introspection_never_runs_for_an_invalid_token(introspecting, keycloak):
    """A forged token is refused locally; Keycloak is not asked."""
    keycloak.introspects(active=True)
    introspecting.get("/api/auth/verify", headers=bearer(keycloak.realm_keys.token()[:-4] + "AAAA"))
    assert keycloak.calls_to(INTROSPECTION_URL) == 0
