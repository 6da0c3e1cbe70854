"""Fixtures that run the real Keycloak (via scripts/keycloak.sh) and the real broker (via gunicorn)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
KEYCLOAK_SCRIPT = REPO / "scripts" / "keycloak.sh"
# Ports of their own, so the suite can run beside a `make run` on 8080/8000.
KC_HTTP_PORT = int(os.environ.get("TEST_KEYCLOAK_PORT", "18080"))
KC_MANAGEMENT_PORT = int(os.environ.get("TEST_KEYCLOAK_MANAGEMENT_PORT", "19000"))
BROKER_PORT = int(os.environ.get("TEST_BROKER_PORT", "18000"))
REALM = "demo"
CLIENT_ID = "token-broker"
CLIENT_SECRET = "token-broker-local-secret"


@dataclass(frozen=True)
class KeycloakServer:
    """Where the test Keycloak listens and how the broker's client authenticates to it."""

    base_url: str
    realm: str
    client_id: str
    client_secret: str

    @property
    def realm_url(self) -> str:
        return f"{self.base_url}/realms/{self.realm}"

    @property
    def token_url(self) -> str:
        return f"{self.realm_url}/protocol/openid-connect/token"

    @property
    def logout_url(self) -> str:
        return f"{self.realm_url}/protocol/openid-connect/logout"

    def token(self, **form: str) -> requests.Response:
        """POST a form to the token endpoint with the broker's client credentials (unless overridden)."""
        data = {"client_id": self.client_id, "client_secret": self.client_secret, **form}
        data = {k: v for k, v in data.items() if v is not None}
        return requests.post(self.token_url, data=data, timeout=30)

    def password_grant(self, username: str, password: str) -> dict:
        """Log a user in directly at Keycloak and return its token response."""
        response = self.token(grant_type="password", username=username, password=password, scope="openid")
        assert response.status_code == 200, response.text
        return response.json()


def _unavailable(message: str) -> None:
    """Fail loudly under CI, skip elsewhere: a Keycloak that cannot start is never a silent pass in CI."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _script_env() -> dict[str, str]:
    return {
        **os.environ,
        "KC_HTTP_PORT": str(KC_HTTP_PORT),
        "KC_MANAGEMENT_PORT": str(KC_MANAGEMENT_PORT),
    }


@pytest.fixture(scope="session")
def keycloak_server() -> Iterator[KeycloakServer]:
    """A clean real Keycloak with the shipped realm imported, started once per test session."""
    started = subprocess.run(
        [str(KEYCLOAK_SCRIPT), "start"], env=_script_env(), capture_output=True, text=True, timeout=600
    )
    if started.returncode != 0:
        _unavailable(f"Keycloak could not start:\n{started.stderr[-4000:]}")
    try:
        yield KeycloakServer(f"http://127.0.0.1:{KC_HTTP_PORT}", REALM, CLIENT_ID, CLIENT_SECRET)
    finally:
        subprocess.run([str(KEYCLOAK_SCRIPT), "stop"], env=_script_env(), capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def kc_admin(keycloak_server: KeycloakServer):
    """python-keycloak's admin client for the demo realm, logged in as the bootstrap admin."""
    from keycloak import KeycloakAdmin

    return KeycloakAdmin(
        server_url=keycloak_server.base_url + "/",
        username="admin",
        password="admin",
        realm_name=REALM,
        user_realm_name="master",
        verify=True,
    )


@dataclass(frozen=True)
class TestUser:
    """A throw-away realm user created for one test."""

    id: str
    username: str
    password: str


@pytest.fixture
def make_user(kc_admin) -> Iterator[Callable[..., TestUser]]:
    """Factory for throw-away users with complete profiles; every user it made is deleted afterwards."""
    created: list[str] = []

    def make(*, enabled: bool = True, required_actions: list[str] | None = None, roles: list[str] = ()) -> TestUser:
        username = f"user-{uuid.uuid4().hex[:10]}"
        password = f"pw-{secrets.token_urlsafe(12)}"
        user_id = kc_admin.create_user(
            {
                "username": username,
                "enabled": enabled,
                "email": f"{username}@example.com",
                "emailVerified": True,
                "firstName": "Test",
                "lastName": username,
                "requiredActions": required_actions or [],
                "credentials": [{"type": "password", "value": password, "temporary": False}],
            }
        )
        created.append(user_id)
        if roles:
            kc_admin.assign_realm_roles(user_id, [kc_admin.get_realm_role(r) for r in roles])
        return TestUser(user_id, username, password)

    yield make
    for user_id in created:
        kc_admin.delete_user(user_id)


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            requests.get(url, timeout=1)
            return
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or a worker still booting
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def broker_env(keycloak_server: KeycloakServer, **extra: str) -> dict[str, str]:
    """Environment for a broker that talks to the test Keycloak."""
    return {
        **os.environ,
        "KEYCLOAK_URL": keycloak_server.base_url,
        "KEYCLOAK_REALM": keycloak_server.realm,
        "KEYCLOAK_CLIENT_ID": keycloak_server.client_id,
        "KEYCLOAK_CLIENT_SECRET": keycloak_server.client_secret,
        **extra,
    }


def _start_broker(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen:
    """Run gunicorn with the project's config on `port`; fail the test run if it does not come up."""
    if not _port_free(port):
        pytest.fail(f"port {port} is taken; set TEST_BROKER_PORT", pytrace=False)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", str(REPO / "gunicorn.conf.py")],
            cwd=REPO,
            env={**env, "BROKER_BIND": f"127.0.0.1:{port}"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=30)
    except RuntimeError as exc:
        proc.kill()
        pytest.fail(f"broker did not start ({exc}):\n{log_path.read_text()[-4000:]}", pytrace=False)
    return proc


def _stop_broker(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def broker_log(tmp_path_factory) -> Path:
    """Where the session's broker (gunicorn) writes its stdout and stderr."""
    return tmp_path_factory.mktemp("broker") / "gunicorn.log"


@pytest.fixture(scope="session")
def broker_url(keycloak_server: KeycloakServer, broker_log: Path) -> Iterator[str]:
    """The real broker under gunicorn with its default process model (one gevent worker), at the test Keycloak.

    The whole suite logs in from one address, so this broker runs without rate limits (their tests start
    brokers of their own), and with a one-second refresh grace window so replays can be tested quickly.
    """
    env = broker_env(keycloak_server, BROKER_RATE_LIMITS_ENABLED="false", BROKER_REFRESH_GRACE_SECONDS="1")
    proc = _start_broker(env, BROKER_PORT, broker_log)
    try:
        yield f"http://127.0.0.1:{BROKER_PORT}"
    finally:
        _stop_broker(proc)


@pytest.fixture(scope="session")
def start_broker(keycloak_server: KeycloakServer, tmp_path_factory) -> Iterator[Callable[..., str]]:
    """Factory for more brokers with settings of their own (BROKER_* / BROKER_REDIS_URL); all stopped at the end."""
    running: list[subprocess.Popen] = []
    ports = iter(range(BROKER_PORT + 1, BROKER_PORT + 50))

    logs: dict[str, Path] = {}

    def start(**settings: str) -> str:
        """Start a broker; "{port}" in a setting's value becomes the broker's port (for BROKER_CALLBACK_URL)."""
        port = next(ports)
        settings = {name: value.replace("{port}", str(port)) for name, value in settings.items()}
        log_path = tmp_path_factory.mktemp("broker") / f"gunicorn-{port}.log"
        running.append(_start_broker(broker_env(keycloak_server, **settings), port, log_path))
        logs[f"http://127.0.0.1:{port}"] = log_path
        return f"http://127.0.0.1:{port}"

    start.logs = logs  # where each broker writes its log, by URL
    yield start
    for proc in running:
        _stop_broker(proc)
