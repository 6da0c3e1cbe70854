"""The shipped defaults, started exactly as `make run` starts them, never lose a session to duplicate refreshes.

`make run` runs scripts/run-local.sh, which finds the test Keycloak already running (KC_*_PORT point it there)
and serves the broker under gunicorn with nothing but the defaults: one gevent worker, no Redis, rate limits
on. Those limits count per client address, and everything here comes from this machine, so each run talks
from a loopback address of its own (127.0.0.N: Linux routes all of 127.0.0.0/8 to lo) and stays far below
them: per run one login and at most 21 refreshes from its address, against 60 logins and 120 refreshes per
minute.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
import requests
from requests.adapters import HTTPAdapter

from tests.integration.conftest import (
    BROKER_PORT,
    KC_HTTP_PORT,
    KC_MANAGEMENT_PORT,
    REPO,
    KeycloakServer,
    _port_free,
    _wait_http,
)

RUN_LOCAL = REPO / "scripts" / "run-local.sh"
PORT = BROKER_PORT + 60
RUNS = 10
PAIR_RUNS = 20
PAIR_GAP_SECONDS = 0.1
# Keycloak writes its events as it answers, but nothing promises it: wait this long for an expected one.
EVENT_WAIT_SECONDS = 5.0

# Every run gets a source address no other run used, so no two runs share a rate-limit counter.
_addresses = (f"127.0.0.{n}" for n in itertools.count(2))


def _make_run_env(keycloak_server: KeycloakServer) -> dict[str, str]:
    """`make run`'s environment: the caller's, without any broker setting, pointed at the test Keycloak."""
    env = {
        name: value for name, value in os.environ.items()
        if not name.startswith(("KEYCLOAK_", "BROKER_")) and name != "BROKER_REDIS_URL"
    }
    return {
        **env,
        "PYTHON": sys.executable,
        "KEYCLOAK_URL": keycloak_server.base_url,
        "KC_HTTP_PORT": str(KC_HTTP_PORT),
        "KC_MANAGEMENT_PORT": str(KC_MANAGEMENT_PORT),
        "BROKER_BIND": f"127.0.0.1:{PORT}",
    }


@dataclass(frozen=True)
class MakeRunBroker:
    """The broker scripts/run-local.sh started, and where its output goes."""

    url: str
    log: Path


@pytest.fixture(scope="module")
def make_run_broker(keycloak_server: KeycloakServer, tmp_path_factory) -> Iterator[MakeRunBroker]:
    """scripts/run-local.sh (what `make run` runs) with only the settings `make run` gets, at the test Keycloak."""
    if not _port_free(PORT):
        pytest.fail(f"port {PORT} is taken; set TEST_BROKER_PORT", pytrace=False)
    log_path = tmp_path_factory.mktemp("make-run") / "run-local.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(RUN_LOCAL)], cwd=REPO, env=_make_run_env(keycloak_server),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        try:
            _wait_http(f"http://127.0.0.1:{PORT}/health", proc, timeout=60)
        except RuntimeError as exc:
            pytest.fail(f"run-local.sh did not bring the broker up ({exc}):\n{log_path.read_text()[-4000:]}",
                        pytrace=False)
        if "a Keycloak is already running" not in log_path.read_text():
            pytest.fail(f"run-local.sh did not use the test Keycloak:\n{log_path.read_text()[-4000:]}", pytrace=False)
        yield MakeRunBroker(f"http://127.0.0.1:{PORT}", log_path)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the script's process group (bash and gunicorn) and wait; kill it if it outstays gunicorn's grace."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class _SourceAddressAdapter(HTTPAdapter):
    """Connects from a given local address, so the broker sees that address as the client's."""

    def __init__(self, source: str):
        self.source = source
        super().__init__()

    def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs):  # noqa: ANN001
        super().init_poolmanager(connections, maxsize, block=block, source_address=(self.source, 0),
                                 **pool_kwargs)


def _session(source: str) -> requests.Session:
    """A fresh session (its own connection) whose requests come from `source`."""
    http = requests.Session()
    http.mount("http://", _SourceAddressAdapter(source))
    return http


def _post(url: str, source: str, body: dict) -> requests.Response:
    with _session(source) as http:
        return http.post(url, json=body, timeout=60)


def _login(broker: str, source: str, user) -> str:
    """Log `user` in through the broker from `source`; the refresh token."""
    response = _post(f"{broker}/api/auth/login", source, {"username": user.username, "password": user.password})
    assert response.status_code == 200, response.text
    return response.json()["token"]["refresh_token"]


def _refresh(broker: str, source: str, refresh_token: str) -> requests.Response:
    return _post(f"{broker}/api/auth/refresh-token", source, {"refresh_token": refresh_token})


def _simultaneous_refreshes(broker: str, source: str, refresh_token: str, count: int) -> list[requests.Response]:
    """`count` refreshes of one token released at the same moment, each on its own connection."""
    barrier = threading.Barrier(count)

    def one(_: int) -> requests.Response:
        with _session(source) as http:
            barrier.wait()
            return http.post(f"{broker}/api/auth/refresh-token", json={"refresh_token": refresh_token}, timeout=60)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def _body(response: requests.Response) -> str:
    """The whole answer body, as canonical JSON when it is JSON, so bodies compare by content."""
    try:
        return json.dumps(response.json(), sort_keys=True)
    except ValueError:
        return response.text


def _refresh_grants(kc_admin, user_id: str, at_least: int) -> int:
    """Refresh grants Keycloak recorded for the user, once at least `at_least` are there (or the wait is over)."""
    deadline = time.monotonic() + EVENT_WAIT_SECONDS
    while True:
        seen = len(kc_admin.get_events({"type": "REFRESH_TOKEN", "user": user_id, "max": 1000}))
        if seen >= at_least or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def _refused_refreshes_since(kc_admin, since_ms: int) -> int:
    """Refresh grants Keycloak refused since `since_ms` (its refusals carry no user id, so they are counted by time)."""
    return sum(event["time"] >= since_ms for event in kc_admin.get_events({"type": "REFRESH_TOKEN_ERROR", "max": 1000}))


@dataclass
class Run:
    """What one run saw: the answers to the duplicates, the follow-up refresh, and Keycloak's grants."""

    number: int
    source: str
    statuses: list[int] = field(default_factory=list)
    distinct_bodies: int = 0
    rotated: bool = False
    follow_up: int | None = None
    grants: int = 0
    refusals: int = 0

    @property
    def lost(self) -> bool:
        return self.follow_up != 200

    def __str__(self) -> str:
        return (f"run {self.number} from {self.source}: statuses {self.statuses}, {self.distinct_bodies} distinct "
                f"bodies, follow-up {self.follow_up}, {self.grants} grant(s), {self.refusals} refusal(s)")


def _run(broker: str, kc_admin, user, number: int, send) -> Run:  # noqa: ANN001
    """Log `user` in, let `send(source, token)` deliver the duplicates, then refresh once more with the new token."""
    source = next(_addresses)
    run = Run(number, source)
    token = _login(broker, source, user)
    started_ms = int(time.time() * 1000) - 1
    responses = send(source, token)
    run.statuses = [r.status_code for r in responses]
    run.distinct_bodies = len({_body(r) for r in responses})
    answered = [r for r in responses if r.status_code == 200]
    if answered:
        newest = answered[0].json()["token"]["refresh_token"]
        run.rotated = newest != token
        run.follow_up = _refresh(broker, source, newest).status_code
    follow_up_grants = int(run.follow_up == 200)
    run.grants = _refresh_grants(kc_admin, user.id, at_least=1 + follow_up_grants) - follow_up_grants
    run.refusals = _refused_refreshes_since(kc_admin, started_ms)
    return run


def _check(runs: list[Run], duplicates: int) -> None:
    """No run lost its session; in each, every duplicate got the same 200 answer, from exactly one grant."""
    lost = [str(run) for run in runs if run.lost]
    assert not lost, f"{len(lost)} of {len(runs)} runs lost the session:\n" + "\n".join(lost)
    wrong = [str(run) for run in runs
             if run.statuses != [200] * duplicates or run.distinct_bodies != 1 or not run.rotated]
    assert not wrong, "runs whose duplicates were not all answered alike with new tokens:\n" + "\n".join(wrong)
    off = [str(run) for run in runs if (run.grants, run.refusals) != (1, 0)]
    assert not off, "runs in which Keycloak did not see exactly one refresh grant:\n" + "\n".join(off)


def test_make_run_serves_with_one_gevent_worker(make_run_broker):
    """`make run` serves the broker under gunicorn with one gevent worker, as the defaults say."""
    log = make_run_broker.log.read_text()
    assert "Using worker: gevent" in log, log[-4000:]
    assert log.count("Booting worker with pid") == 1, log[-4000:]


@pytest.mark.parametrize("concurrency", [10, 20])
def test_simultaneous_duplicate_refreshes_never_lose_the_session(make_run_broker, make_user, kc_admin, concurrency):
    """Ten runs of `concurrency` simultaneous refreshes of one token: one answer, one grant, and the session lives."""
    broker = make_run_broker.url
    runs = [
        _run(broker, kc_admin, make_user(), number,
             lambda source, token: _simultaneous_refreshes(broker, source, token, concurrency))
        for number in range(1, RUNS + 1)
    ]
    _check(runs, concurrency)


def test_sequential_duplicate_refreshes_never_lose_the_session(make_run_broker, make_user, kc_admin):
    """Twenty runs of one token sent twice, 100 ms apart: one answer, one grant, and the session lives."""
    broker = make_run_broker.url

    def pair(source: str, token: str) -> list[requests.Response]:
        first = _refresh(broker, source, token)
        time.sleep(PAIR_GAP_SECONDS)
        return [first, _refresh(broker, source, token)]

    runs = [_run(broker, kc_admin, make_user(), number, pair) for number in range(1, PAIR_RUNS + 1)]
    _check(runs, 2)
