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
from app.logs import log_request, start_request
from app.metrics import observe_request
from app.request_body import check_body_size
from app import openapi
from app.routes import auth, health, tokens

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
    keycloak = keycloak or KeycloakClient(settings, build_session(settings, pool_size=max(10, settings.threads)))
    app.extensions["keycloak"] = keycloak
    app.extensions["signing_keys"] = keys = SigningKeys(
        keycloak.jwks,
        min_refetch_interval=settings.jwks_min_refetch_seconds,
        max_age=settings.jwks_max_age_seconds,
    )
    app.extensions["access_tokens"] = AccessTokenValidator(keys, _token_policy(settings, keycloak))
    if settings.introspection:
        app.extensions["session_check"] = SessionCheck(keycloak.introspect, ttl=settings.introspection_cache_seconds)
    logging.getLogger("app").setLevel(settings.log_level)

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

    return app
