"""The container files, checked statically (no Docker engine here): they promise what the docs say."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

from app.config import Settings

REPO = Path(__file__).resolve().parents[2]
KEYCLOAK_VERSION = (REPO / "keycloak.version").read_text().strip()


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def dockerfile() -> dict[str, list[str]]:
    """The Dockerfile's instructions by name, each with its argument text (continuation lines left out)."""
    text = (REPO / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith(("#", " "))]
    by_name: dict[str, list[str]] = {}
    for name, *rest in instructions:
        by_name.setdefault(name, []).append(rest[0] if rest else "")
    return by_name


def dockerfile_env() -> dict[str, str]:
    """The environment the image's ENV instructions set (both `ENV K=V ...` and `ENV K V` forms)."""
    env = {}
    for argument in dockerfile().get("ENV", []):
        words = shlex.split(argument)
        if "=" in words[0]:
            env.update(word.split("=", 1) for word in words)
        else:
            env[words[0]] = " ".join(words[1:])
    return env


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
        "KEYCLOAK_ALLOW_HTTP": "true",
        "BROKER_REGISTRATION": "true",
        "KEYCLOAK_REALM": realm["realm"],
        "KEYCLOAK_CLIENT_ID": client["clientId"],
        "KEYCLOAK_CLIENT_SECRET": client["secret"],
        "BROKER_BIND": "0.0.0.0:8000",
        "BROKER_REDIS_URL": "redis://redis:6379/0",
        "BROKER_SINGLE_INSTANCE": "true",
    }
    assert broker["stop_grace_period"] == "35s"  # longer than BROKER_GRACEFUL_TIMEOUT (25 s)
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
    by_name = dockerfile()
    assert re.fullmatch(r"python:3\.1[1-9]-slim", by_name["FROM"][0])
    assert by_name["USER"] == ["broker"]
    assert by_name["CMD"] == ['["gunicorn", "--config", "gunicorn.conf.py"]']
    assert by_name["EXPOSE"] == ["8000"]
    assert "/health" in text.split("HEALTHCHECK", 1)[1]
    for copied in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for source in copied.split():
            assert (REPO / source).exists(), source


PROCESS_MODEL_VARIABLES = ("BROKER_WORKERS", "BROKER_THREADS")


def test_the_image_and_compose_run_the_default_process_model():
    """The image's CMD is plain `gunicorn --config gunicorn.conf.py`, and neither file sets the worker counts."""
    assert json.loads(dockerfile()["CMD"][-1]) == ["gunicorn", "--config", "gunicorn.conf.py"]
    dockerfile_text = (REPO / "Dockerfile").read_text()
    broker = compose()["services"]["broker"]
    for name in PROCESS_MODEL_VARIABLES:
        assert name not in dockerfile_text, f"the Dockerfile sets {name}"
        assert name not in broker.get("environment", {}), f"compose's broker sets {name}"
    assert not {"command", "entrypoint", "env_file"} & broker.keys(), "compose overrides the image's CMD or environment"


def test_the_compose_broker_environment_is_a_valid_configuration():
    """The image's ENV plus compose's broker environment (with its secret and BROKER_REDIS_URL) passes Settings.from_env."""
    environment = {**dockerfile_env(), **{k: str(v) for k, v in compose()["services"]["broker"]["environment"].items()}}
    settings = Settings.from_env(environment)  # raises ConfigError, naming every bad variable
    assert (settings.bind, settings.workers) == ("0.0.0.0:8000", 1)
    assert settings.redis_url == "redis://redis:6379/0"
