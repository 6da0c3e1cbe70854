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


READY_VERDICT_SECONDS = 2.0


@bp.get("/ready")
def ready() -> Response:
    """200 once the discovery document and the realm's signing keys are in hand; 503 otherwise.

    A negative verdict is kept for READY_VERDICT_SECONDS, so frequent probes of a broker whose Keycloak
    is down cost Keycloak at most one discovery attempt per that interval and worker.
    """
    verdicts = current_app.extensions.setdefault("ready_verdict", {})
    now = time.monotonic()
    if verdicts.get("until", 0.0) > now:
        raise UpstreamUnavailable(verdicts["message"])
    message = None
    try:
        current_app.extensions["keycloak"].discovery()
    except BrokerError:
        message = "Keycloak's discovery document is not available yet"
    if message is None and not current_app.extensions["signing_keys"].ready():
        message = "The realm's signing keys are not available yet"
    if message is not None:
        verdicts.update(until=now + READY_VERDICT_SECONDS, message=message)
        raise UpstreamUnavailable(message)
    return jsonify(status="ready")


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text format, summed across gunicorn workers."""
    body, content_type = exposition()
    return Response(body, content_type=content_type)
