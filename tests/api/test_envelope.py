"""What every response carries: the request id, and for unexpected failures a bare 500 that leaks nothing."""

from __future__ import annotations

import logging
import re

import pytest
import requests
import responses

from tests.support.keycloak_stub import JWKS_URL, body_of


def test_a_sane_request_id_is_echoed(client):
    """The caller's own X-Request-ID comes back unchanged."""
    response = client.get("/health", headers={"X-Request-ID": "frontend-42.abc"})
    assert response.headers["X-Request-ID"] == "frontend-42.abc"


@pytest.mark.parametrize("incoming", ["", "x" * 129, "has space", "new\u00e9line", "<script>"])
def test_an_insane_request_id_is_replaced(client, incoming):
    """An empty, oversized or odd X-Request-ID is replaced with a fresh one."""
    response = client.get("/health", headers={"X-Request-ID": incoming})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


@pytest.mark.parametrize("path", ["/health", "/nope", "/api/auth/login"])
def test_every_response_has_a_request_id(client, path):
    """Successes, 404s and 405s all carry X-Request-ID."""
    assert re.fullmatch(r"[0-9a-f]{32}", client.get(path).headers["X-Request-ID"])


def test_an_unexpected_exception_is_a_bare_500_logged_with_the_request_id(app, keycloak, caplog):
    """A bug answers 500 internal_error with nothing leaked; the log has the traceback and request id."""

    def explode():
        raise RuntimeError("secret-marker-in-exception")

    app.add_url_rule("/api/auth/explode", "explode", explode)
    with caplog.at_level(logging.ERROR):
        response = app.test_client().get("/api/auth/explode", headers={"X-Request-ID": "rid-500"})
    assert (response.status_code, body_of(response)) == (
        500,
        {"error": "internal_error", "message": "The broker failed to handle the request"},
    )
    assert "rid-500" in caplog.text
    assert "secret-marker-in-exception" not in response.get_data(as_text=True)


def test_health_answers_without_keycloak(client, keycloak):
    """Liveness makes no upstream call and reports the service."""
    keycloak.is_down()
    response = client.get("/health")
    body = body_of(response)
    assert response.status_code == 200
    assert sorted(body) == ["service", "status", "timestamp", "uptime", "version"]
    assert (body["status"], body["service"]) == ("ok", "token-broker")
    assert len(keycloak.mock.calls) == 0


def test_ready_is_503_while_keycloak_is_unreachable(client, keycloak):
    """Readiness is 503 in the fixed shape with Retry-After until discovery is in hand."""
    keycloak.is_down()
    response = client.get("/ready")
    assert (response.status_code, body_of(response)) == (
        503,
        {"error": "upstream_unavailable", "message": "Keycloak's discovery document is not available yet"},
    )
    assert response.headers["Retry-After"] == "5"


def test_ready_is_503_while_the_signing_keys_are_missing(client, keycloak):
    """Readiness is 503 when discovery answers but the JWKS cannot be fetched."""
    keycloak.mock.replace(responses.GET, JWKS_URL, body=requests.ConnectionError("refused"))
    response = client.get("/ready")
    assert (response.status_code, body_of(response)) == (
        503,
        {"error": "upstream_unavailable", "message": "The realm's signing keys are not available yet"},
    )


def test_ready_is_200_once_discovery_and_keys_are_in_hand(client, keycloak):
    """Readiness is 200 when the discovery document and the signing keys were fetched."""
    response = client.get("/ready")
    assert (response.status_code, body_of(response)) == (200, {"status": "ready"})


def test_frequent_readiness_probes_do_not_hammer_keycloak(client, keycloak):
    """While Keycloak is down, ten probes in a row cost it one discovery attempt (the verdict is kept briefly)."""
    keycloak.is_down()
    statuses = [client.get("/ready").status_code for _ in range(10)]
    assert statuses == [503] * 10
    assert len(keycloak.mock.calls) == 1
