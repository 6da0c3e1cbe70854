"""Service endpoints: GET /health (liveness), GET /ready (discovery and signing keys in hand), GET /metrics."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from flask import Blueprint, Response, current_app, jsonify

from app.errors import BrokerError, UpstreamUnavailable
from app.metrics import exposition

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
    """200 once the discovery document and the realm's signing keys are in hand; 503 otherwise."""
    try:
        current_app.extensions["keycloak"].discovery()
    except BrokerError:
        raise UpstreamUnavailable("Keycloak's discovery document is not available yet") from None
    if not current_app.extensions["signing_keys"].ready():
        raise UpstreamUnavailable("The realm's signing keys are not available yet")
    return jsonify(status="ready")


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text format, summed across gunicorn workers."""
    body, content_type = exposition()
    return Response(body, content_type=content_type)
