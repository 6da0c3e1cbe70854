"""POST /api/auth/login, /api/auth/refresh-token and /api/auth/logout."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from app.keycloak_client import TokenSet
from app.web.context import broker
from app.web.cookies import (
    clear_cookie_if_session_over,
    clear_refresh_cookie,
    cookie_mode,
    refresh_token_from,
    require_csrf_proof,
    set_refresh_cookie,
)
from app.web.request_body import read_body
from app.web.schemas import login_request, logout_request, message_response, refresh_request, token_response

bp = Blueprint("auth", __name__, url_prefix="/api/auth")


def _token_response(message: str, tokens: TokenSet) -> Response:
    """The token answer; in cookie mode the refresh token goes into the cookie instead of the JSON."""
    body = token_response.dump({"message": message, "token": tokens})
    if not cookie_mode():
        return jsonify(body)
    body["token"].pop("refresh_token", None)
    response = jsonify(body)
    set_refresh_cookie(response, tokens)
    return response


@bp.post("/login")
def login() -> Response:
    """Password login: 200 with the token object, 401 invalid_grant when Keycloak refuses the user."""
    if cookie_mode():
        require_csrf_proof()  # login CSRF: a cross-site form must not plant someone else's session cookie
    data = login_request.load_or_raise(read_body())
    scope = data.get("scope") or broker().settings.login_scope
    return _token_response("Login successful", broker().keycloak.login(data["username"], data["password"], scope))


@bp.post("/refresh-token")
def refresh_token() -> Response:
    """Refresh grant (coalesced): 200 with a new token object, 400 invalid_grant when the token is refused."""
    if cookie_mode():
        require_csrf_proof()  # even with a body token: the answer sets the cookie (login CSRF otherwise)
    body, from_cookie = refresh_token_from(read_body())
    data = refresh_request.load_or_raise(body)
    if from_cookie:
        clear_cookie_if_session_over()
    tokens = broker().refresher.refresh(data["refresh_token"], data.get("scope"))
    return _token_response("Token refreshed successfully", tokens)


@bp.post("/logout")
def logout() -> Response:
    """End the Keycloak session of the refresh token; 200 also when it had already ended."""
    if cookie_mode():
        require_csrf_proof()  # even with a body token: the answer clears the cookie
    body, from_cookie = refresh_token_from(read_body())
    data = logout_request.load_or_raise(body)
    if from_cookie:
        clear_cookie_if_session_over()
    broker().keycloak.logout(data["refresh_token"])
    response = jsonify(message_response.dump({"message": "Logged out successfully"}))
    if cookie_mode():
        clear_refresh_cookie(response)
    return response
