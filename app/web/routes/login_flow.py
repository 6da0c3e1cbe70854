"""GET /api/auth/authorize and /api/auth/callback: the code + PKCE login on Keycloak's own pages (cookie mode).

/authorize starts an attempt (app/code_flow.py) and sends the browser to Keycloak with it; the attempt rides
in a short-lived HttpOnly cookie on /api/auth/callback (SameSite=Lax: Keycloak's redirect back is a top-level
navigation from another origin). /callback finishes it: on success it sets the refresh-token cookie exactly as
a cookie-mode login does and redirects to `return_to`; the frontend then gets its access token from POST
/api/auth/refresh-token. A failed or forged callback answers 400 in the fixed shape and sets no session cookie.
Both routes are 404 unless BROKER_CODE_FLOW=true.
"""

from __future__ import annotations

from flask import Blueprint, Response, redirect, request

from app.errors import NotFound
from app.web import audit_trail
from app.web.context import broker
from app.web.cookies import set_refresh_cookie

bp = Blueprint("login_flow", __name__, url_prefix="/api/auth")

CALLBACK_PATH = "/api/auth/callback"


def _attempt_cookie() -> str:
    return "__Secure-login_attempt" if broker().settings.cookie_secure else "login_attempt"


def _enabled() -> None:
    if not broker().settings.code_flow:
        raise NotFound()


@bp.get("/authorize")
def authorize() -> Response:
    """302 to Keycloak's login page for a new attempt; 400 for a return_to that is not allowed."""
    _enabled()
    location, sealed = broker().code_flow.start(request.args.get("return_to"))
    response = redirect(location, code=302)
    response.set_cookie(_attempt_cookie(), sealed, max_age=600, path=CALLBACK_PATH,
                        secure=broker().settings.cookie_secure, httponly=True, samesite="Lax")
    return response


@bp.get("/callback")
def callback() -> Response:
    """302 to return_to with the session cookie set; 400 (no session cookie) for a failed or forged callback."""
    _enabled()
    parts = broker()
    tokens, return_to = parts.code_flow.finish(
        request.cookies.get(_attempt_cookie()), state=request.args.get("state"), code=request.args.get("code"),
        error=request.args.get("error"))
    audit_trail.note_tokens(tokens)
    response = redirect(return_to, code=302)
    set_refresh_cookie(response, tokens)
    response.delete_cookie(_attempt_cookie(), path=CALLBACK_PATH, secure=parts.settings.cookie_secure,
                           httponly=True, samesite="Lax")
    return response
