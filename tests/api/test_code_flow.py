"""The code + PKCE login with Keycloak faked: what the real server cannot be made to send (a wrong nonce, a
foreign audience), and the shape of the redirect to Keycloak."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import replace
from urllib.parse import parse_qs, urlsplit

import pytest

from app import create_app
from app.config import ConfigError, Settings
from tests.support.keycloak_stub import AUTHORIZATION_URL, KEYCLOAK_TOKENS, REALM_URL, body_of

MISMATCH = {"error": "invalid_request", "message": "The identity provider's ID token does not match this login"}


@pytest.fixture
def code_client(settings, keycloak):
    """A cookie-mode broker with the code flow on, in front of the faked Keycloak."""
    return create_app(replace(settings, token_transport="cookie", code_flow=True, cookie_secure=False,
                              cookie_name="refresh_token")).test_client()


def authorize(client) -> dict[str, str]:
    response = client.get("/api/auth/authorize?return_to=/app")
    assert response.status_code == 302
    location = response.headers["Location"]
    assert location.startswith(AUTHORIZATION_URL + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def test_the_redirect_to_keycloak_carries_pkce_state_and_nonce(code_client):
    """response_type=code, S256 challenge, fresh state and nonce each time, the configured callback."""
    first, second = authorize(code_client), authorize(code_client)
    assert {k: first[k] for k in ("response_type", "client_id", "redirect_uri", "scope", "code_challenge_method")} == {
        "response_type": "code", "client_id": "token-broker", "redirect_uri": "http://127.0.0.1:8000/api/auth/callback",
        "scope": "openid", "code_challenge_method": "S256"}
    assert first["state"] != second["state"] and first["nonce"] != second["nonce"]
    assert len(base64.urlsafe_b64decode(first["code_challenge"] + "=")) == hashlib.sha256().digest_size


@pytest.mark.parametrize(("claims", "ok"), [
    ({}, True),
    ({"nonce": "another-login"}, False),
    ({"aud": "another-client"}, False),
    ({"iss": "https://elsewhere.example/realms/demo"}, False),
    ({"exp": 1}, False),
])
def test_the_id_token_must_carry_this_logins_nonce_audience_issuer_and_time(code_client, keycloak, claims, ok):
    """The callback checks the ID token the code brought; any mismatch is 400 and no session cookie is set."""
    query = authorize(code_client)
    id_token = keycloak.realm_keys.token(**{"typ": "ID", "aud": "token-broker", "nonce": query["nonce"],
                                            "iss": REALM_URL, **claims})
    keycloak.issues_tokens({**KEYCLOAK_TOKENS, "id_token": id_token})
    response = code_client.get(f"/api/auth/callback?state={query['state']}&code=the-code")
    if ok:
        assert (response.status_code, response.headers["Location"]) == (302, "/app")
        assert response.headers.getlist("Set-Cookie")[0].startswith("refresh_token=refresh.token.value;")
    else:
        assert (response.status_code, body_of(response)) == (400, MISMATCH)
        assert not [c for c in response.headers.getlist("Set-Cookie") if c.startswith("refresh_token=")]
    sent = keycloak.token_calls()[-1]
    assert (sent["grant_type"], sent["code"], sent["redirect_uri"]) == (
        "authorization_code", "the-code", "http://127.0.0.1:8000/api/auth/callback")
    assert base64.urlsafe_b64encode(hashlib.sha256(sent["code_verifier"].encode()).digest()).rstrip(b"=").decode() \
        == query["code_challenge"]


def test_an_error_from_keycloak_is_400_and_spends_the_attempt(code_client, keycloak):
    """The user cancelled on Keycloak's page: 400 naming the error; the attempt cannot be used again."""
    query = authorize(code_client)
    cancelled = code_client.get(f"/api/auth/callback?state={query['state']}&error=access_denied")
    again = code_client.get(f"/api/auth/callback?state={query['state']}&code=late")
    assert [(r.status_code, body_of(r)) for r in (cancelled, again)] == [
        (400, {"error": "invalid_request", "message": "The identity provider did not complete the login (access_denied)"}),
        (400, {"error": "invalid_request", "message": "This login callback was used already; start the login again"}),
    ]
    assert keycloak.token_calls() == []


def test_the_code_flow_needs_cookie_mode(settings):
    """BROKER_CODE_FLOW without cookie transport is refused at start-up, naming both variables."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"KEYCLOAK_CLIENT_SECRET": "s", "BROKER_CODE_FLOW": "true"})
    assert caught.value.problems == [
        "BROKER_CODE_FLOW=true needs BROKER_TOKEN_TRANSPORT=cookie: the login's callback hands the session to the "
        "browser in the refresh cookie"]
