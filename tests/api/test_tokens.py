"""Login, refresh and logout when Keycloak says yes: bodies, forwarded forms and headers."""

from __future__ import annotations

import pytest

from tests.support.keycloak_stub import CONTRACT_TOKENS, KEYCLOAK_TOKENS, LOGOUT_URL, SECRET, body_of


def test_login_returns_only_the_contract_token_fields(client, keycloak):
    """A successful login answers 200 with the message and exactly the contract's token fields."""
    keycloak.issues_tokens()
    response = client.post("/api/auth/login", json={"username": "alice", "password": "alice-password"})
    assert response.status_code == 200
    assert body_of(response) == {"message": "Login successful", "token": CONTRACT_TOKENS}


def test_login_posts_the_password_grant_with_client_credentials(client, keycloak):
    """The broker sends one password grant with its client credentials and the default scope."""
    keycloak.issues_tokens()
    client.post("/api/auth/login", json={"username": "alice", "password": "alice-password"})
    assert keycloak.token_calls() == [
        {
            "client_id": "token-broker",
            "client_secret": SECRET,
            "grant_type": "password",
            "username": "alice",
            "password": "alice-password",
            "scope": "openid",
        }
    ]


def test_login_forwards_the_callers_scope(client, keycloak):
    """A scope sent by the caller replaces the default scope."""
    keycloak.issues_tokens()
    client.post("/api/auth/login", json={"username": "alice", "password": "pw", "scope": "openid offline_access"})
    assert keycloak.token_calls()[0]["scope"] == "openid offline_access"


def test_login_accepts_a_form_encoded_body(client, keycloak):
    """curl -d username=...&password=... works like JSON."""
    keycloak.issues_tokens()
    response = client.post("/api/auth/login", data={"username": "alice", "password": "alice-password"})
    assert (response.status_code, body_of(response)) == (200, {"message": "Login successful", "token": CONTRACT_TOKENS})


def test_id_token_is_left_out_when_keycloak_sent_none(client, keycloak):
    """Without an id_token from Keycloak the token object has no id_token key."""
    keycloak.issues_tokens({k: v for k, v in KEYCLOAK_TOKENS.items() if k != "id_token"})
    response = client.post("/api/auth/login", json={"username": "alice", "password": "pw"})
    expected = {k: v for k, v in CONTRACT_TOKENS.items() if k != "id_token"}
    assert body_of(response) == {"message": "Login successful", "token": expected}


def test_refresh_returns_the_new_tokens(client, keycloak):
    """A refresh answers 200 with the refreshed token object."""
    keycloak.issues_tokens()
    response = client.post("/api/auth/refresh-token", json={"refresh_token": "old.refresh.token"})
    assert response.status_code == 200
    assert body_of(response) == {"message": "Token refreshed successfully", "token": CONTRACT_TOKENS}
    assert keycloak.token_calls() == [
        {
            "client_id": "token-broker",
            "client_secret": SECRET,
            "grant_type": "refresh_token",
            "refresh_token": "old.refresh.token",
        }
    ]


def test_refresh_forwards_a_scope_and_accepts_form_bodies(client, keycloak):
    """`curl -d refresh_token=...&scope=...` reaches Keycloak as the refresh grant with that scope."""
    keycloak.issues_tokens()
    response = client.post("/api/auth/refresh-token", data={"refresh_token": "rt", "scope": "openid"})
    assert response.status_code == 200
    assert keycloak.token_calls()[0]["scope"] == "openid"


def test_logout_ends_the_session_at_keycloak(client, keycloak):
    """Logout posts the refresh token to the end-session endpoint and answers 200."""
    keycloak.logs_out()
    response = client.post("/api/auth/logout", json={"refresh_token": "rt"})
    assert (response.status_code, body_of(response)) == (200, {"message": "Logged out successfully"})
    assert keycloak.token_calls(LOGOUT_URL) == [
        {"client_id": "token-broker", "client_secret": SECRET, "refresh_token": "rt"}
    ]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/auth/login", {"username": "alice", "password": "pw"}),
        ("/api/auth/refresh-token", {"refresh_token": "rt"}),
    ],
)
def test_token_responses_are_never_cached(client, keycloak, path, body):
    """Token responses carry Cache-Control: no-store and Pragma: no-cache (RFC 6749 5.1)."""
    keycloak.issues_tokens()
    response = client.post(path, json=body)
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Pragma"] == "no-cache"


def test_token_endpoint_errors_are_never_cached(client, keycloak):
    """An error from a token endpoint carries the same no-store headers."""
    keycloak.refuses(400, "invalid_grant", "Invalid refresh token")
    response = client.post("/api/auth/refresh-token", json={"refresh_token": "rt"})
    assert (response.headers["Cache-Control"], response.headers["Pragma"]) == ("no-store", "no-cache")


def test_discovery_is_fetched_once_for_many_calls(client, keycloak):
    """Endpoints come from the discovery document, which is fetched once and kept."""
    keycloak.issues_tokens()
    for _ in range(3):
        client.post("/api/auth/refresh-token", json={"refresh_token": "rt"})
    discovery_calls = [c for c in keycloak.mock.calls if c.request.url.endswith("openid-configuration")]
    assert len(discovery_calls) == 1
