"""Gunicorn settings for the broker: one gevent worker by default, counts and address from the environment.

Every variable is read and validated by app.config.Settings, so a bad value stops the server before
any worker starts, with a message naming the variable. Why gevent, and why one worker without Redis:
docs/operations.md ("The process model") and docs/reliability.md.
"""

import glob
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Prometheus multiprocess mode: every worker writes samples into this directory, /metrics sums them.
# It must be set before anything imports prometheus_client, and start empty. Only app.config (the standard
# library alone) is imported here: the master must not import the app, or ssl and sockets would be imported
# before the gevent worker patches them.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="token-broker-metrics-")

# Refresh outcomes shared by this instance's workers, old and new (app/local_store.py), unless BROKER_REDIS_URL.
if not os.environ.get("BROKER_STATE_DIR"):
    os.environ["BROKER_STATE_DIR"] = tempfile.mkdtemp(prefix="token-broker-state-")

from app.config import ConfigError, Settings  # noqa: E402

try:
    _settings = Settings.from_env()
except ConfigError as exc:
    sys.exit(f"token-broker: {exc}")

wsgi_app = "app:create_app()"
# Several brokers may run on one machine (tests, benchmarks): none of them needs gunicorn's control socket.
control_socket_disable = True


def on_starting(server) -> None:  # noqa: ANN001 - gunicorn's hook signature
    """Start with no samples left over from an earlier run (only prometheus_client's own files are removed)."""
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(directory, exist_ok=True)
    for stale in glob.glob(os.path.join(directory, "*.db")):
        os.remove(stale)


def child_exit(server, worker) -> None:  # noqa: ANN001
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def post_request(worker, req, environ, resp) -> None:  # noqa: ANN001
    """After each request, let the worker's other connections run before this one is served again.

    gevent switches greenlets only when one would block. A keep-alive connection whose next request is already
    waiting (a busy gateway's connection, pipelining, a load generator) never blocks, so without this yield it is
    served again and again while the worker's other connections wait: 240 ms at p99 for a 0.6 ms /verify
    (docs/benchmarks.md, "The single worker's fairness").
    """
    import gevent

    gevent.sleep(0)


def worker_exit(server, worker) -> None:  # noqa: ANN001
    """Before a worker goes (SIGTERM, a reload), let refreshes already sent to Keycloak finish and share their outcome."""
    from app.web.context import broker_of  # in the worker, which has loaded the app already

    broker = broker_of(getattr(worker, "wsgi", None))
    if broker is not None:
        broker.refresher.drain(timeout=_settings.connect_timeout + _settings.refresh_answer_limit)
        broker.audit.close(timeout=2.0)  # deliver queued audit events to their sinks, briefly


bind = _settings.bind
# gevent: a connection costs a greenlet, not a thread, so slow clients and calls waiting on a hung Keycloak or
# Redis cannot starve the other routes (measured in docs/reliability.md).
worker_class = "gevent"
workers = _settings.workers
worker_connections = _settings.worker_connections
# Both outlast the longest refresh (validated in app.config): the master never kills a worker mid-refresh.
timeout = _settings.worker_timeout
graceful_timeout = _settings.graceful_timeout
keepalive = 5
# Refuse absurd request lines and headers early; bodies are bounded by BROKER_MAX_BODY_BYTES.
limit_request_line = 4096
limit_request_fields = 100
limit_request_field_size = 8190
# Logs: JSON lines on stderr. The broker writes its own access line per request (app/logs.py: no query
# strings, headers or bodies), so gunicorn's access log stays off.
errorlog = "-"
accesslog = None
loglevel = _settings.log_level.lower()
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "app.logs.JsonFormatter"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
    "root": {"level": _settings.log_level, "handlers": ["stderr"]},
    "loggers": {
        "gunicorn.error": {"level": _settings.log_level, "handlers": ["stderr"], "propagate": False},
        "gunicorn.access": {"level": "WARNING", "handlers": ["stderr"], "propagate": False},
        "urllib3": {"level": "WARNING"},
        # The audit trail is written at INFO whatever BROKER_LOG_LEVEL says (docs/operations.md, "Audit events").
        "app.audit": {"level": "INFO"},
    },
}
