"""Every way Keycloak can refuse or fail, as the client sees it: status and whole body."""

from __future__ import annotations

import logging

import pytest
import requests

from tests.support.keycloak_stub import LOGOUT_URL, SECRET, KeycloakStub, body_of

LOGIN = ("/api/auth/login", {"username": "alice", "password": "alice-password"})
REFRESH = ("/api/auth/refresh-token", {"refresh_token": "rt"})
LOGOUT = ("/api/auth/logout", {"refresh_token": "rt"})

CLIENT_MISCONFIGURED = "The broker is misconfigured; try again later"


def post(client, route):
    """POST the route's sample body as JSON."""
    path, body = route
    return client.post(path, json=body)


@pytest.mark.parametrize(
    ("route", "kc_status", "kc_error", "kc_description", "status", "error", "message"),
    [
        # client authentication: the broker's own problem
        (LOGIN, 400, "invalid_client", "Missing client_id parameter", 502, "invalid_client", CLIENT_MISCONFIGURED),
        (LOGIN, 401, "invalid_client", "Invalid client or Invalid client credentials", 502, "invalid_client",
         CLIENT_MISCONFIGURED),
        (REFRESH, 401, "unauthorized_client", "Invalid client or Invalid client credentials", 502,
         "unauthorized_client", CLIENT_MISCONFIGURED),
        (LOGIN, 400, "unauthorized_client", "Client not allowed for direct access grants", 502,
         "unauthorized_client", CLIENT_MISCONFIGURED),
        (LOGOUT, 401, "unauthorized_client", "Invalid client or Invalid client credentials", 502,
         "unauthorized_client", CLIENT_MISCONFIGURED),
        # password grant (the status changed between Keycloak releases; it is normalised)
        (LOGIN, 401, "invalid_grant", "Invalid user credentials", 401, "invalid_grant", "Invalid username or password"),
        (LOGIN, 400, "invalid_grant", "Invalid user credentials", 401, "invalid_grant", "Invalid username or password"),
        (LOGIN, 400, "invalid_grant", "Account disabled", 401, "invalid_grant", "Account is disabled"),
        (LOGIN, 400, "invalid_grant", "Account temporarily disabled", 401, "invalid_grant",
         "Account is temporarily locked"),
        (LOGIN, 400, "invalid_grant", "Account is not fully set up", 401, "account_setup_required",
         "Account is not fully set up; finish setting it up in the account console"),
        (LOGIN, 400, "invalid_grant", "Something new", 401, "invalid_grant", "Login was refused"),
        (LOGIN, 400, "invalid_scope", "Invalid scopes: nope", 400, "invalid_scope",
         "The requested scope is not allowed for this client"),
        # refresh grant
        (REFRESH, 400, "invalid_grant", "Invalid refresh token", 400, "invalid_grant", "Invalid refresh token"),
        (REFRESH, 400, "invalid_grant", "Token is not active", 400, "invalid_grant", "Refresh token expired"),
        (REFRESH, 400, "invalid_grant", "Invalid refresh token. Token client and authorized client don't match", 400,
         "invalid_grant", "Refresh token was issued to another client"),
        (REFRESH, 400, "invalid_grant", "Session not active", 400, "invalid_grant", "Session has ended"),
        (REFRESH, 400, "invalid_grant", "Session doesn't have required client", 400, "invalid_grant",
         "Session has ended"),
        (REFRESH, 400, "invalid_grant", "Stale token", 400, "invalid_grant", "Session has ended"),
        (REFRESH, 400, "invalid_grant", "Maximum allowed refresh token reuse exceeded", 400, "invalid_grant",
         "Refresh token was already used; the session has been ended"),
        (REFRESH, 400, "invalid_grant", "User disabled", 400, "invalid_grant", "Account is disabled"),
        (REFRESH, 400, "invalid_grant", None, 400, "invalid_grant", "Invalid refresh token"),
        (REFRESH, 400, "invalid_scope", "Invalid scopes: admin", 400, "invalid_scope",
         "The requested scope is not allowed for this client"),
        (REFRESH, 400, "invalid_request", "No refresh token", 400, "refresh_token_required",
         "Refresh token is required"),
        # logout
        (LOGOUT, 400, "invalid_grant", "Invalid refresh token", 400, "invalid_grant", "Invalid refresh token"),
        (LOGOUT, 400, "invalid_grant", "Invalid refresh token. Token client and authorized client don't match", 400,
         "invalid_grant", "Refresh token was issued to another client"),
        # errors the broker does not know, or Keycloak's own failure
        (LOGIN, 400, "unsupported_grant_type", "Unsupported grant_type", 502, "upstream_error",
         "The identity provider returned an unusable answer"),
        (REFRESH, 500, "unknown_error", None, 502, "upstream_error", "The identity provider returned an unusable answer"),
        (LOGOUT, 503, "temporarily_unavailable", None, 502, "upstream_error",
         "The identity provider returned an unusable answer"),
    ],
)
def test_keycloak_refusals_map_to_the_contract(
    client, keycloak, route, kc_status, kc_error, kc_description, status, error, message
):
    """Each Keycloak error answer becomes the documented status and body."""
    url = LOGOUT_URL if route is LOGOUT else None
    keycloak.refuses(kc_status, kc_error, kc_description, **({"url": url} if url else {}))
    response = post(client, route)
    assert (response.status_code, body_of(response)) == (status, {"error": error, "message": message})


UNUSABLE = {"error": "upstream_error", "message": "The identity provider returned an unusable answer"}


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (502, "<html><body>Bad Gateway</body></html>", "text/html"),
        (200, "<html>login page</html>", "text/html"),
        (200, "not json at all", "application/json"),
        (200, '{"token_type": "Bearer"}', "application/json"),
        (200, '{"access_token": 42}', "application/json"),
        (200, '["access_token"]', "application/json"),
        (200, '{"access_token": "a", "expires_in": "300"}', "application/json"),
        (400, "", "text/plain"),
        (401, '{"message": "no error key"}', "application/json"),
    ],
)
def test_unusable_keycloak_answers_are_upstream_errors(client, keycloak, status, body, content_type):
    """HTML, non-JSON, JSON without the expected fields: 502 upstream_error, nothing passed through."""
    keycloak.answers(status, body, content_type)
    response = post(client, REFRESH)
    assert (response.status_code, body_of(response)) == (502, UNUSABLE)



def test_an_html_page_from_the_logout_endpoint_is_not_a_logout(client, keycloak):
    """Keycloak's logout confirmation page (a 200 in HTML) is an upstream error, not a success."""
    keycloak.answers(200, "<html>Do you want to log out?</html>", "text/html", url=LOGOUT_URL)
    response = post(client, LOGOUT)
    assert (response.status_code, body_of(response)) == (502, UNUSABLE)


def test_login_refusal_from_unreachable_keycloak_is_503_with_retry_after(client, keycloak):
    """Connection refused: 503 upstream_unavailable with Retry-After."""
    keycloak.fails(requests.ConnectionError("Connection refused"))
    response = post(client, LOGIN)
    assert (response.status_code, body_of(response)) == (
        503,
        {"error": "upstream_unavailable", "message": "The identity provider cannot be reached; try again later"},
    )
    assert response.headers["Retry-After"] == "5"


def test_discovery_unreachable_is_503_and_retried_on_the_next_request(client, keycloak):
    """Without the discovery document the caller gets 503; the next request fetches it again."""
    keycloak.is_down()
    response = post(client, REFRESH)
    assert (response.status_code, body_of(response)) == (
        503,
        {"error": "upstream_unavailable", "message": "The identity provider cannot be reached; try again later"},
    )
    keycloak.mock.reset()
    KeycloakStub(keycloak.mock).issues_tokens()
    assert client.post("/api/auth/refresh-token", json={"refresh_token": "another-token"}).status_code == 200


def test_timeout_is_504(client, keycloak):
    """Keycloak that does not answer in time: 504 upstream_timeout."""
    keycloak.fails(requests.ReadTimeout("read timed out"))
    response = post(client, REFRESH)
    assert (response.status_code, body_of(response)) == (
        504,
        {"error": "upstream_timeout", "message": "The identity provider did not answer in time"},
    )


def test_a_failed_refresh_is_never_retried(client, keycloak):
    """A refresh whose POST failed is sent exactly once: a replay would be a reuse."""
    keycloak.fails(requests.ConnectionError("reset by peer"))
    post(client, REFRESH)
    assert len(keycloak.token_calls()) == 1


def test_client_rejection_logs_an_actionable_line_without_the_secret(client, keycloak, caplog):
    """A rejected broker client is logged for the operator, naming the client but never its secret."""
    keycloak.refuses(401, "unauthorized_client", "Invalid client or Invalid client credentials")
    with caplog.at_level(logging.INFO):
        post(client, LOGIN)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "'token-broker'" in errors[0] and "KEYCLOAK_CLIENT_SECRET" in errors[0]
    assert SECRET not in caplog.text
