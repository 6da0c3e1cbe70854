"""Prometheus instruments of the broker, and the /metrics exposition (multiprocess-safe under gunicorn).

Under gunicorn, gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at a fresh directory before any worker
starts, so every worker writes its samples there and /metrics adds them up across workers.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "broker_http_requests", "HTTP requests answered, by route template, method and status", ["route", "method", "status"]
)
HTTP_LATENCY = Histogram(
    "broker_http_request_duration_seconds", "Time to answer a request, by route template", ["route"],
    buckets=_LATENCY_BUCKETS,
)
ERRORS = Counter("broker_errors", "Error responses, by the contract's error code", ["error"])
KEYCLOAK_LATENCY = Histogram(
    "broker_keycloak_request_duration_seconds",
    "Time of each call to Keycloak, by operation (login, refresh, logout, introspect, keys, discovery) and outcome",
    ["operation", "outcome"],
    buckets=_LATENCY_BUCKETS,
)
REFRESHES = Counter(
    "broker_refreshes",
    "Refresh requests by how they were served: upstream (a Keycloak grant) or coalesced; caller_gave_up counts "
    "callers that stopped waiting while their refresh went on; other_client counts a token presented again, after "
    "its refresh landed, by another client (sent to Keycloak, which sees the reuse)",
    ["kind"],
)
KEYCLOAK_CONNECTIONS = Counter(
    "broker_keycloak_connections_opened",
    "New TCP connections opened to Keycloak; a steady rise under load means keep-alive connections are not reused",
)
KEY_FETCHES = Counter("broker_jwks_fetches", "Fetches of the realm's signing keys, by outcome", ["outcome"])
RATE_LIMITED = Counter("broker_rate_limited", "Requests refused by a rate limit, by endpoint", ["endpoint"])
TOKEN_VALIDATIONS = Counter(
    "broker_token_validations", "Bearer tokens checked on /me and /verify, by outcome (valid, invalid, expired)",
    ["outcome"],
)
AUDIT_EVENTS = Counter("broker_audit_events", "Audit events emitted, by event and outcome", ["event", "outcome"])
AUDIT_DROPPED = Counter(
    "broker_audit_dropped",
    "Audit events a sink could not take (queue full) or could not deliver, by sink and cause",
    ["sink", "cause"],
)


# gunicorn accepts any upper-case token of 3 to 20 letters as a method: label only these, the rest as "other",
# so a client cannot create metric series (and memory, and a slower /metrics) at will.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """The request method as a metric label: one of METHODS, or "other"."""
    return method if method in METHODS else "other"


def keycloak_outcome(status: int | None, failure: str | None = None) -> str:
    """A low-cardinality outcome label for a Keycloak call: ok, refused, error, unreachable, lost, busy or timeout."""
    if failure is not None:
        return failure
    if status is None or status >= 500:
        return "error"
    return "ok" if status < 400 else "refused"


def exposition() -> tuple[bytes, str]:
    """The metrics in Prometheus text format, summed across gunicorn workers when running under gunicorn."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

