"""Bad input never reaches Keycloak and never produces a 500: every refusal in the fixed shape."""

from __future__ import annotations

import pytest

from tests.support.keycloak_stub import LOGOUT_URL, body_of

REQUIRED = {"error": "refresh_token_required", "message": "Refresh token is required"}


def invalid(message: str) -> dict:
    return {"error": "invalid_request", "message": message}


@pytest.mark.parametrize(
    ("path", "data", "content_type", "expected"),
    [
        # not JSON, not an object
        ("/api/auth/login", b"{bad json", "application/json", invalid("The request body is not valid JSON")),
        ("/api/auth/login", b'["alice", "pw"]', "application/json", invalid("The request body must be a JSON object")),
        ("/api/auth/login", b'"alice"', "application/json", invalid("The request body must be a JSON object")),
        ("/api/auth/login", b"null", "application/json", invalid("The request body must be a JSON object")),
        ("/api/auth/login", b"\xff\xfe{}", "application/json", invalid("The request body is not valid UTF-8")),
        ("/api/auth/login", b"[" * 5000 + b"]" * 5000, "application/json", invalid("The request body is not valid JSON")),
        ("/api/auth/login", b'{"username": "a", "username": "b", "password": "p"}', "application/json",
         invalid("Field 'username' appears more than once")),
        ("/api/auth/refresh-token", b"refresh_token=a&refresh_token=b", "application/x-www-form-urlencoded",
         invalid("Field 'refresh_token' appears more than once")),
        # login fields
        ("/api/auth/login", b"{}", "application/json", invalid("username is required")),
        ("/api/auth/login", b"", None, invalid("username is required")),
        ("/api/auth/login", b'{"username": "alice"}', "application/json", invalid("password is required")),
        ("/api/auth/login", b'{"username": null, "password": "p"}', "application/json", invalid("username is required")),
        ("/api/auth/login", b'{"username": "", "password": "p"}', "application/json",
         invalid("username must not be blank")),
        ("/api/auth/login", b'{"username": "  ", "password": "p"}', "application/json",
         invalid("username must not be blank")),
        ("/api/auth/login", b'{"username": 42, "password": "p"}', "application/json",
         invalid("username must be a string")),
        ("/api/auth/login", b'{"username": ["alice"], "password": "p"}', "application/json",
         invalid("username must be a string")),
        ("/api/auth/login", b'{"username": "alice", "password": true}', "application/json",
         invalid("password must be a string")),
        ("/api/auth/login", b'{"username": "alice", "password": " "}', "application/json",
         invalid("password must not be blank")),
        ("/api/auth/login", b'{"username": "alice", "password": "p", "scope": 7}', "application/json",
         invalid("scope must be a string")),
        ("/api/auth/login", b'{"username": "alice", "password": "p", "scope": null}', "application/json",
         invalid("scope must be a string")),
        ("/api/auth/login", b'{"username": "' + b"a" * 256 + b'", "password": "p"}', "application/json",
         invalid("username must be at most 255 characters")),
        ("/api/auth/login", b"username=&password=p", "application/x-www-form-urlencoded",
         invalid("username must not be blank")),
        # refresh and logout: every unusable refresh_token is refresh_token_required
        ("/api/auth/refresh-token", b"{}", "application/json", REQUIRED),
        ("/api/auth/refresh-token", b"", None, REQUIRED),
        ("/api/auth/refresh-token", b'{"refresh_token": null}', "application/json", REQUIRED),
        ("/api/auth/refresh-token", b'{"refresh_token": ""}', "application/json", REQUIRED),
        ("/api/auth/refresh-token", b'{"refresh_token": " \\t\\n"}', "application/json", REQUIRED),
        ("/api/auth/refresh-token", b'{"refresh_token": 123}', "application/json", REQUIRED),
        ("/api/auth/refresh-token", b'{"refresh_token": {"token": "x"}}', "application/json", REQUIRED),
        ("/api/auth/refresh-token", b'{"refreshToken": "x"}', "application/json", REQUIRED),
        ("/api/auth/refresh-token", b"refresh_token=", "application/x-www-form-urlencoded", REQUIRED),
        ("/api/auth/refresh-token", b'{"refresh_token": "x", "scope": 1}', "application/json",
         invalid("scope must be a string")),
        ("/api/auth/logout", b"{}", "application/json", REQUIRED),
        ("/api/auth/logout", b'{"refresh_token": false}', "application/json", REQUIRED),
        ("/api/auth/logout", b"[]", "application/json", invalid("The request body must be a JSON object")),
    ],
)
def test_bad_bodies_are_refused_before_keycloak(client, keycloak, path, data, content_type, expected):
    """A malformed body answers 400 with a clear message and Keycloak is never called."""
    response = client.post(path, data=data, content_type=content_type)
    assert (response.status_code, body_of(response)) == (400, expected)
    assert keycloak.token_calls() == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "multipart/form-data; boundary=x"])
def test_other_content_types_are_415(client, keycloak, content_type):
    """A body in any other content type answers 415 in the fixed shape."""
    response = client.post("/api/auth/refresh-token", data=b"refresh_token=x", content_type=content_type)
    assert (response.status_code, body_of(response)) == (
        415,
        {
            "error": "unsupported_media_type",
            "message": "Send the body as application/json or application/x-www-form-urlencoded",
        },
    )
    assert keycloak.token_calls() == []


def test_json_with_a_charset_is_json(client, keycloak):
    """`application/json; charset=utf-8` is read as JSON."""
    response = client.post("/api/auth/refresh-token", data=b"{}", content_type="application/json; charset=utf-8")
    assert (response.status_code, body_of(response)) == (400, REQUIRED)


TOO_LARGE = {"error": "payload_too_large", "message": "The request body is too large"}


def test_a_body_over_the_limit_is_413(client, keycloak):
    """A body over 16 KiB is refused with 413 before it is parsed."""
    response = client.post(
        "/api/auth/refresh-token", data=b'{"refresh_token": "' + b"x" * 17000 + b'"}', content_type="application/json"
    )
    assert (response.status_code, body_of(response)) == (413, TOO_LARGE)
    assert keycloak.token_calls() == []


def test_the_limit_is_configurable(settings, keycloak):
    """BROKER_MAX_BODY_BYTES moves the limit."""
    from dataclasses import replace

    from app import create_app

    client = create_app(replace(settings, max_body_bytes=512)).test_client()
    response = client.post("/api/auth/refresh-token", json={"refresh_token": "x" * 600})
    assert (response.status_code, body_of(response)) == (413, TOO_LARGE)


def test_unknown_routes_are_404(client):
    """No such route: 404 not_found in the fixed shape."""
    response = client.get("/api/auth/nope")
    assert (response.status_code, body_of(response)) == (404, {"error": "not_found", "message": "No such route"})


@pytest.mark.parametrize(("method", "path"), [("GET", "/api/auth/login"), ("PUT", "/api/auth/refresh-token"),
                                              ("DELETE", "/api/auth/logout"), ("POST", "/health")])
def test_wrong_methods_are_405_with_allow(client, method, path):
    """A route that exists with another method: 405 method_not_allowed and an Allow header."""
    response = client.open(path, method=method)
    assert (response.status_code, body_of(response)) == (
        405,
        {"error": "method_not_allowed", "message": "This method is not allowed on this route"},
    )
    assert response.headers["Allow"]


def test_a_body_exactly_at_the_limit_is_read(client, keycloak):
    """A body of exactly BROKER_MAX_BODY_BYTES is accepted (the limit is inclusive)."""
    keycloak.issues_tokens()
    prefix, suffix = b'{"refresh_token": "', b'"}'
    body = prefix + b"x" * (16384 - len(prefix) - len(suffix)) + suffix
    assert len(body) == 16384
    response = client.post("/api/auth/refresh-token", data=body, content_type="application/json")
    # Read and validated: a refresh token that long cannot be one of the realm's.
    assert (response.status_code, body_of(response)) == (400, {"error": "invalid_grant", "message": "Invalid refresh token"})
    assert keycloak.token_calls() == []


@pytest.mark.parametrize("path", ["/api/auth/refresh-token", "/api/auth/logout"])
@pytest.mark.parametrize(("length", "reaches_keycloak"), [(4000, True), (4001, False), (8192, False)])
def test_a_refresh_token_longer_than_keycloak_reads_is_invalid_grant(client, keycloak, path, length, reaches_keycloak):
    """Keycloak drops form fields over 4,000 characters: a longer token is refused here, not sent as nothing."""
    keycloak.refuses(400, "invalid_grant", "Invalid refresh token")
    keycloak.refuses(400, "invalid_grant", "Invalid refresh token", url=LOGOUT_URL)
    response = client.post(path, json={"refresh_token": "x" * length})
    sent = keycloak.token_calls() + keycloak.token_calls(LOGOUT_URL)
    assert (response.status_code, body_of(response), len(sent) == 1) == (
        400, {"error": "invalid_grant", "message": "Invalid refresh token"}, reaches_keycloak)


@pytest.mark.parametrize("path", ["/api/auth/login", "/api/auth/refresh-token", "/api/auth/logout"])
def test_a_lone_surrogate_escape_is_400_not_500(client, keycloak, path):
    """JSON can spell "\\ud800", which no UTF-8 text holds: 400 invalid_request, Keycloak untouched."""
    body = b'{"username": "a\\ud800", "password": "x", "refresh_token": "\\ud800"}'
    response = client.post(path, data=body, content_type="application/json")
    assert (response.status_code, body_of(response)) == (400, invalid("The request body is not valid UTF-8"))
    assert keycloak.token_calls() == []
