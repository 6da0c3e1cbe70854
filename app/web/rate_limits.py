"""Rate limits (flask-limiter): login per client address and username, login and refresh per client address.

Limits come from BROKER_RATE_LIMIT_*; counters live in memory (per worker) or, with BROKER_REDIS_URL, in
Redis (shared by every worker and instance). The per-username login limit counts only refused logins (401),
so a user who types the password right is never slowed down by it. When Redis fails, each worker falls back
to counters in memory (per client address: the login limit on login, the refresh limit on refresh; the
per-username limit is off until Redis is back) and retries Redis now and then: an outage of Redis must
neither lock everybody out nor hold requests up (Redis commands time out after BROKER_REDIS_TIMEOUT
seconds), and it is logged once, not per request. A breach raises flask-limiter's RateLimitExceeded, which
the one error handler (app/web/errors.py) renders as 429 rate_limited with Retry-After.
"""

from __future__ import annotations

import hashlib
import math
import time

from flask import Flask, g, request
from flask_limiter import Limiter, RequestLimit
from redis.backoff import NoBackoff
from redis.retry import Retry
from werkzeug.exceptions import HTTPException

from app.config import Settings
from app.errors import BrokerError
from app.metrics import RATE_LIMITED
from app.web.request_body import read_body


def client_address() -> str:
    """The client's address (X-Forwarded-For is trusted only through BROKER_TRUSTED_PROXY_HOPS, see hooks.py)."""
    return request.remote_addr or "unknown"


def login_user_key() -> str:
    """Client address plus a hash of the username the login names (the username itself is never stored)."""
    try:
        username = read_body().get("username")
    except (BrokerError, HTTPException):  # a bad body is refused by the route itself
        username = None
    name = username.strip().lower() if isinstance(username, str) else ""
    return f"{client_address()}|{hashlib.sha256(name.encode()).hexdigest()[:32]}"


def _redis_options(settings: Settings) -> dict:
    """The counters' Redis client: BROKER_REDIS_TIMEOUT per connect and command, and no redis-py retries."""
    return {"socket_timeout": settings.redis_timeout, "socket_connect_timeout": settings.redis_timeout,
            "retry": Retry(NoBackoff(), 0)}


def _fallback_limit(settings: Settings):
    """The in-memory limit for the current endpoint while the counters' Redis is out."""

    def limit() -> str:
        return settings.rate_limit_login_ip if request.endpoint == "auth.login" else settings.rate_limit_refresh

    return limit


def note_breach(limit: RequestLimit) -> None:
    """Count the refusal and note when the limit's window resets, for the 429's Retry-After."""
    RATE_LIMITED.labels(request.endpoint or "unknown").inc()
    g.retry_after = max(1, math.ceil(limit.reset_at - time.time()))


def install(app: Flask, settings: Settings) -> Limiter:
    """Attach the limiter and the limits to the app's login and refresh views."""
    limiter = Limiter(
        key_func=client_address,
        app=app,
        storage_uri=settings.redis_url or "memory://",
        key_prefix="token-broker",
        strategy="fixed-window",
        enabled=settings.rate_limits_enabled,
        swallow_errors=True,
        storage_options=_redis_options(settings) if settings.redis_url else {},
        in_memory_fallback_enabled=bool(settings.redis_url),
        # While Redis is out, flask-limiter applies these instead of the route's own limits: per address, the
        # login limit on login and the refresh limit elsewhere (the per-username limit is off meanwhile).
        in_memory_fallback=[_fallback_limit(settings)] if settings.redis_url else None,
        headers_enabled=False,
        on_breach=note_breach,
    )
    # Only these endpoints have limits: every other request (the gateway's /verify above all) skips the limiter.
    limited = {"auth.login", "auth.refresh_token"}
    limiter.request_filter(lambda: request.endpoint not in limited)
    views = app.view_functions
    views["auth.login"] = limiter.limit(settings.rate_limit_login_ip, key_func=client_address)(views["auth.login"])
    views["auth.login"] = limiter.limit(
        settings.rate_limit_login, key_func=login_user_key, deduct_when=lambda response: response.status_code == 401,
        scope="login-user",
    )(views["auth.login"])
    views["auth.refresh_token"] = limiter.limit(settings.rate_limit_refresh, key_func=client_address)(
        views["auth.refresh_token"]
    )
    # The wrapped views hold the limiter only weakly; an enabled limiter registers itself here, a disabled one
    # (BROKER_RATE_LIMITS_ENABLED=false) does not, so hold it the same way.
    app.extensions.setdefault("limiter", set()).add(limiter)
    return limiter
