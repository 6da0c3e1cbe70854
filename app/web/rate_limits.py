"""Rate limits per client address (flask-limiter): login, refresh and logout.

Limits come from BROKER_RATE_LIMIT_LOGIN_IP, _REFRESH and _LOGOUT; counters live in memory (per worker) or,
with BROKER_REDIS_URL, in Redis (shared by every worker and instance). The limits on password guessing per
username live in app/login_attempts.py (they count before Keycloak is asked). An IPv6 client counts as its
/64. When Redis fails, each worker falls back to counters in memory and retries Redis now and then: an
outage of Redis must neither lock everybody out nor hold requests up (Redis commands time out after
BROKER_REDIS_TIMEOUT seconds), and it is logged once, not per request. A breach raises flask-limiter's
RateLimitExceeded, which the one error handler (app/web/errors.py) renders as 429 rate_limited with
Retry-After.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time

from flask import Flask, g, request
from flask_limiter import Limiter, RequestLimit

from app.broker import redis_options
from app.config import Settings
from app.metrics import RATE_LIMITED


def client_address() -> str:
    """The client's address, an IPv6 one as its /64 (one host commonly holds a whole /64).

    X-Forwarded-For is trusted only through BROKER_TRUSTED_PROXY_HOPS proxies (see hooks.py).
    """
    address = request.remote_addr or "unknown"
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


def client_fingerprint() -> str:
    """Who is asking, as far as the broker can tell: the client address (as above) and its User-Agent, hashed.

    A refresh that landed is handed again only to the same fingerprint within the grace window (see
    app.refresh_coalescing): a second tab or a retry of the same browser matches, a thief elsewhere does not.
    """
    material = f"{client_address()}\x00{request.headers.get('User-Agent', '')}".encode()
    return hashlib.sha256(material).hexdigest()[:32]




def _fallback_limit(settings: Settings):
    """The in-memory limit for the current endpoint while the counters' Redis is out."""

    def limit() -> str:
        return {"auth.login": settings.rate_limit_login_ip, "auth.logout": settings.rate_limit_logout,
                "auth.register": settings.rate_limit_register}.get(request.endpoint or "", settings.rate_limit_refresh)

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
        storage_options=redis_options(settings) if settings.redis_url else {},
        in_memory_fallback_enabled=bool(settings.redis_url),
        # While Redis is out, flask-limiter applies these instead of the route's own limits: per address, the
        # login, refresh and logout limits (app/login_attempts.py counts per username in memory meanwhile).
        in_memory_fallback=[_fallback_limit(settings)] if settings.redis_url else None,
        headers_enabled=False,
        on_breach=note_breach,
    )
    # Only these endpoints have limits: every other request (the gateway's /verify above all) skips the limiter.
    limited = {"auth.login", "auth.refresh_token", "auth.logout", "auth.register"}
    # (Registration that is off answers 404 without counting: the promise is "404 while off", not a 429.)
    limiter.request_filter(lambda: request.endpoint not in limited or
                           (request.endpoint == "auth.register" and not settings.registration))
    views = app.view_functions
    views["auth.login"] = limiter.limit(settings.rate_limit_login_ip, key_func=client_address)(views["auth.login"])
    views["auth.refresh_token"] = limiter.limit(settings.rate_limit_refresh, key_func=client_address)(
        views["auth.refresh_token"]
    )
    views["auth.logout"] = limiter.limit(settings.rate_limit_logout, key_func=client_address)(views["auth.logout"])
    views["auth.register"] = limiter.limit(settings.rate_limit_register, key_func=client_address)(views["auth.register"])
    # The wrapped views hold the limiter only weakly; an enabled limiter registers itself here, a disabled one
    # (BROKER_RATE_LIMITS_ENABLED=false) does not, so hold it the same way.
    app.extensions.setdefault("limiter", set()).add(limiter)
    return limiter
