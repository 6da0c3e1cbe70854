"""The one table that turns Keycloak's OAuth error answers into the broker's errors.

Keycloak answers a refused token-endpoint call with `{"error": ..., "error_description": ...}`.
`translate()` walks `RULES` top to bottom and the first rule whose operation, `error` and
description match wins. The HTTP status Keycloak used is deliberately ignored for 4xx answers
(it changed between releases for the same refusal); 5xx and unusable bodies never reach this table
(see keycloak_client). docs/errors.md prints this table; tests/unit/test_error_docs.py keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from app.errors import (
    AccountSetupRequired,
    BrokerError,
    ClientRejected,
    InvalidClient,
    InvalidScope,
    LoginRejected,
    RefreshRejected,
    RefreshTokenRequired,
    UpstreamError,
)

LOGIN = "login"
REFRESH = "refresh"
LOGOUT = "logout"
INTROSPECT = "introspect"
KEYS = "keys"
DISCOVERY = "discovery"
CODE = "code"  # the authorization-code grant that ends the code + PKCE login
SERVICE = "service"  # the client-credentials grant of the broker's own service account (registration)
ADMIN = "admin"  # calls to the realm's admin API as that service account
OPERATIONS = (LOGIN, REFRESH, LOGOUT, INTROSPECT, SERVICE, CODE)

ANY = None  # matches any error_description


@dataclass(frozen=True)
class Rule:
    """If Keycloak answers `error` (and a description starting with `description`) to one of `operations`."""

    operations: tuple[str, ...]
    error: str
    description: str | None
    outcome: Callable[[], BrokerError]
    note: str = ""

    def matches(self, operation: str, error: str, description: str) -> bool:
        return (
            operation in self.operations
            and error == self.error
            and (self.description is None or description.startswith(self.description))
        )


def _login(message: str) -> Callable[[], BrokerError]:
    return lambda: LoginRejected(message)


def _refresh(message: str) -> Callable[[], BrokerError]:
    return lambda: RefreshRejected(message)


EXPIRED = "Refresh token expired"
REUSED = "Refresh token was already used; the session has been ended"
SESSION_ENDED = "Session has ended"
INVALID_REFRESH = "Invalid refresh token"

RULES: tuple[Rule, ...] = (
    # The broker's own client: an operator problem (wrong secret, unknown client, grant disabled).
    Rule(OPERATIONS, "invalid_client", ANY, InvalidClient, "unknown, disabled or unauthenticated client"),
    Rule(OPERATIONS, "unauthorized_client", ANY, ClientRejected,
         "wrong client secret, or direct access grants disabled for the client"),
    # Password grant.
    Rule((LOGIN,), "invalid_grant", "Invalid user credentials", _login("Invalid username or password"),
         "wrong password, unknown user, or brute-force lockout (Keycloak does not tell these apart)"),
    Rule((LOGIN,), "invalid_grant", "Account disabled", _login("Account is disabled"),
         "disabled user with the right password (a wrong one gets `Invalid user credentials`)"),
    Rule((LOGIN,), "invalid_grant", "Account temporarily disabled", _login("Account is temporarily locked"),
         "not sent by Keycloak 26.7, whose lockout answers `Invalid user credentials`; kept for other releases"),
    Rule((LOGIN,), "invalid_grant", "Account is not fully set up", AccountSetupRequired,
         "a pending required action, or a missing email (and first or last name where the realm requires them)"),
    Rule((LOGIN,), "invalid_grant", ANY, _login("Login was refused"), "any other refusal of a password login"),
    Rule((LOGIN, REFRESH), "invalid_scope", ANY, InvalidScope, "a scope the client may not have"),
    # Authorization-code grant (the code + PKCE login's callback).
    Rule((CODE,), "invalid_grant", ANY, _login("The login could not be completed; start it again"),
         "a code that is wrong, used, expired, or whose PKCE verifier or redirect URI does not match"),
    # Refresh grant.
    Rule((REFRESH,), "invalid_grant", "Token is not active", _refresh(EXPIRED), "past `refresh_expires_in`"),
    Rule((REFRESH,), "invalid_grant", "Maximum allowed refresh token reuse exceeded", _refresh(REUSED),
         "a spent (rotated) refresh token presented again; Keycloak then ends the session"),
    Rule((REFRESH,), "invalid_grant", "Session not active", _refresh(SESSION_ENDED),
         "after logout, an admin logout, a revocation, or session expiry"),
    Rule((REFRESH,), "invalid_grant", "Session doesn't have required client", _refresh(SESSION_ENDED),
         "any token of the session after a reuse was detected"),
    Rule((REFRESH,), "invalid_grant", "Stale token", _refresh(SESSION_ENDED),
         "not-before pushed by an admin, or an older token of a rotated chain"),
    Rule((REFRESH,), "invalid_grant", "User disabled", _refresh("Account is disabled"),
         "the user was disabled after logging in (the session survives until re-enabled or ended)"),
    Rule((REFRESH, LOGOUT), "invalid_grant", "Invalid refresh token. Token client and authorized client don't match",
         _refresh("Refresh token was issued to another client"), "a refresh token of another client of the realm"),
    Rule((REFRESH, LOGOUT), "invalid_grant", ANY, _refresh(INVALID_REFRESH),
         "garbage, wrong signature, not a refresh token, or any other refusal"),
    Rule((REFRESH, LOGOUT), "invalid_request", "No refresh token", RefreshTokenRequired,
         "not reached in practice: the broker refuses a missing token before calling Keycloak"),
)


def translate(operation: str, error: str, description: str) -> BrokerError:
    """Map Keycloak's `error`/`error_description` for `operation` to a BrokerError; unknown → UpstreamError."""
    for rule in RULES:
        if rule.matches(operation, error, description):
            return rule.outcome()
    return UpstreamError()
