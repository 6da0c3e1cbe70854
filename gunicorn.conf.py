"""Gunicorn settings for the broker: threaded workers, counts and address from the environment.

Every variable is read and validated by app.config.Settings, so a bad value stops the server before
any worker starts, with a message naming the variable.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from app.config import ConfigError, Settings  # noqa: E402

try:
    _settings = Settings.from_env()
except ConfigError as exc:
    sys.exit(f"token-broker: {exc}")

wsgi_app = "app:create_app()"
bind = _settings.bind
worker_class = "gthread"
workers = _settings.workers
threads = _settings.threads
timeout = _settings.worker_timeout
graceful_timeout = 20
keepalive = 5
# Refuse absurd request lines and headers early; bodies are bounded by BROKER_MAX_BODY_BYTES.
limit_request_line = 4096
limit_request_fields = 100
limit_request_field_size = 8190
errorlog = "-"
loglevel = _settings.log_level.lower()
accesslog = "-"
# %(U)s is the path without the query string: nothing a client put in a URL reaches the log.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms request_id=%({x-request-id}o)s'
