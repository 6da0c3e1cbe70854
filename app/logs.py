"""JSON log lines, a filter that lets a repeated outage message through once per interval, and never a secret.

The standard library only: gunicorn's master loads this module through its logging config before any worker
exists, so it imports no Flask (the request id is read from Flask only when Flask is already loaded, in a
worker). The one access line per request is written by app/web/hooks.py; it carries the method, route, path
(without query string), status, duration, request id, client address and the `error` code, and nothing that
could hold a token, password, client secret, cookie or Authorization header.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from datetime import datetime, timezone

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
        request_id = _request_id()
        if request_id is not None:
            entry["request_id"] = request_id
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _request_id() -> str | None:
    flask = sys.modules.get("flask")
    if flask is None or not flask.has_request_context():
        return None
    return flask.g.get("request_id")


class RepeatFilter(logging.Filter):
    """Passes a message (by logger and format string) at most once per `interval`; counts what it held back.

    While Keycloak or Redis is out, every request would log the same warning; an operator needs one line
    per interval, with the number of repeats it stands for (`repeated`).
    """

    def __init__(self, interval: float, clock=time.monotonic):
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self.clock()
        with self._lock:
            last, held = self._last.get(key, (float("-inf"), 0))
            if now - last < self.interval:
                self._last[key] = (last, held + 1)
                return False
            self._last[key] = (now, 0)
            if len(self._last) > 1000:  # messages are format strings, so this stays small; bound it anyway
                self._last.clear()
        if held:
            record.repeated = held
        return True


# Loggers whose lines repeat once per request while a dependency is out: one line per interval is enough.
# (app.shared_store logs Redis outages once per outage by itself, through its circuit breaker.)
OUTAGE_LOGGERS = ("app.keycloak_client", "app.refresh_coalescing", "flask-limiter", "app.audit.delivery")


def throttle_outage_logs(interval: float = 10.0) -> None:
    """Let each outage message through once per `interval` seconds; a new app starts with a fresh count."""
    for name in OUTAGE_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, RepeatFilter)]:
            logger.removeFilter(old)
        logger.addFilter(RepeatFilter(interval))
