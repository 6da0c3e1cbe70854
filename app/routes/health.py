"""GET /health (liveness, no upstream calls) and GET /ready (Keycloak's discovery document in hand)."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from flask import Blueprint, Response, current_app, jsonify

from app.errors import BrokerError, UpstreamUnavailable

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> Response:
    """200 while the process serves, whatever Keycloak is doing."""
    started = current_app.config["BROKER_STARTED"]
    return jsonify(
        status="ok",
        service="token-broker",
        version=current_app.config["BROKER_VERSION"],
        uptime=round(time.monotonic() - started, 3),
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


@bp.get("/ready")
def ready() -> Response:
    """200 once Keycloak's discovery document is in hand; 503 upstream_unavailable otherwise."""
    try:
        current_app.extensions["keycloak"].discovery()
    except BrokerError:
        raise UpstreamUnavailable("Keycloak's discovery document is not available yet") from None
    return jsonify(status="ready")
