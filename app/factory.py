"""The application factory: the only place that wires settings, the Keycloak client and the routes together."""

from __future__ import annotations

import logging
import re
import time
import uuid
from importlib.metadata import PackageNotFoundError, version

from flask import Flask, Response, g, request

from app.access_tokens import AccessTokenValidator, SessionCheck, SigningKeys, TokenPolicy
from app.config import Settings
from app.errors import register_error_handlers
from app.keycloak_client import KeycloakClient, build_session
from app.logs import log_request, start_request, throttle_outage_logs
from app.metrics import observe_request
from app.request_body import check_body_size
from app.sessions import RedisOutcomes, RefreshCoalescer, UncoalescedRefresh
from app.local_store import LocalOutcomes
from app.shared_store import SharedStore
from flask_cors import CORS
from werkzeug.middleware.proxy_fix import ProxyFix

from app import openapi, rate_limits
from app.routes import auth, health, tokens

log = logging.getLogger(__name__)
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def _version() -> str:
    try:
        return version("token-broker")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def _token_policy(settings: Settings, keycloak: KeycloakClient):
    """A TokenPolicy built once the realm's issuer is known (from the discovery document)."""
    built: list[TokenPolicy] = []

    def policy() -> TokenPolicy:
        if not built:
            built.append(
                TokenPolicy(
                    issuer=keycloak.discovery()["issuer"],
                    leeway=settings.token_leeway,
                    audiences=settings.token_audiences,
                    authorized_parties=settings.token_authorized_parties,
                )
            )
        return built[0]

    return policy


def _refresher(settings: Settings, keycloak: KeycloakClient) -> RefreshCoalescer | UncoalescedRefresh:
    """Refresh coalescing (in-process, plus Redis across processes when REDIS_URL is set), unless switched off."""
    if not settings.refresh_coalescing:
        return UncoalescedRefresh(keycloak.refresh)
    # Both leases outlive the slowest refresh the broker allows: discovery is fetched before the lock is
    # taken, and the refresh itself is bounded by the connect timeout plus the answer limit.
    lease = settings.connect_timeout + settings.refresh_answer_limit + 2.0
    shared: RedisOutcomes | LocalOutcomes | None = None
    if settings.redis_url:
        store = SharedStore.from_url(settings.redis_url, timeout=settings.redis_timeout,
                                     retry_seconds=settings.redis_retry_seconds)
        shared = RedisOutcomes(store, lease=lease)
    elif settings.state_dir:
        # Under gunicorn (which sets BROKER_STATE_DIR): outcomes outlive a worker that is replaced.
        shared = LocalOutcomes(settings.state_dir, lease=lease)
    return RefreshCoalescer(
        keycloak.refresh,
        grace=settings.refresh_grace_seconds,
        wait=settings.connect_timeout + settings.read_timeout,
        shared=shared,
        # A failing local file is no reason to refuse: with no Redis there is one worker, the only process.
        redis_required=bool(settings.redis_url) and not settings.single_instance,
        prepare=keycloak.discovery,
    )


def create_app(settings: Settings | None = None, keycloak: KeycloakClient | None = None) -> Flask:
    """Build a broker app from `settings` (default: the environment); raise ConfigError when they are bad."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config.update(
        BROKER_SETTINGS=settings,
        BROKER_VERSION=_version(),
        BROKER_STARTED=time.monotonic(),
        MAX_CONTENT_LENGTH=settings.max_body_bytes + 1,  # see request_body.read_body
    )
    app.json.sort_keys = False
    keycloak = keycloak or KeycloakClient(settings, build_session(settings, pool_size=settings.upstream_concurrency))
    app.extensions["keycloak"] = keycloak
    app.extensions["signing_keys"] = keys = SigningKeys(
        keycloak.jwks,
        min_refetch_interval=settings.jwks_min_refetch_seconds,
        max_age=settings.jwks_max_age_seconds,
    )
    app.extensions["access_tokens"] = AccessTokenValidator(keys, _token_policy(settings, keycloak))
    if settings.introspection:
        app.extensions["session_check"] = SessionCheck(keycloak.introspect, ttl=settings.introspection_cache_seconds)
    app.extensions["refresher"] = _refresher(settings, keycloak)
    logging.getLogger("app").setLevel(settings.log_level)
    throttle_outage_logs()

    app.register_blueprint(auth.bp)
    app.register_blueprint(tokens.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    app.extensions["openapi"] = openapi.build_spec(app.config["BROKER_VERSION"])
    register_error_handlers(app)
    @app.before_request
    def _start_request() -> None:
        start_request()
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _SANE_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        check_body_size()

    @app.after_request
    def _finish_response(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id") or uuid.uuid4().hex
        if request.path.startswith("/api/auth/"):
            # RFC 6749 section 5.1: token responses, and errors of token endpoints, are never cached.
            response.headers["Cache-Control"] = "no-store"
            response.headers["Pragma"] = "no-cache"
        log_request(response)
        observe_request(response)
        return response

    # After the hooks above, so a request has its id and start time before a rate limit can refuse it.
    rate_limits.install(app, settings)
    if settings.cors_origins:
        CORS(
            app,
            resources={r"/api/*": {"origins": sorted(settings.cors_origins)}},
            supports_credentials=True,  # only ever for the listed origins: "*" is refused by the settings
            allow_headers=["Content-Type", "Authorization", "X-Request-ID", settings.csrf_header],
            expose_headers=["X-Request-ID", "X-Token-Expired", "Retry-After", "WWW-Authenticate"],
            max_age=600,
        )
    if settings.trusted_proxy_hops:
        # The client address comes from X-Forwarded-For only through the configured number of proxies.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxy_hops)
    if settings.token_transport == "cookie" and not settings.cookie_secure:
        log.warning("BROKER_COOKIE_SECURE=false: the refresh cookie is sent over plain HTTP; local runs only")
    return app
