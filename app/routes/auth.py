"""POST /api/auth/login, /api/auth/refresh-token and /api/auth/logout."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from app.keycloak_client import KeycloakClient, TokenSet
from app.metrics import REFRESHES
from app.request_body import read_body
from app.schemas import login_request, logout_request, message_response, refresh_request, token_response

bp = Blueprint("auth", __name__, url_prefix="/api/auth")


def _keycloak() -> KeycloakClient:
    return current_app.extensions["keycloak"]


def _tokens(message: str, tokens: TokenSet) -> Response:
    return jsonify(token_response.dump({"message": message, "token": tokens}))


@bp.post("/login")
def login() -> Response:
    """Password login: 200 with the token object, 401 invalid_grant when Keycloak refuses the user."""
    data = login_request.load_or_raise(read_body())
    scope = data.get("scope") or current_app.config["BROKER_SETTINGS"].login_scope
    return _tokens("Login successful", _keycloak().login(data["username"], data["password"], scope))


@bp.post("/refresh-token")
def refresh_token() -> Response:
    """Refresh grant: 200 with a new token object, 400 invalid_grant when the refresh token is refused."""
    data = refresh_request.load_or_raise(read_body())
    REFRESHES.labels("upstream").inc()
    return _tokens("Token refreshed successfully", _keycloak().refresh(data["refresh_token"], data.get("scope")))


@bp.post("/logout")
def logout() -> Response:
    """End the Keycloak session of the refresh token; 200 also when it had already ended."""
    data = logout_request.load_or_raise(read_body())
    _keycloak().logout(data["refresh_token"])
    return jsonify(message_response.dump({"message": "Logged out successfully"}))
