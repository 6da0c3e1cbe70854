"""POST /api/auth/backchannel-logout: Keycloak says a session has ended (OpenID Connect Back-Channel Logout 1.0).

Keycloak calls it server to server whenever a session of the broker's client ends (the admin console or API,
a logout through any client, a logout at the broker itself): a form body `logout_token=<JWT>`. The token is
checked by app.access_tokens.LogoutTokenValidator; a good one ends its `sid` (or, without one, every session
of its `sub` so far) in app.ended_sessions.EndedSessions, and /me and /verify refuse those access tokens from
then on. No cookie, no CSRF proof and no rate limit apply: the caller is Keycloak, and only the realm's
signature makes a token count. A bad token is 400 invalid_request and changes nothing.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify

from app.errors import InvalidRequest
from app.web import audit_trail
from app.web.context import broker
from app.web.request_body import read_body

log = logging.getLogger(__name__)

bp = Blueprint("backchannel", __name__, url_prefix="/api/auth")

FIELD = "logout_token"


@bp.post("/backchannel-logout")
def backchannel_logout() -> Response:
    """200 when the logout token is valid (its session is ended from now on); 400 invalid_request otherwise."""
    value = read_body().get(FIELD)
    if not isinstance(value, str) or not value:
        raise InvalidRequest("The request needs a logout_token")
    parts = broker()
    try:
        claims = parts.logout_tokens.validate(value)
    except InvalidRequest as exc:
        # An operator wants to know (a wrong issuer or client means no back-channel logout works); the token stays out.
        log.warning("refused a back-channel logout token: %s", exc.message)
        raise
    sid, sub = claims.get("sid"), claims.get("sub")
    parts.ended_sessions.end(sid=sid, sub=sub)
    audit_trail.note(user=sub, session=sid)
    log.info("back-channel logout: %s ended", "a session" if sid else "every session of a user so far",
             extra={"session": sid, "user": sub})
    return jsonify({"message": "Logout recorded"})
