"""Structured JSON logs: one line per request, operator lines for upstream trouble, and never a secret.

Nothing here reads request bodies, headers or cookies: a request line carries the method, route, path
(without query string), status, duration, request id, client address and the `error` code, so no token,
password, client secret, cookie or Authorization header can reach it. gunicorn.conf.py routes gunicorn's
own loggers through the same formatter.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone

from flask import Response, g, has_request_context, request

access_log = logging.getLogger("app.access")

# Attributes a LogRecord always has; anything else was passed with `extra=` and belongs in the line.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if has_request_context() and "request_id" in g:
            entry["request_id"] = g.request_id
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


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
