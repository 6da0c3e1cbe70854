"""Misconfigured brokers against the real Keycloak: the caller gets a 502/503, never a reason to log out."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import replace

import pytest

from app import create_app
from app.config import Settings

MISCONFIGURED = "The broker is misconfigured; try again later"


@pytest.fixture
def settings(keycloak_server) -> Settings:
    """Settings of a broker in front of the test Keycloak."""
    return Settings(
        keycloak_url=keycloak_server.base_url,
        keycloak_realm=keycloak_server.realm,
        client_id=keycloak_server.client_id,
        client_secret=keycloak_server.client_secret,
    )


def call(settings: Settings, path: str, body: dict) -> tuple[int, dict]:
    response = create_app(settings).test_client().post(path, json=body)
    return response.status_code, json.loads(response.get_data(as_text=True))


LOGIN = ("/api/auth/login", {"username": "alice", "password": "alice-password"})
REFRESH = ("/api/auth/refresh-token", {"refresh_token": "anything"})


@pytest.mark.parametrize("route", [LOGIN, REFRESH], ids=["login", "refresh"])
def test_a_wrong_client_secret_is_502_unauthorized_client(settings, route, caplog):
    """Keycloak refusing the broker's secret is the operator's problem: 502, and an ERROR line for them."""
    wrong = replace(settings, client_secret="wrong-secret-marker")
    with caplog.at_level(logging.WARNING):
        assert call(wrong, *route) == (502, {"error": "unauthorized_client", "message": MISCONFIGURED})
    assert "KEYCLOAK_CLIENT_SECRET" in caplog.text
    assert "wrong-secret-marker" not in caplog.text


def test_an_unknown_client_is_502_invalid_client(settings):
    """A client id the realm does not know: 502 invalid_client."""
    assert call(replace(settings, client_id="no-such-client"), *LOGIN) == (
        502,
        {"error": "invalid_client", "message": MISCONFIGURED},
    )


def test_a_client_without_direct_grants_is_502_unauthorized_client(settings, kc_admin):
    """A confidential client whose direct access grants are off: 502 unauthorized_client."""
    client_id = f"no-direct-{uuid.uuid4().hex[:8]}"
    internal_id = kc_admin.create_client({
        "clientId": client_id, "publicClient": False, "secret": "no-direct-secret",
        "directAccessGrantsEnabled": False, "standardFlowEnabled": True, "redirectUris": ["http://127.0.0.1/*"],
    })
    try:
        configured = replace(settings, client_id=client_id, client_secret="no-direct-secret")
        assert call(configured, *LOGIN) == (502, {"error": "unauthorized_client", "message": MISCONFIGURED})
    finally:
        kc_admin.delete_client(internal_id)


def test_a_wrong_realm_is_502_upstream_error(settings):
    """A realm that does not exist has no discovery document: 502 upstream_error."""
    assert call(replace(settings, keycloak_realm="no-such-realm"), *LOGIN) == (
        502,
        {"error": "upstream_error", "message": "The identity provider returned an unusable answer"},
    )


def test_nothing_listening_is_503(settings):
    """A Keycloak address with nothing behind it: 503 upstream_unavailable."""
    assert call(replace(settings, keycloak_url="http://127.0.0.1:1"), *REFRESH) == (
        503,
        {"error": "upstream_unavailable", "message": "The identity provider cannot be reached; try again later"},
    )


def test_a_refresh_token_of_another_client_is_refused(settings, keycloak_server, kc_admin):
    """A refresh token issued to another client of the realm answers 400 invalid_grant."""
    client_id = f"other-{uuid.uuid4().hex[:8]}"
    internal_id = kc_admin.create_client({
        "clientId": client_id, "publicClient": False, "secret": "other-secret",
        "directAccessGrantsEnabled": True, "standardFlowEnabled": False,
    })
    try:
        other = keycloak_server.token(grant_type="password", username="alice", password="alice-password",
                                      client_id=client_id, client_secret="other-secret").json()
        assert call(settings, "/api/auth/refresh-token", {"refresh_token": other["refresh_token"]}) == (
            400,
            {"error": "invalid_grant", "message": "Refresh token was issued to another client"},
        )
    finally:
        kc_admin.delete_client(internal_id)
