"""What happens around every request: its id, its body-size check, no-store, its access line and metrics, CORS.

`install(app, settings)` registers the hooks; the factory (app/web/factory.py) only calls it.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, Response, g, request
from flask_cors import CORS
from werkzeug.middleware.proxy_fix import ProxyFix

from app.config import Settings
from app.metrics import ERRORS, HTTP_LATENCY, HTTP_REQUESTS, method_label
from app.web import audit_trail
from app.web.errors import failure
from app.web.openapi import DOCS_POLICY
from app.web.request_body import check_body_size

access_log = logging.getLogger("app.access")
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def start_request() -> None:
    """Note when the request started, take the caller's sane X-Request-ID (or make one), refuse a huge body."""
    g.started = time.perf_counter()
    incoming = request.headers.get("X-Request-ID", "")
    g.request_id = incoming if _SANE_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
    check_body_size()


# JSON answers load nothing and are never framed; /api/docs (Swagger UI) gets the policy it needs.
JSON_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


def finish_response(response: Response) -> Response:
    """Echo the request id, set the security headers, forbid caching of /api/auth/*, write the access line, count."""
    response.headers["X-Request-ID"] = g.get("request_id") or uuid.uuid4().hex
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    docs = request.path == "/api/docs" or request.path.startswith("/api/docs/")
    response.headers["Content-Security-Policy"] = DOCS_POLICY if docs else JSON_POLICY
    if request.path.startswith("/api/auth/"):
        # RFC 6749 section 5.1: token responses, and errors of token endpoints, are never cached.
        response.headers["Cache-Control"] = "no-store"
        response.headers["Pragma"] = "no-cache"
    started = g.get("started")
    elapsed = time.perf_counter() - started if started is not None else None
    route = request.url_rule.rule if request.url_rule is not None else None
    error = failure()
    access_log.info(
        "request",
        extra={
            "method": request.method,
            "route": route,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": round(elapsed * 1000, 2) if elapsed is not None else None,
            "client_ip": request.remote_addr,
            "error": error.error if error is not None else None,
        },
    )
    HTTP_REQUESTS.labels(route or "unmatched", method_label(request.method), str(response.status_code)).inc()
    if elapsed is not None:
        HTTP_LATENCY.labels(route or "unmatched").observe(elapsed)
    if error is not None:
        ERRORS.labels(error.error).inc()
    audit_trail.record(response)
    return response


def install(app: Flask) -> None:
    """Register the request hooks; they run before any rate limit, so a refused request has its id and start."""
    app.before_request(start_request)
    app.after_request(finish_response)


def install_cross_origin(app: Flask, settings: Settings) -> None:
    """CORS for the configured frontends, and the client address through BROKER_TRUSTED_PROXY_HOPS proxies."""
    if settings.cors_origins:
        CORS(
            app,
            # Exact matches only: a plain string with pattern characters (an IPv6 literal's brackets) would be
            # read by flask-cors as an unanchored regular expression.
            resources={r"/api/*": {"origins": [re.compile(rf"{re.escape(o)}\Z", re.IGNORECASE)
                                               for o in sorted(settings.cors_origins)]}},
            supports_credentials=True,  # only ever for the listed origins: "*" is refused by the settings
            allow_headers=["Content-Type", "Authorization", "X-Request-ID", settings.csrf_header],
            expose_headers=["X-Request-ID", "X-Token-Expired", "Retry-After", "WWW-Authenticate"],
            max_age=600,
        )
    if settings.trusted_proxy_hops:
        # The client address comes from X-Forwarded-For only through the configured number of proxies.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxy_hops)
