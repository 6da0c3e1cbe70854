"""The broker's error tree and the one handler that renders every failure as {"error", "message"}.

    BrokerError                      status  error
    ├── InvalidRequest                 400   invalid_request
    ├── RefreshTokenRequired           400   refresh_token_required
    ├── RefreshRejected                400   invalid_grant            (Keycloak refused a refresh token)
    ├── InvalidScope                   400   invalid_scope
    ├── LoginRejected                  401   invalid_grant            (Keycloak refused a password login)
    ├── AccessTokenRequired            401   access_token_required    (+ WWW-Authenticate)
    ├── InvalidToken                   401   invalid_token            (+ WWW-Authenticate, X-Token-Expired)
    ├── CsrfFailed                     403   csrf_failed              (cookie mode)
    ├── NotFound                       404   not_found
    ├── MethodNotAllowed               405   method_not_allowed
    ├── PayloadTooLarge                413   payload_too_large
    ├── UnsupportedMediaType           415   unsupported_media_type
    ├── RateLimited                    429   rate_limited             (+ Retry-After)
    ├── InternalError                  500   internal_error
    ├── ClientRejected                 502   unauthorized_client | invalid_client
    ├── UpstreamError                  502   upstream_error
    ├── UpstreamUnavailable            503   upstream_unavailable     (+ Retry-After)
    └── UpstreamTimeout                504   upstream_timeout

The `error` codes are published in docs/errors.md and never change.
"""

from __future__ import annotations

import logging
import re

from flask import Flask, Response, current_app, g, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class BrokerError(Exception):
    """A failure the client is told about: `status`, stable `error` code and a one-sentence `message`."""

    status: int = 500
    error: str = "internal_error"
    message: str = "The broker failed to handle the request"

    def __init__(self, message: str | None = None, *, error: str | None = None, headers: dict | None = None):
        super().__init__(message or self.message)
        if message is not None:
            self.message = message
        if error is not None:
            self.error = error
        self.headers: dict[str, str] = dict(headers or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.error!r}, {self.message!r})"

    def body(self) -> dict[str, str]:
        """The response body, exactly the contract's two keys."""
        return {"error": self.error, "message": self.message}


class InvalidRequest(BrokerError):
    status, error, message = 400, "invalid_request", "The request body is not valid"


class RefreshTokenRequired(BrokerError):
    status, error, message = 400, "refresh_token_required", "Refresh token is required"


class RefreshRejected(BrokerError):
    status, error, message = 400, "invalid_grant", "Invalid refresh token"


class InvalidScope(BrokerError):
    status, error, message = 400, "invalid_scope", "The requested scope is not allowed for this client"


class LoginRejected(BrokerError):
    status, error, message = 401, "invalid_grant", "Invalid username or password"


BEARER_REALM = "token-broker"


class AccessTokenRequired(BrokerError):
    """No `Authorization: Bearer` on a bearer route (RFC 6750 3.1: no error code in the challenge)."""

    status, error, message = 401, "access_token_required", "An access token is required"

    def __init__(self, message: str | None = None):
        super().__init__(message, headers={"WWW-Authenticate": f'Bearer realm="{BEARER_REALM}"'})


class InvalidToken(BrokerError):
    """A bearer token that is malformed, forged, expired, of the wrong type or for another issuer."""

    status, error, message = 401, "invalid_token", "Invalid access token"

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


class CsrfFailed(BrokerError):
    status = 403
    error = "csrf_failed"
    message = "This request needs the CSRF header and an allowed origin"


class NotFound(BrokerError):
    status, error, message = 404, "not_found", "No such route"


class MethodNotAllowed(BrokerError):
    status, error, message = 405, "method_not_allowed", "This method is not allowed on this route"


class PayloadTooLarge(BrokerError):
    status, error, message = 413, "payload_too_large", "The request body is too large"


class UnsupportedMediaType(BrokerError):
    status = 415
    error = "unsupported_media_type"
    message = "Send the body as application/json or application/x-www-form-urlencoded"


class RateLimited(BrokerError):
    status, error, message = 429, "rate_limited", "Too many attempts; try again later"


class InternalError(BrokerError):
    status, error, message = 500, "internal_error", "The broker failed to handle the request"


class ClientRejected(BrokerError):
    """Keycloak refused the broker's own client: an operator problem, never the caller's."""

    status, error, message = 502, "unauthorized_client", "The broker is misconfigured; try again later"


class UpstreamError(BrokerError):
    status, error, message = 502, "upstream_error", "The identity provider returned an unusable answer"


class UpstreamUnavailable(BrokerError):
    status, error, message = 503, "upstream_unavailable", "The identity provider cannot be reached; try again later"


class UpstreamTimeout(BrokerError):
    status, error, message = 504, "upstream_timeout", "The identity provider did not answer in time"


# Messages of the 5xx answers under faults (docs/reliability.md): each says what happened and what to do.
ANSWER_KEPT = (
    "The identity provider did not answer in time; retry with the same refresh token: the broker keeps its "
    "answer if one arrives"
)
ANSWER_LOST = "The connection to the identity provider broke before its answer arrived; try again"
UPSTREAM_BUSY = "Too many requests are waiting for the identity provider; try again shortly"
COORDINATION_UNAVAILABLE = (
    "The broker cannot coordinate this refresh with its other processes right now; try again shortly"
)


_HTTP_ERRORS: dict[int, type[BrokerError]] = {
    400: InvalidRequest,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    429: RateLimited,
}


def _from_http_exception(exc: HTTPException) -> BrokerError:
    """Translate Flask/werkzeug's own HTTP errors into the fixed shape."""
    known = _HTTP_ERRORS.get(exc.code or 500)
    if known is not None:
        error = known()
    else:
        error = BrokerError(exc.name, error=re.sub(r"\W+", "_", exc.name.lower()).strip("_"))
        error.status = exc.code or 500
    if exc.code == 405 and exc.response is None:
        allowed = getattr(exc, "valid_methods", None)
        if allowed:
            error.headers["Allow"] = ", ".join(sorted(allowed))
    return error


def error_response(error: BrokerError) -> Response:
    """Render a BrokerError as the contract's JSON body with its status and headers."""
    response = jsonify(error.body())
    response.status_code = error.status
    for name, value in error.headers.items():
        response.headers[name] = value
    if error.status == 503:
        response.headers.setdefault("Retry-After", str(current_app.config["BROKER_SETTINGS"].upstream_retry_after))
    return response


def register_error_handlers(app: Flask) -> None:
    """Route every failure, Flask's own 404/405/413 and unexpected exceptions included, through one envelope."""

    @app.errorhandler(BrokerError)
    def _broker_error(error: BrokerError) -> Response:
        g.error_code = error.error
        return error_response(error)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        if exc.code == 429 and exc.response is not None:
            return exc.response  # the rate limiter's own 429, already in the fixed shape with Retry-After
        return _broker_error(_from_http_exception(exc))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        # The traceback goes to the log with the request id; the client learns nothing but the code.
        log.exception("unhandled %s (request_id=%s)", type(exc).__name__, g.get("request_id", "-"))
        return _broker_error(InternalError())
