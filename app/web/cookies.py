"""Cookie transport mode: the refresh token travels in an HttpOnly cookie and never reaches JavaScript.

Opt-in with BROKER_TOKEN_TRANSPORT=cookie. Login and refresh set the cookie (HttpOnly, Secure,
SameSite=Strict, Path=/api/auth, Max-Age from refresh_expires_in) and leave refresh_token out of the JSON;
refresh and logout read it from the cookie when the body has none; logout clears it. Every login, refresh
and logout in cookie mode must carry the CSRF proof, wherever its token comes from (each answer sets or
clears the cookie): the configured header (which a cross-site form cannot send) and, when the browser
sends an Origin, an allowed origin.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from flask import Response, after_this_request, request

from app.config import COOKIE_TRANSPORT, Settings
from app.errors import CsrfFailed, InvalidRequest, RefreshRejected
from app.keycloak_client import TokenSet
from app.web.context import broker
from app.web.errors import failure

COOKIE_PATH = "/api/auth"


def _settings() -> Settings:
    return broker().settings


def cookie_mode() -> bool:
    """True when the refresh token travels in a cookie."""
    return _settings().token_transport == COOKIE_TRANSPORT


def require_csrf_proof() -> None:
    """Raise CsrfFailed unless the request carries the CSRF header and, if it names one, an allowed Origin."""
    settings = _settings()
    if not request.headers.get(settings.csrf_header, "").strip():
        raise CsrfFailed()
    origin = request.headers.get("Origin")
    if origin is not None and origin.lower() not in settings.cors_origins and _netloc(origin) != request.host:
        raise CsrfFailed()


def _netloc(origin: str) -> str | None:
    """The host[:port] of an Origin header, or None when it is not a URL at all (`http://[`, say)."""
    try:
        return urlsplit(origin).netloc
    except ValueError:
        return None


def refresh_token_from(data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The body, with refresh_token taken from the cookie when the body has none; and whether it came from there."""
    if not cookie_mode() or data.get("refresh_token") not in (None, ""):
        return data, False
    cookies = request.cookies.getlist(_settings().cookie_name)
    if len(cookies) > 1:
        # Another site on a parent domain (or a script) can plant a second cookie of the same name; which one is
        # the user's cannot be told, so neither is used, and neither is cleared.
        raise InvalidRequest("The request carries more than one refresh cookie; clear this site's cookies")
    cookie = cookies[0] if cookies else ""
    if not cookie.strip():
        return data, False
    return {**data, "refresh_token": cookie}, True


def set_refresh_cookie(response: Response, tokens: TokenSet) -> None:
    """Put the refresh token into the cookie, for as long as Keycloak says it lives.

    Keycloak gives offline tokens `refresh_expires_in: 0` (no expiry of their own): those become a cookie
    without Max-Age, which lives as long as the browser session, rather than Max-Age=0, which deletes it.
    """
    settings = _settings()
    lifetime = tokens.refresh_expires_in or None
    response.set_cookie(
        settings.cookie_name, tokens.refresh_token or "", max_age=lifetime, path=COOKIE_PATH,
        secure=settings.cookie_secure, httponly=True, samesite="Strict",
    )


def clear_refresh_cookie(response: Response) -> None:
    """Expire the cookie in the browser."""
    settings = _settings()
    response.delete_cookie(settings.cookie_name, path=COOKIE_PATH, secure=settings.cookie_secure, httponly=True,
                           samesite="Strict")


def clear_cookie_if_session_over() -> None:
    """Drop the refresh cookie from this request's answer if Keycloak refused the token it held."""

    @after_this_request
    def clear(response: Response) -> Response:
        if isinstance(failure(), RefreshRejected):
            clear_refresh_cookie(response)
        return response
