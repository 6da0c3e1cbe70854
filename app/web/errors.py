"""The one handler that renders every failure as the contract's {"error", "message"} body.

Flask's own HTTP errors (404, 405, 413, ...), the broker's errors (app/errors.py), a rate limit's refusal
and an unexpected exception all leave through `_render`, which also notes the error on `g` for the access
line, the metrics and any `after_this_request` callback that depends on it (cookies.py).
"""

from __future__ import annotations

import logging
import re

from flask import Flask, Response, g, jsonify
from werkzeug.exceptions import HTTPException

from app.errors import (
    BrokerError,
    HttpError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    UnsupportedMediaType,
)
from app.web.context import broker

log = logging.getLogger(__name__)

_HTTP_ERRORS: dict[int, type[BrokerError]] = {
    400: InvalidRequest,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    429: RateLimited,
}


def failure() -> BrokerError | None:
    """The error the current request is answered with, once the handler has rendered it."""
    return g.get("failure")


def _from_http_exception(exc: HTTPException) -> BrokerError:
    """Translate Flask/werkzeug's own HTTP errors (and flask-limiter's 429) into the broker's errors."""
    known = _HTTP_ERRORS.get(exc.code or 500)
    if known is RateLimited:
        return RateLimited(g.get("retry_after"))  # noted by rate_limits.note_breach
    if known is not None:
        error = known()
    else:
        error = HttpError(exc.name, error=re.sub(r"\W+", "_", exc.name.lower()).strip("_"), status=exc.code or 500)
    if exc.code == 405 and exc.response is None:
        allowed = getattr(exc, "valid_methods", None)
        if allowed:
            error.headers["Allow"] = ", ".join(sorted(allowed))
    return error


def _render(error: BrokerError) -> Response:
    g.failure = error
    response = jsonify(error.body())
    response.status_code = error.status
    for name, value in error.headers.items():
        response.headers[name] = value
    if error.status == 503:
        response.headers.setdefault("Retry-After", str(broker().settings.upstream_retry_after))
    return response


def register_error_handler(app: Flask) -> None:
    """Route every failure, Flask's own 404/405/413 and unexpected exceptions included, through `_render`."""

    @app.errorhandler(Exception)
    def _handle(exc: Exception) -> Response:
        if isinstance(exc, BrokerError):
            return _render(exc)
        if isinstance(exc, HTTPException):
            return _render(_from_http_exception(exc))
        # The traceback goes to the log with the request id; the client learns nothing but the code.
        log.exception("unhandled %s (request_id=%s)", type(exc).__name__, g.get("request_id", "-"))
        return _render(InternalError())
