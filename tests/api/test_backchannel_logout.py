"""POST /api/auth/backchannel-logout with locally signed logout tokens: ended sessions, and every bad token refused."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from joserfc.jwk import RSAKey

from app import create_app
from app.access_tokens import LOGOUT_EVENT
from tests.support.keycloak_stub import JWKS_URL, body_of
from tests.support.realm_keys import ISSUER, b64

URL = "/api/auth/backchannel-logout"
FORM = "application/x-www-form-urlencoded"
RECORDED = {"message": "Logout recorded"}
ENDED = {"error": "invalid_token", "message": "The session of this access token has ended"}


def invalid_request(message: str) -> dict:
    return {"error": "invalid_request", "message": message}


def logout_claims(**overrides) -> dict:
    """What Keycloak 26 sends for the session sid-1 of bob (see docs/api.md); None drops a claim."""
    now = int(time.time())
    claims = {
        "exp": now + 120, "iat": now, "jti": f"jti-{time.time_ns()}", "iss": ISSUER, "aud": "token-broker",
        "sub": "0b2f0d3e-bob", "typ": "Logout", "sid": "sid-1", "events": {LOGOUT_EVENT: {}},
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def logout_token(realm_keys, key: RSAKey | None = None, header: dict | None = None, **claims) -> str:
    """A logout token signed (RS256, by hand) with the faked realm's key, or with `key` under the realm's kid."""
    header = {"alg": "RS256", "typ": "logout+jwt", "kid": realm_keys.current, **(header or {})}
    signing_input = f"{b64(header)}.{b64(logout_claims(**claims))}".encode()
    private = (key or realm_keys.keys[realm_keys.current]).private_key
    return f"{signing_input.decode()}.{b64(private.sign(signing_input, padding.PKCS1v15(), hashes.SHA256()))}"


def post_logout(client, token: str, **headers):
    return client.post(URL, data={"logout_token": token}, headers=headers)


def verify(client, access_token: str):
    return client.get("/api/auth/verify", headers={"Authorization": f"Bearer {access_token}"})


def test_a_valid_logout_token_ends_its_session(client, keycloak):
    """200 with no-store; from then on /verify and /me refuse that session's tokens, and only that session's."""
    realm = keycloak.realm_keys
    session_token, other_session = realm.token(sid="sid-1"), realm.token(sid="sid-2")
    assert verify(client, session_token).status_code == 204
    response = post_logout(client, logout_token(realm))
    assert (response.status_code, body_of(response)) == (200, RECORDED)
    assert (response.headers["Cache-Control"], response.headers["Pragma"]) == ("no-store", "no-cache")
    refused = verify(client, session_token)
    assert (refused.status_code, body_of(refused)) == (401, ENDED)
    me = client.get("/api/auth/me", headers={"Authorization": f"Bearer {session_token}"})
    assert (me.status_code, body_of(me)) == (401, ENDED)
    assert verify(client, other_session).status_code == 204


def test_a_sub_only_logout_token_ends_the_users_sessions_so_far(client, keycloak):
    """Without sid: every token of that user issued up to the logout is refused; a later login's is not."""
    realm = keycloak.realm_keys
    now = int(time.time())
    earlier, elsewhere = realm.token(sid="sid-1", iat=now - 60), realm.token(sid="sid-7", iat=now - 1)
    someone_else = realm.token(sub="1c3e-carol", sid="sid-3", iat=now - 60)
    assert body_of(post_logout(client, logout_token(realm, sid=None))) == RECORDED
    assert [verify(client, t).status_code for t in (earlier, elsewhere, someone_else)] == [401, 401, 204]
    assert body_of(verify(client, earlier)) == ENDED
    later = realm.token(sid="sid-8", iat=now + 2)
    assert verify(client, later).status_code == 204


def test_the_form_may_also_come_as_json(client, keycloak):
    """The contract's JSON body works too (the spec's form is what Keycloak sends)."""
    response = client.post(URL, json={"logout_token": logout_token(keycloak.realm_keys)})
    assert (response.status_code, body_of(response)) == (200, RECORDED)
    assert verify(client, keycloak.realm_keys.token()).status_code == 401


def forged(realm):
    impostor = RSAKey.generate_key(2048, parameters={"kid": realm.current, "alg": "RS256"})
    return logout_token(realm, key=impostor)


@pytest.mark.parametrize("make, message", [
    (forged, "Logout token signature is invalid"),
    (lambda r: logout_token(r, aud="another-client"), "Logout token is not meant for this client"),
    (lambda r: logout_token(r, aud=["account"]), "Logout token is not meant for this client"),
    (lambda r: logout_token(r, iss="http://keycloak.test:8080/realms/other"), "Logout token was issued by another issuer"),
    (lambda r: logout_token(r, events=None), "Logout token has no back-channel logout event"),
    (lambda r: logout_token(r, nonce="n-0S6_WzA2Mj"), "Logout token must not have a 'nonce' claim"),
    (lambda r: logout_token(r, iat=None), "Logout token has no valid 'iat' claim"),
    (lambda r: logout_token(r, exp=int(time.time()) - 60), "Logout token expired"),
    (lambda r: logout_token(r, sid=None, sub=None), "Logout token names neither a session ('sid') nor a subject ('sub')"),
    (lambda r: logout_token(r, jti=None), "Logout token has no valid 'jti' claim"),
    (lambda r: logout_token(r, header={"typ": "JWT"}), "Logout token is not of type logout+jwt"),
    (lambda r: r.token(), "Logout token is not of type logout+jwt"),  # an access token of the session
    (lambda r: r.token(header={"typ": "logout+jwt"}), "Token is not a logout token"),
    (lambda r: r.hmac_token_with_public_key(), "Logout token uses a signature algorithm that is not accepted"),
    (lambda r: r.unsigned_token(), "Logout token is malformed"),
    (lambda r: "garbage", "Logout token is malformed"),
], ids=["forged", "wrong-audience", "audience-list-without-us", "wrong-issuer", "no-events", "nonce", "no-iat",
        "expired", "neither-sid-nor-sub", "no-jti", "typ-jwt", "access-token", "access-token-typed-logout",
        "hmac-confusion", "alg-none", "garbage"])
def test_a_bad_logout_token_is_400_and_changes_nothing(client, keycloak, make, message):
    """Each bad token: 400 invalid_request naming the fault, no-store, and the session's tokens still pass."""
    realm = keycloak.realm_keys
    session_token = realm.token()
    response = post_logout(client, make(realm))
    assert (response.status_code, body_of(response)) == (400, invalid_request(message))
    assert response.headers["Cache-Control"] == "no-store"
    assert verify(client, session_token).status_code == 204


def test_a_replayed_logout_token_is_400_and_changes_nothing(client, keycloak):
    """The same token twice: the second is refused, and does not move a sub-only logout's moment forward."""
    realm = keycloak.realm_keys
    token = logout_token(realm, sid=None)
    assert body_of(post_logout(client, token)) == RECORDED
    after = realm.token(sid="sid-9", iat=int(time.time()) + 2)  # a login after the logout
    response = post_logout(client, token)
    assert (response.status_code, body_of(response)) == (400, invalid_request("Logout token was already used"))
    assert verify(client, after).status_code == 204


@pytest.mark.parametrize("kwargs, message", [
    ({}, "The request needs a logout_token"),
    ({"data": {"token": "x"}}, "The request needs a logout_token"),
    ({"data": {"logout_token": ""}}, "The request needs a logout_token"),
    ({"json": {"logout_token": 42}}, "The request needs a logout_token"),
    ({"json": {"logout_token": None}}, "The request needs a logout_token"),
    ({"data": "logout_token=a&logout_token=b", "content_type": FORM}, "Field 'logout_token' appears more than once"),
    ({"data": "{not json", "content_type": "application/json"}, "The request body is not valid JSON"),
    ({"data": "[]", "content_type": "application/json"}, "The request body must be a JSON object"),
], ids=["empty", "other-field", "blank", "number", "null", "twice", "bad-json", "json-array"])
def test_a_malformed_body_is_400_and_changes_nothing(client, keycloak, kwargs, message):
    """No usable logout_token field: 400 invalid_request, and nothing ends."""
    session_token = keycloak.realm_keys.token()
    response = client.post(URL, **kwargs)
    assert (response.status_code, body_of(response)) == (400, invalid_request(message))
    assert verify(client, session_token).status_code == 204


def test_another_content_type_is_415(client):
    """A text body is neither form nor JSON: 415, as on every route."""
    response = client.post(URL, data="logout_token=x", content_type="text/plain")
    assert (response.status_code, body_of(response)) == (
        415, {"error": "unsupported_media_type",
              "message": "Send the body as application/json or application/x-www-form-urlencoded"})


def test_cookie_mode_needs_no_cookie_and_no_csrf_proof(settings, keycloak):
    """Keycloak calls server to server: in cookie mode the route takes no cookie and no CSRF header."""
    client = create_app(replace(settings, token_transport="cookie")).test_client()
    response = post_logout(client, logout_token(keycloak.realm_keys), Origin="http://127.0.0.1:18080")
    assert (response.status_code, body_of(response)) == (200, RECORDED)
    assert "Set-Cookie" not in response.headers


def test_no_rate_limit_applies(settings, keycloak):
    """Far more calls than the login and logout limits allow from one address all succeed (a mass logout)."""
    client = create_app(replace(settings, rate_limit_logout="2 per minute", rate_limit_login_ip="2 per minute",
                                rate_limit_refresh="2 per minute")).test_client()
    statuses = [post_logout(client, logout_token(keycloak.realm_keys, sid=f"sid-{i}")).status_code for i in range(8)]
    assert statuses == [200] * 8


def test_without_the_realms_keys_the_answer_is_503_not_400(client, keycloak):
    """Keycloak unreachable at the first call: the broker cannot judge the token, so it says 503, not "bad token"."""
    keycloak.is_down()
    response = post_logout(client, logout_token(keycloak.realm_keys))
    assert response.status_code == 503
    assert body_of(response)["error"] == "upstream_unavailable"


def test_a_rotated_key_is_fetched_once_for_a_logout_token(client, keycloak):
    """A logout token signed with a key the broker has not seen yet: one JWKS refetch, then accepted."""
    realm = keycloak.realm_keys
    assert verify(client, realm.token()).status_code == 204
    fetches = keycloak.calls_to(JWKS_URL)
    realm.rotate("key-2")
    try:
        assert body_of(post_logout(client, logout_token(realm))) == RECORDED
        assert keycloak.calls_to(JWKS_URL) == fetches + 1
    finally:
        del realm.keys["key-2"]
        realm.current = "key-1"


def test_no_token_reaches_the_log(client, keycloak, caplog):
    """Accepted and refused logout tokens: the log says what happened, never the token or its signature."""
    realm = keycloak.realm_keys
    good, bad = logout_token(realm), logout_token(realm, aud="another-client")
    with caplog.at_level(logging.INFO):
        post_logout(client, good)
        post_logout(client, bad)
    lines = [json.dumps({"message": r.getMessage(), **{k: str(v) for k, v in vars(r).items()}}) for r in caplog.records]
    assert not [line for line in lines if good.split(".")[2] in line or bad.split(".")[2] in line
                or good.split(".")[1] in line]
    messages = [r.getMessage() for r in caplog.records if r.name == "app.web.routes.backchannel"]
    assert messages == ["back-channel logout: a session ended",
                        "refused a back-channel logout token: Logout token is not meant for this client"]
