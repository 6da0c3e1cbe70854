"""Brokers configured with other clients or addresses, against the real Keycloak.

A misconfigured broker answers 502/503, never a reason for the frontend to log the user out.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

import pytest

from app import create_app
from app.config import Settings
from tests.integration.helpers import temp_client

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
    with temp_client(kc_admin, secret="no-direct-secret", directAccessGrantsEnabled=False) as client_id:
        configured = replace(settings, client_id=client_id, client_secret="no-direct-secret")
        assert call(configured, *LOGIN) == (502, {"error": "unauthorized_client", "message": MISCONFIGURED})


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
    """A refresh token issued to another client of the realm answers 400 invalid_grant, for refresh and logout."""
    with temp_client(kc_admin, secret="other-secret") as client_id:
        other = keycloak_server.token(grant_type="password", username="alice", password="alice-password",
                                      client_id=client_id, client_secret="other-secret").json()
        expected = (400, {"error": "invalid_grant", "message": "Refresh token was issued to another client"})
        assert call(settings, "/api/auth/refresh-token", {"refresh_token": other["refresh_token"]}) == expected
        assert call(settings, "/api/auth/logout", {"refresh_token": other["refresh_token"]}) == expected


def test_an_expired_refresh_token_is_refused_as_expired(settings, kc_admin, make_user):
    """A refresh token past its lifetime answers 400 invalid_grant "Refresh token expired"."""
    user = make_user()
    with temp_client(kc_admin, secret="short-secret", attributes={"client.session.idle.timeout": "2"}) as client_id:
        short = replace(settings, client_id=client_id, client_secret="short-secret")
        status, body = call(short, "/api/auth/login", {"username": user.username, "password": user.password})
        assert (status, body["token"]["refresh_expires_in"]) == (200, 2)
        time.sleep(3.2)
        assert call(short, "/api/auth/refresh-token", {"refresh_token": body["token"]["refresh_token"]}) == (
            400,
            {"error": "invalid_grant", "message": "Refresh token expired"},
        )
