"""Fixtures for the app with Keycloak's HTTP faked by `responses` (cases the real server can't produce on demand)."""

from __future__ import annotations

from typing import Iterator

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from app.config import Settings
from tests.support.keycloak_stub import KEYCLOAK, SECRET, KeycloakStub
from tests.support.requests_wire import RequestsWire


@pytest.fixture(autouse=True)
def wire_through_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every broker built in these tests talks to Keycloak through `requests`, which `responses` fakes
    (tests/support/requests_wire.py; the real wire is tested on sockets and against a real Keycloak)."""
    monkeypatch.setattr("app.keycloak_client.Wire", RequestsWire)

@pytest.fixture
def settings() -> Settings:
    """Settings for a broker in front of the faked Keycloak."""
    return Settings(keycloak_url=KEYCLOAK, keycloak_realm="demo", client_id="token-broker", client_secret=SECRET)


@pytest.fixture
def keycloak() -> Iterator[KeycloakStub]:
    """A faked Keycloak; an answer registered but not used is fine, an unregistered call fails the test."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield KeycloakStub(mock)


@pytest.fixture
def app(settings: Settings, keycloak: KeycloakStub) -> Flask:
    """A fresh broker app per test."""
    return create_app(settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """Flask's test client for the app."""
    return app.test_client()
