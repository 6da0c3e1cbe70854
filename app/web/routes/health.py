"""Service endpoints: GET /health (liveness), GET /ready (discovery and signing keys in hand), GET /metrics."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from flask import Blueprint, Response, jsonify

from app.metrics import exposition
from app.web.context import broker

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> Response:
    """200 while the process serves, whatever Keycloak is doing."""
    parts = broker()
    return jsonify(
        status="ok",
        service="token-broker",
        version=parts.version,
        uptime=round(time.monotonic() - parts.started, 3),
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


@bp.get("/ready")
def ready() -> Response:
    """200 once the discovery document and the realm's signing keys are in hand; 503 otherwise (app.broker.Readiness)."""
    broker().readiness.check()
    return jsonify(status="ready")


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text format, summed across gunicorn workers."""
    body, content_type = exposition()
    return Response(body, content_type=content_type)
