"""The broker's error tree: every failure a client is told about, with its status and stable `error` code.

    BrokerError                        status  error
    ├── RequestRefused                          (the request itself is wrong; nothing was asked of Keycloak)
    │   ├── InvalidRequest               400   invalid_request
    │   ├── RefreshTokenRequired         400   refresh_token_required
    │   ├── CsrfFailed                   403   csrf_failed              (cookie mode)
    │   ├── NotFound                     404   not_found
    │   ├── MethodNotAllowed             405   method_not_allowed       (+ Allow)
    │   ├── RefreshConflict              409   refresh_conflict         (the token is being refreshed with another scope)
    │   ├── PayloadTooLarge              413   payload_too_large
    │   ├── UnsupportedMediaType         415   unsupported_media_type
    │   ├── RateLimited                  429   rate_limited             (+ Retry-After)
    │   ├── LocationBlocked              401   location_blocked         (BROKER_IP_BINDING: refresh from elsewhere)
    │   ├── InsufficientRole             403   insufficient_role        (/verify?role=...: a valid token without it)
    │   └── HttpError                    4xx   the status's name        (any other HTTP error of the framework)
    ├── Unauthenticated                         (a bearer route without a usable access token)
    │   ├── AccessTokenRequired          401   access_token_required    (+ WWW-Authenticate)
    │   └── InvalidToken                 401   invalid_token            (+ WWW-Authenticate, X-Token-Expired)
    ├── KeycloakRefused                         (Keycloak answered and said no: retrying the same call is useless)
    │   ├── RefreshRejected              400   invalid_grant            (the refresh token's session is over)
    │   ├── InvalidScope                 400   invalid_scope
    │   ├── LoginRejected                401   invalid_grant            (wrong password, disabled account, ...)
    │   ├── AccountSetupRequired         401   account_setup_required   (right password, required actions pending)
    │   ├── UserExists                   409   user_exists              (registration: username or email taken)
    │   ├── InvalidPassword              400   invalid_password         (registration: the realm's password policy)
    │   └── ClientRejected               502   unauthorized_client      (the broker's own client: an operator problem)
    │       └── InvalidClient            502   invalid_client
    ├── UpstreamFailure                         (no usable answer: try again later, with the same refresh token)
    │   ├── UpstreamError                502   upstream_error
    │   ├── UpstreamUnavailable          503   upstream_unavailable     (+ Retry-After)
    │   │   ├── AnswerLost               503   upstream_unavailable     (the connection broke after sending)
    │   │   ├── UpstreamBusy             503   upstream_unavailable     (BROKER_UPSTREAM_CONCURRENCY reached)
    │   │   └── CoordinationUnavailable  503   upstream_unavailable     (Redis or the local store is out)
    │   └── UpstreamTimeout              504   upstream_timeout
    │       └── AnswerKept               504   upstream_timeout         (a refresh goes on; its answer is kept)
    └── InternalError                    500   internal_error

The `error` codes are published in docs/errors.md and never change; classes under the same code differ in
their message only. This module is plain Python: the web layer (app/web/errors.py) renders these errors.
"""

from __future__ import annotations

from typing import ClassVar


class BrokerError(Exception):
    """A failure the client is told about: `status`, stable `error` code, one-sentence `message`, headers."""

    status: int = 500
    error: str = "internal_error"
    message: str = "The broker failed to handle the request"
    # Every concrete (status, error) pair and the most general class that carries it: see `restore`.
    _by_code: ClassVar[dict[tuple[int, str], type["BrokerError"]]] = {}

    def __init_subclass__(cls, *, abstract: bool = False, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if not abstract:  # the branches of the tree group errors; only its leaves are restored
            BrokerError._by_code.setdefault((cls.status, cls.error), cls)

    def __init__(self, message: str | None = None, *, error: str | None = None, status: int | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message or self.message)
        if message is not None:
            self.message = message
        if error is not None:
            self.error = error
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = dict(headers or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.error!r}, {self.message!r})"

    def body(self) -> dict[str, str]:
        """The response body, exactly the contract's two keys."""
        return {"error": self.error, "message": self.message}

    def parts(self) -> dict[str, object]:
        """What `restore` needs to build this error again in another process (no traceback, no cause)."""
        return {"status": self.status, "error": self.error, "message": self.message, "headers": dict(self.headers)}

    @staticmethod
    def restore(status: int, error: str, message: str, headers: dict[str, str]) -> "BrokerError":
        """The error `parts()` described, as the most general class with that status and code."""
        cls = BrokerError._by_code.get((status, error), BrokerError)
        restored = cls.__new__(cls)
        BrokerError.__init__(restored, message, error=error, status=status, headers=headers)
        return restored


class RequestRefused(BrokerError, abstract=True):
    """The request itself is wrong (its body, its method, its rate): nothing was asked of Keycloak."""


class InvalidRequest(RequestRefused):
    """A body that is not JSON or a form, or a field that is missing, blank, of the wrong type or too long."""

    status, error, message = 400, "invalid_request", "The request body is not valid"


class RefreshTokenRequired(RequestRefused):
    """Refresh or logout without a refresh token (in the body, or in the cookie in cookie mode)."""

    status, error, message = 400, "refresh_token_required", "Refresh token is required"


class CsrfFailed(RequestRefused):
    """Cookie mode: a login, refresh or logout without the CSRF header, or from an origin that is not allowed."""

    status, error, message = 403, "csrf_failed", "This request needs the CSRF header and an allowed origin"


class NotFound(RequestRefused):
    """No route has this path."""

    status, error, message = 404, "not_found", "No such route"


class MethodNotAllowed(RequestRefused):
    """The route exists but not with this method; the answer names the allowed ones in `Allow`."""

    status, error, message = 405, "method_not_allowed", "This method is not allowed on this route"


class RefreshConflict(RequestRefused):
    """The refresh token is being, or was just, refreshed with another scope: this request spent nothing."""

    status = 409
    error = "refresh_conflict"
    message = "This refresh token was just refreshed with another scope; use the tokens that refresh returned"


class PayloadTooLarge(RequestRefused):
    """A body over BROKER_MAX_BODY_BYTES, declared or streamed."""

    status, error, message = 413, "payload_too_large", "The request body is too large"


class UnsupportedMediaType(RequestRefused):
    """A body that is neither JSON nor a form."""

    status = 415
    error = "unsupported_media_type"
    message = "Send the body as application/json or application/x-www-form-urlencoded"


class RateLimited(RequestRefused):
    """A rate limit refused the request; `Retry-After` says when the window resets."""

    status, error, message = 429, "rate_limited", "Too many attempts; try again later"

    def __init__(self, retry_after: int | None = None):
        super().__init__(headers={"Retry-After": str(retry_after)} if retry_after is not None else None)


class LocationBlocked(RequestRefused):
    """BROKER_IP_BINDING: a refresh from another client address (or network) than the session's login."""

    status = 401
    error = "location_blocked"
    message = "This session was started from another network; log in again here"


class InsufficientRole(RequestRefused):
    """/verify with role requirements: the token is valid but lacks a required realm or client role."""

    status, error, message = 403, "insufficient_role", "The access token lacks a role this route requires"


class HttpError(RequestRefused):
    """Any other HTTP error the framework raises (rare: 416, 431, ...), named after its status."""

    status, error, message = 400, "bad_request", "Bad Request"


class Unauthenticated(BrokerError, abstract=True):
    """A bearer route without a usable access token: 401 with an RFC 6750 challenge."""


BEARER_REALM = "token-broker"


class AccessTokenRequired(Unauthenticated):
    """No `Authorization: Bearer` on a bearer route (RFC 6750 3.1: no error code in the challenge)."""

    status, error, message = 401, "access_token_required", "An access token is required"

    def __init__(self, message: str | None = None):
        super().__init__(message, headers={"WWW-Authenticate": f'Bearer realm="{BEARER_REALM}"'})


class InvalidToken(Unauthenticated):
    """A bearer token that is malformed, forged, expired, of the wrong type or for another issuer."""

    status, error, message = 401, "invalid_token", "Invalid access token"
    expired = False

    def __init__(self, message: str | None = None, *, expired: bool = False):
        description = (message or self.message).replace('"', "'")
        headers = {
            "WWW-Authenticate": f'Bearer realm="{BEARER_REALM}", error="invalid_token", '
            f'error_description="{description}"'
        }
        if expired:
            headers["X-Token-Expired"] = "true"
        super().__init__(message, headers=headers)
        self.expired = expired


class KeycloakRefused(BrokerError, abstract=True):
    """Keycloak answered and refused (an OAuth error in its body): asking again the same way will not help."""


class RefreshRejected(KeycloakRefused):
    """Keycloak refused a refresh token (expired, spent, session ended): the user must log in again."""

    status, error, message = 400, "invalid_grant", "Invalid refresh token"


class InvalidScope(KeycloakRefused):
    """A scope the broker's client may not have."""

    status, error, message = 400, "invalid_scope", "The requested scope is not allowed for this client"


class LoginRejected(KeycloakRefused):
    """Keycloak refused a password login: wrong credentials, a disabled or half-set-up account."""

    status, error, message = 401, "invalid_grant", "Invalid username or password"


class AccountSetupRequired(KeycloakRefused):
    """The password was right, but Keycloak holds the account back until required actions are done."""

    status = 401
    error = "account_setup_required"
    message = "Account is not fully set up; finish setting it up in the account console"


class UserExists(KeycloakRefused):
    """Registration: the username or the email address belongs to an account already (the message says which)."""

    status, error, message = 409, "user_exists", "An account with this username or email already exists"


class InvalidPassword(KeycloakRefused):
    """Registration: the password breaks the realm's password policy (the message says how)."""

    status, error, message = 400, "invalid_password", "The password does not meet the password policy"


class ClientRejected(KeycloakRefused):
    """Keycloak refused the broker's own client (wrong secret, grant disabled): an operator problem."""

    status, error, message = 502, "unauthorized_client", "The broker is misconfigured; try again later"


class InvalidClient(ClientRejected):
    """Keycloak does not know the broker's client, or could not authenticate it."""

    error = "invalid_client"


class UpstreamFailure(BrokerError, abstract=True):
    """No usable answer from Keycloak (or from the broker's coordination store): try again later."""


class UpstreamError(UpstreamFailure):
    """Keycloak answered something unusable: a 5xx, HTML from a proxy, JSON without the fields it must have."""

    status, error, message = 502, "upstream_error", "The identity provider returned an unusable answer"


class UpstreamUnavailable(UpstreamFailure):
    """Keycloak cannot be reached; the answer carries `Retry-After`."""

    status, error, message = 503, "upstream_unavailable", "The identity provider cannot be reached; try again later"


class AnswerLost(UpstreamUnavailable):
    """The connection broke after the request was sent: Keycloak may have acted on it."""

    message = "The connection to the identity provider broke before its answer arrived; try again"


class UpstreamBusy(UpstreamUnavailable):
    """BROKER_UPSTREAM_CONCURRENCY calls to Keycloak are in flight already: refused at once, nothing sent."""

    message = "Too many requests are waiting for the identity provider; try again shortly"


class CoordinationUnavailable(UpstreamUnavailable):
    """The refresh could not be coordinated with the broker's other processes (Redis or the local store)."""

    message = "The broker cannot coordinate this refresh with its other processes right now; try again shortly"


class UpstreamTimeout(UpstreamFailure):
    """Keycloak did not answer within the read timeout."""

    status, error, message = 504, "upstream_timeout", "The identity provider did not answer in time"


class AnswerKept(UpstreamTimeout):
    """A refresh's caller stopped waiting; the refresh goes on and its outcome is kept for a retry."""

    message = (
        "The identity provider did not answer in time; retry with the same refresh token: the broker keeps its "
        "answer if one arrives"
    )


class InternalError(BrokerError):
    """A bug in the broker: the traceback goes to the log with the request id, the client learns nothing else."""
