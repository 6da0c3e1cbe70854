"""The container files, checked statically (no Docker engine here): they promise what the docs say."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
KEYCLOAK_VERSION = (REPO / "keycloak.version").read_text().strip()


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_runs_keycloak_of_the_pinned_version_with_the_realm():
    """Keycloak runs the version of keycloak.version, imports keycloak-realm.json as demo-realm.json, on loopback."""
    keycloak = compose()["services"]["keycloak"]
    assert keycloak["image"] == f"keycloak/keycloak:{KEYCLOAK_VERSION}"
    assert keycloak["command"][0] == "start-dev" and "--import-realm" in keycloak["command"]
    assert "./keycloak-realm.json:/opt/keycloak/data/import/demo-realm.json:ro" in keycloak["volumes"]
    assert keycloak["ports"] == ["127.0.0.1:8080:8080"]
    assert keycloak["environment"]["KC_BOOTSTRAP_ADMIN_USERNAME"] == "admin"
    assert "--health-enabled=true" in keycloak["command"] and "/health/ready" in " ".join(keycloak["healthcheck"]["test"])


def test_compose_runs_the_broker_against_that_keycloak():
    """The broker is built here, talks to the keycloak service with the realm's client, and waits for it."""
    broker = compose()["services"]["broker"]
    realm = json.loads((REPO / "keycloak-realm.json").read_text())
    client = realm["clients"][0]
    assert broker["build"] == "."
    assert broker["environment"] == {
        "KEYCLOAK_URL": "http://keycloak:8080",
        "KEYCLOAK_REALM": realm["realm"],
        "KEYCLOAK_CLIENT_ID": client["clientId"],
        "KEYCLOAK_CLIENT_SECRET": client["secret"],
        "BROKER_BIND": "0.0.0.0:8000",
        "REDIS_URL": "redis://redis:6379/0",
    }
    assert broker["ports"] == ["127.0.0.1:8000:8000"]
    assert broker["depends_on"] == {"keycloak": {"condition": "service_healthy"},
                                    "redis": {"condition": "service_healthy"}}


def test_compose_runs_a_private_redis_for_the_broker():
    """Redis is reachable by the broker only (no published port) and keeps nothing on disk."""
    redis_service = compose()["services"]["redis"]
    assert redis_service["image"].startswith("redis:")
    assert "ports" not in redis_service
    assert redis_service["command"] == ["redis-server", "--save", "", "--appendonly", "no"]


def test_dockerfile_runs_gunicorn_as_a_non_root_user_with_a_healthcheck():
    """Slim Python base, the project's gunicorn config, a non-root user, a health check on /health."""
    text = (REPO / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith(("#", " "))]
    by_name = {}
    for name, *rest in instructions:
        by_name.setdefault(name, []).append(rest[0] if rest else "")
    assert re.fullmatch(r"python:3\.1[1-9]-slim", by_name["FROM"][0])
    assert by_name["USER"] == ["broker"]
    assert by_name["CMD"] == ['["gunicorn", "--config", "gunicorn.conf.py"]']
    assert by_name["EXPOSE"] == ["8000"]
    assert "/health" in text.split("HEALTHCHECK", 1)[1]
    for copied in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for source in copied.split():
            assert (REPO / source).exists(), source
