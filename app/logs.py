"""Structured JSON logs: one line per request, operator lines for upstream trouble, and never a secret.

Nothing here reads request bodies, headers or cookies: a request line carries the method, route, path
(without query string), status, duration, request id, client address and the `error` code, so no token,
password, client secret, cookie or Authorization header can reach it. gunicorn.conf.py routes gunicorn's
own loggers through the same formatter.
"""

from __future__ import annotations

import logging
import time

from flask import Response, g, request

from app.log_format import JsonFormatter, RepeatFilter  # noqa: F401 - JsonFormatter is this module's public name too

access_log = logging.getLogger("app.access")

def start_request() -> None:
    """Note when the request started, for its duration."""
    g.started = time.perf_counter()


def log_request(response: Response) -> None:
    """Write the request's one access line."""
    started = g.get("started")
    duration_ms = round((time.perf_counter() - started) * 1000, 2) if started is not None else None
    access_log.info(
        "request",
        extra={
            "method": request.method,
            "route": request.url_rule.rule if request.url_rule is not None else None,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": duration_ms,
            "client_ip": request.remote_addr,
            "error": g.get("error_code"),
        },
    )


# Loggers whose lines repeat once per request while a dependency is out: one line per interval is enough.
# (app.shared_store logs Redis outages once per outage by itself, through its circuit breaker.)
OUTAGE_LOGGERS = ("app.keycloak_client", "app.sessions", "flask-limiter")


def throttle_outage_logs(interval: float = 10.0) -> None:
    """Let each outage message through once per `interval` seconds; a new app starts with a fresh count."""
    for name in OUTAGE_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, RepeatFilter)]:
            logger.removeFilter(old)
        logger.addFilter(RepeatFilter(interval))
