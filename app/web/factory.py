"""The application factory: builds the broker's parts (app/broker.py) and wires them into a Flask app."""

from __future__ import annotations

import logging

from flask import Flask

from app.broker import Broker
from app.config import COOKIE_TRANSPORT, Settings
from app.keycloak_client import KeycloakClient
from app.logs import throttle_outage_logs
from app.web import hooks, openapi, rate_limits
from app.web.context import attach
from app.web.errors import register_error_handler
from app.web.routes import auth, backchannel, health, login_flow, tokens

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, keycloak: KeycloakClient | None = None) -> Flask:
    """Build a broker app from `settings` (default: the environment); raise ConfigError when they are bad."""
    settings = settings or Settings.from_env()
    parts = Broker.build(settings, keycloak)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes + 1  # see request_body.read_body
    app.json.sort_keys = False
    attach(app, parts)
    logging.getLogger("app").setLevel(settings.log_level)
    throttle_outage_logs()

    for blueprint in (auth.bp, login_flow.bp, backchannel.bp, tokens.bp, health.bp, openapi.bp):
        app.register_blueprint(blueprint)
    register_error_handler(app)
    openapi.build_spec(parts.version)  # built (and kept) now, so a broken document stops the start, not a request
    hooks.install(app)
    rate_limits.install(app, settings)  # after the hooks: a refused request still has its id and start time
    hooks.install_cross_origin(app, settings)
    if settings.token_transport == COOKIE_TRANSPORT and not settings.cookie_secure:
        log.warning("BROKER_COOKIE_SECURE=false: the refresh cookie is sent over plain HTTP; local runs only")
    return app
