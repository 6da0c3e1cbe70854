"""POST /api/auth/login, /api/auth/register, /api/auth/refresh-token and /api/auth/logout."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from app.accounts import network_of, setup_message, unverified_claims
from app.errors import AccountSetupRequired, BrokerError, LocationBlocked, LoginRejected, NotFound
from app.keycloak_client import TokenSet
from app.web import audit_trail
from app.web.context import broker
from app.web.cookies import (
    clear_cookie_if_session_over,
    clear_refresh_cookie,
    cookie_mode,
    refresh_token_from,
    require_csrf_proof,
    set_refresh_cookie,
)
from app.web.rate_limits import client_address, client_fingerprint
from app.web.request_body import read_body
from app.web.schemas import (
    login_request,
    logout_request,
    message_response,
    refresh_request,
    register_request,
    register_response,
    token_response,
)

bp = Blueprint("auth", __name__, url_prefix="/api/auth")


def _token_response(message: str, tokens: TokenSet) -> Response:
    """The token answer; in cookie mode the refresh token goes into the cookie instead of the JSON."""
    return _with_cookie(token_response.dump({"message": message, "token": tokens}), tokens)


def _with_cookie(body: dict, tokens: TokenSet) -> Response:
    """`body` as JSON; in cookie mode without its refresh token, which goes into the cookie."""
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
    audit_trail.note(user=data["username"])
    parts = broker()
    attempt = parts.login_attempts.admit(client_address(), data["username"])  # counted before Keycloak is asked
    try:
        tokens = parts.keycloak.login(data["username"], data["password"], data.get("scope") or parts.settings.login_scope)
    except AccountSetupRequired:
        # The password was right (Keycloak says so only then): no guess, and the user learns what is pending.
        parts.login_attempts.give_back(attempt)
        raise AccountSetupRequired(setup_message(parts.keycloak.pending_actions(data["username"]))) from None
    except LoginRejected:
        raise  # a refused guess: it stays counted
    except BrokerError:
        parts.login_attempts.give_back(attempt)  # Keycloak could not say: no guess was judged
        raise
    parts.login_attempts.give_back(attempt)
    audit_trail.note(session=_sid(tokens.access_token))
    _bind_session(tokens)
    return _token_response("Login successful", tokens)


@bp.post("/register")
def register() -> Response:
    """Create an account and log it in: 201 with the user and the token object (BROKER_REGISTRATION, else 404)."""
    parts = broker()
    if not parts.settings.registration:
        raise NotFound()
    if cookie_mode():
        require_csrf_proof()
    data = register_request.load_or_raise(read_body())
    audit_trail.note(user=data["username"])
    account = parts.registration.register(username=data["username"], email=data["email"], password=data["password"],
                                          given_name=data.get("given_name"), family_name=data.get("family_name"))
    audit_trail.note(user=account.username, session=_sid(account.tokens.access_token))
    _bind_session(account.tokens)
    body = register_response.dump({"message": "Registration successful", "token": account.tokens,
                                   "user": {"sub": account.sub, "username": account.username, "email": account.email}})
    response = _with_cookie(body, account.tokens)
    response.status_code = 201
    return response


def _sid(jwt: str | None) -> str | None:
    """The Keycloak session id in a token Keycloak issued (or one it will check), if any."""
    sid = unverified_claims(jwt).get("sid")
    return sid if isinstance(sid, str) else None


def _about(jwt: str) -> None:
    """Note for the audit event the subject and session a refresh or logout token names (as the token claims
    it: Keycloak checks it afterwards). A refresh token carries no username, so refresh and logout name the `sub`."""
    sub = unverified_claims(jwt).get("sub")
    audit_trail.note(user=sub if isinstance(sub, str) else None, session=_sid(jwt))


def _bind_session(tokens: TokenSet) -> None:
    """BROKER_IP_BINDING: remember the network this session logged in (or refreshed) from."""
    addresses = broker().session_addresses
    sid = unverified_claims(tokens.access_token).get("sid")
    if addresses is not None and isinstance(sid, str):
        addresses.remember(sid, network_of(client_address(), broker().settings.ip_binding),
                           ttl=float(tokens.refresh_expires_in or 36000))


def _check_binding(refresh_token: str) -> None:
    """BROKER_IP_BINDING: refuse (401 location_blocked) a refresh from another network than its session's login."""
    addresses = broker().session_addresses
    sid = unverified_claims(refresh_token).get("sid")
    if addresses is not None and isinstance(sid, str) and \
            not addresses.allows(sid, network_of(client_address(), broker().settings.ip_binding)):
        raise LocationBlocked()


@bp.post("/refresh-token")
def refresh_token() -> Response:
    """Refresh grant (coalesced): 200 with a new token object, 400 invalid_grant when the token is refused."""
    if cookie_mode():
        require_csrf_proof()  # even with a body token: the answer sets the cookie (login CSRF otherwise)
    body, from_cookie = refresh_token_from(read_body())
    if from_cookie:
        clear_cookie_if_session_over()  # before validation: a cookie too long to be a token is dropped too
    data = refresh_request.load_or_raise(body)
    _about(data["refresh_token"])
    _check_binding(data["refresh_token"])
    tokens = broker().refresher.refresh(data["refresh_token"], data.get("scope"), client_fingerprint())
    _bind_session(tokens)
    return _token_response("Token refreshed successfully", tokens)


@bp.post("/logout")
def logout() -> Response:
    """End the Keycloak session of the refresh token; 200 also when it had already ended."""
    if cookie_mode():
        require_csrf_proof()  # even with a body token: the answer clears the cookie
    body, from_cookie = refresh_token_from(read_body())
    if from_cookie:
        clear_cookie_if_session_over()
    data = logout_request.load_or_raise(body)
    _about(data["refresh_token"])
    broker().keycloak.logout(data["refresh_token"])
    response = jsonify(message_response.dump({"message": "Logged out successfully"}))
    if cookie_mode():
        clear_refresh_cookie(response)
    return response
