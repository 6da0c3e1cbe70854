"""The fault suite: the promises of docs/reliability.md against the real Keycloak and Redis, with faults injected.

A TCP fault proxy (tests/support/fault_proxy.py) sits between the broker and Keycloak, and another between
the broker and Redis. Every case checks what the client was told (status and whole body), whether Keycloak
spent the token (its own event store), and that the session can still be refreshed afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pytest
import requests

from tests.integration.conftest import BROKER_PORT, _start_broker, _stop_broker, broker_env
from tests.support.answers import BUSY, KEPT, LOST, UNCOORDINATED
from tests.support.fault_proxy import FaultProxy

READ_TIMEOUT = 2  # how long a caller waits for Keycloak in these brokers
# The settings the fault brokers run with: the defaults, except shorter timeouts so the cases run quickly.
FAULT_SETTINGS = dict(
    KEYCLOAK_READ_TIMEOUT=str(READ_TIMEOUT),
    BROKER_REFRESH_ANSWER_LIMIT="10",
    BROKER_RATE_LIMITS_ENABLED="false",
)
UNREACHABLE = {"error": "upstream_unavailable", "message": "The identity provider cannot be reached; try again later"}
REUSED = {"error": "invalid_grant", "message": "Refresh token was already used; the session has been ended"}
ports = iter(range(BROKER_PORT + 100, BROKER_PORT + 140))


class RunningBroker:
    """A broker under gunicorn started by this module, with its process at hand for signals."""

    def __init__(self, keycloak_server, tmp_path_factory, keycloak_url: str, **settings: str):
        self.port = next(ports)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path_factory.mktemp("fault-broker") / "gunicorn.log"
        env = broker_env(keycloak_server, **{**FAULT_SETTINGS, **settings})
        env["KEYCLOAK_URL"] = keycloak_url
        self.proc = _start_broker(env, self.port, self.log)

    def workers(self) -> list[int]:
        """The pids of gunicorn's worker processes."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(pid) for pid in children]

    def stop(self) -> None:
        if self.proc.poll() is None:
            _stop_broker(self.proc)

    def log_text(self) -> str:
        return self.log.read_text()


def post(url: str, path: str, timeout: float = 30, **kwargs) -> requests.Response:
    return requests.post(url + path, timeout=timeout, **kwargs)


def login(url: str, user) -> dict:
    response = post(url, "/api/auth/login", json={"username": user.username, "password": user.password})
    assert response.status_code == 200, response.text
    return response.json()["token"]


def refresh(url: str, token: str, timeout: float = 30) -> requests.Response:
    return post(url, "/api/auth/refresh-token", json={"refresh_token": token}, timeout=timeout)


def outcome(response: requests.Response) -> tuple[int, dict]:
    return response.status_code, response.json()


def refresh_grants(kc_admin, user_id: str, expect: int | None = None) -> int:
    """Refresh grants Keycloak recorded for the user (its event store); waits briefly for `expect` to show."""
    deadline = time.monotonic() + 3
    while True:
        events = kc_admin.get_events(query={"type": "REFRESH_TOKEN", "user": user_id, "max": 1000})
        count = len(events)
        if expect is None or count == expect or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


def assert_alive(url: str, token: str) -> None:
    """The session can still be refreshed: the token gets new tokens."""
    response = refresh(url, token)
    assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def kc_proxy(keycloak_server) -> Iterator[FaultProxy]:
    """A fault proxy in front of the test Keycloak (the fault brokers talk to Keycloak only through it)."""
    port = urlsplit(keycloak_server.base_url).port
    with FaultProxy("127.0.0.1", port) as proxy:
        yield proxy


@pytest.fixture(autouse=True)
def healthy(kc_proxy) -> Iterator[None]:
    """Every case starts and ends with the proxies passing traffic."""
    kc_proxy.set_mode(FaultProxy.PASS)
    yield
    kc_proxy.set_mode(FaultProxy.PASS)


@pytest.fixture(scope="module")
def broker(keycloak_server, kc_proxy, tmp_path_factory) -> Iterator[RunningBroker]:
    """The broker with its default process model (one gevent worker, no Redis), talking through the proxy."""
    running = RunningBroker(keycloak_server, tmp_path_factory, kc_proxy.url)
    yield running
    running.stop()


@pytest.fixture
def realm_allows_one_reuse(kc_admin) -> Iterator[None]:
    """The realm-side option for answers the broker cannot save: refreshTokenMaxReuse=1 (reset afterwards)."""
    kc_admin.update_realm("demo", {"refreshTokenMaxReuse": 1})
    try:
        yield
    finally:
        kc_admin.update_realm("demo", {"refreshTokenMaxReuse": 0})


def test_keycloak_stopped_is_503_with_retry_after_and_spends_nothing(broker, kc_proxy, make_user, kc_admin):
    """Keycloak refusing connections: 503 'cannot be reached' with Retry-After, no grant, and the session lives on."""
    user = make_user()
    tokens = login(broker.url, user)
    kc_proxy.set_mode(FaultProxy.REFUSE)
    started = time.monotonic()
    response = refresh(broker.url, tokens["refresh_token"])
    elapsed = time.monotonic() - started
    assert outcome(response) == (503, UNREACHABLE)
    assert response.headers["Retry-After"] == "5"
    assert elapsed < 2
    kc_proxy.set_mode(FaultProxy.PASS)
    assert refresh_grants(kc_admin, user.id) == 0
    assert_alive(broker.url, tokens["refresh_token"])


def test_a_keycloak_outage_is_logged_once_not_per_request(broker, kc_proxy):
    """Thirty refreshes while Keycloak is down leave one 'unreachable' line in the log, not thirty."""
    kc_proxy.set_mode(FaultProxy.REFUSE)
    before = broker.log_text()
    for i in range(30):
        assert outcome(refresh(broker.url, f"not-a-real-token-{i}")) == (503, UNREACHABLE)
    new = broker.log_text()[len(before):]
    assert new.count("Keycloak unreachable during") <= 1  # 0 when an earlier case logged it < 10 s ago
    assert "Keycloak unreachable during" in broker.log_text()  # but the outage was logged
    assert "Traceback" not in new


def test_a_refresh_answered_after_the_callers_deadline_is_kept_for_its_retry(broker, kc_proxy, make_user, kc_admin):
    """Keycloak answering after the broker's own deadline: 504 that says the answer is kept; the retry gets it."""
    user = make_user()
    tokens = login(broker.url, user)
    kc_proxy.set_mode(FaultProxy.DELAY, seconds=READ_TIMEOUT + 2.5)
    assert outcome(refresh(broker.url, tokens["refresh_token"])) == (504, KEPT)
    kc_proxy.set_mode(FaultProxy.PASS)
    retried = refresh(broker.url, tokens["refresh_token"])  # joins the flight still in the air, or its outcome
    assert retried.status_code == 200, retried.text
    assert refresh_grants(kc_admin, user.id, expect=1) == 1  # one grant: the retry was not a reuse
    assert_alive(broker.url, retried.json()["token"]["refresh_token"])


def test_a_client_that_disconnected_gets_the_new_tokens_on_its_retry(broker, kc_proxy, make_user, kc_admin):
    """The client hangs up while Keycloak is slow; its retry with the same token gets the tokens of that one grant."""
    user = make_user()
    tokens = login(broker.url, user)
    kc_proxy.set_mode(FaultProxy.DELAY, seconds=1.5)
    with pytest.raises(requests.Timeout):
        refresh(broker.url, tokens["refresh_token"], timeout=0.5)
    time.sleep(1.5)  # the flight lands meanwhile
    kc_proxy.set_mode(FaultProxy.PASS)
    retried = refresh(broker.url, tokens["refresh_token"])
    assert retried.status_code == 200, retried.text
    assert refresh_grants(kc_admin, user.id, expect=1) == 1
    assert_alive(broker.url, retried.json()["token"]["refresh_token"])


def test_a_reset_before_the_request_reached_keycloak_spends_nothing(broker, kc_proxy, make_user, kc_admin):
    """A connection reset as it opens: 503 (unreachable or broke, as the timing fell), no grant, the retry works."""
    user = make_user()
    tokens = login(broker.url, user)
    kc_proxy.set_mode(FaultProxy.RESET_ON_CONNECT)
    kc_proxy.reset_all()  # the broker's pooled keep-alive connection meets the fault too
    # The reset may come before the request could be written (unreachable) or after (broke): both are honest.
    assert outcome(refresh(broker.url, tokens["refresh_token"])) in [(503, UNREACHABLE), (503, LOST)]
    kc_proxy.set_mode(FaultProxy.PASS)
    assert refresh_grants(kc_admin, user.id) == 0
    assert_alive(broker.url, tokens["refresh_token"])


@pytest.mark.parametrize("mode", [FaultProxy.RESET_BEFORE_ANSWER, FaultProxy.RESET_MID_ANSWER])
def test_a_reset_after_keycloak_answered_says_so_and_strict_reuse_ends_the_session(
    broker, kc_proxy, make_user, kc_admin, mode
):
    """What the broker cannot save: the 503 says the answer was lost; with the shipped strict realm the retry is
    Keycloak's own reuse verdict (documented in docs/reliability.md), never a broker-made invalid_grant."""
    user = make_user()
    tokens = login(broker.url, user)
    kc_proxy.set_mode(mode)
    assert outcome(refresh(broker.url, tokens["refresh_token"])) == (503, LOST)
    kc_proxy.set_mode(FaultProxy.PASS)
    assert refresh_grants(kc_admin, user.id, expect=1) == 1  # Keycloak did answer: the token is spent
    assert outcome(refresh(broker.url, tokens["refresh_token"])) == (400, REUSED)


@pytest.mark.parametrize("mode", [FaultProxy.RESET_BEFORE_ANSWER, FaultProxy.RESET_MID_ANSWER])
def test_a_reset_after_keycloak_answered_recovers_with_the_realm_reuse_option(
    broker, kc_proxy, make_user, kc_admin, realm_allows_one_reuse, mode
):
    """With refreshTokenMaxReuse=1 the retry after a lost answer gets new tokens and the session lives on."""
    user = make_user()
    tokens = login(broker.url, user)
    kc_proxy.set_mode(mode)
    assert outcome(refresh(broker.url, tokens["refresh_token"])) == (503, LOST)
    kc_proxy.set_mode(FaultProxy.PASS)
    retried = refresh(broker.url, tokens["refresh_token"])
    assert retried.status_code == 200, retried.text
    assert refresh_grants(kc_admin, user.id, expect=2) == 2
    assert_alive(broker.url, retried.json()["token"]["refresh_token"])


def test_an_html_502_from_a_proxy_is_upstream_error_and_spends_nothing(broker, kc_proxy, make_user, kc_admin):
    """An HTML 502 page instead of Keycloak: 502 upstream_error, no grant, the session lives on."""
    user = make_user()
    tokens = login(broker.url, user)
    kc_proxy.set_mode(FaultProxy.HTTP_502)
    assert outcome(refresh(broker.url, tokens["refresh_token"])) == (
        502, {"error": "upstream_error", "message": "The identity provider returned an unusable answer"}
    )
    kc_proxy.set_mode(FaultProxy.PASS)
    assert refresh_grants(kc_admin, user.id) == 0
    assert_alive(broker.url, tokens["refresh_token"])


def test_a_failing_jwks_endpoint_leaves_cached_keys_validating(broker, kc_proxy, make_user):
    """The realm's key endpoint answering 502: /me and /verify go on with the keys in hand, /ready stays 200."""
    user = make_user()
    tokens = login(broker.url, user)
    bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
    assert requests.get(broker.url + "/api/auth/me", headers=bearer, timeout=10).status_code == 200
    kc_proxy.set_mode(FaultProxy.HTTP_502, path_contains="/certs")
    for _ in range(5):
        assert requests.get(broker.url + "/api/auth/me", headers=bearer, timeout=10).status_code == 200
        assert requests.get(broker.url + "/api/auth/verify", headers=bearer, timeout=10).status_code == 204
    assert requests.get(broker.url + "/ready", timeout=10).status_code == 200


def test_a_hung_keycloak_holds_a_bounded_number_of_requests_and_starves_no_route(
    keycloak_server, kc_proxy, make_user, tmp_path_factory
):
    """50 refreshes waiting on a Keycloak that never answers: beyond the bound they get 503 at once, and
    /health, /ready, /metrics and /verify (keys in hand) keep answering meanwhile."""
    running = RunningBroker(keycloak_server, tmp_path_factory, kc_proxy.url, BROKER_UPSTREAM_CONCURRENCY="20")
    try:
        user = make_user()
        tokens = login(running.url, user)
        bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
        assert requests.get(running.url + "/api/auth/verify", headers=bearer, timeout=10).status_code == 204
        kc_proxy.set_mode(FaultProxy.BLACKHOLE)
        with ThreadPoolExecutor(max_workers=50) as pool:
            waiting = [pool.submit(refresh, running.url, f"not-a-real-token-{i}") for i in range(50)]
            time.sleep(0.5)  # all 50 are in the broker now
            slowest = 0.0
            for _ in range(10):
                for path, headers, status in (("/health", {}, 200), ("/ready", {}, 200), ("/metrics", {}, 200),
                                              ("/api/auth/verify", bearer, 204)):
                    started = time.monotonic()
                    assert requests.get(running.url + path, headers=headers, timeout=5).status_code == status
                    slowest = max(slowest, time.monotonic() - started)
            answers = [outcome(f.result()) for f in waiting]
        assert slowest < 1.0, f"a route waited {slowest:.2f}s behind the hung Keycloak"
        busy = [a for a in answers if a == (503, BUSY)]
        assert len(busy) == 30
        assert sorted(set(a[0] for a in answers)) == [503, 504]
    finally:
        kc_proxy.set_mode(FaultProxy.PASS)
        running.stop()


def test_sigterm_under_load_lets_refreshes_in_flight_finish(keycloak_server, kc_proxy, make_user, tmp_path_factory):
    """SIGTERM while ten refreshes wait on a slow Keycloak: every one of them is answered 200, then the broker exits."""
    running = RunningBroker(keycloak_server, tmp_path_factory, kc_proxy.url)
    users = [make_user() for _ in range(10)]
    try:
        tokens = [login(running.url, user) for user in users]
        kc_proxy.set_mode(FaultProxy.DELAY, seconds=1.0)
        with ThreadPoolExecutor(max_workers=10) as pool:
            pending = [pool.submit(refresh, running.url, t["refresh_token"]) for t in tokens]
            time.sleep(0.3)
            running.proc.send_signal(signal.SIGTERM)
            statuses = [f.result().status_code for f in pending]
        assert statuses == [200] * 10
        assert running.proc.wait(timeout=30) == 0
    finally:
        kc_proxy.set_mode(FaultProxy.PASS)
        running.stop()


def test_a_killed_worker_answers_honestly_and_the_retry_recovers_with_the_realm_option(
    keycloak_server, kc_proxy, make_user, kc_admin, tmp_path_factory, realm_allows_one_reuse
):
    """SIGKILL of the worker mid-refresh: the client sees the connection drop, the master starts a new worker,
    and with refreshTokenMaxReuse=1 the retry of the same token gets new tokens."""
    running = RunningBroker(keycloak_server, tmp_path_factory, kc_proxy.url)
    try:
        user = make_user()
        tokens = login(running.url, user)
        [worker] = running.workers()
        kc_proxy.set_mode(FaultProxy.DELAY, seconds=1.5)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(refresh, running.url, tokens["refresh_token"])
            time.sleep(0.5)
            os.kill(worker, signal.SIGKILL)
            with pytest.raises(requests.ConnectionError):
                pending.result()
        kc_proxy.set_mode(FaultProxy.PASS)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not [w for w in running.workers() if w != worker]:
            time.sleep(0.2)
        assert refresh_grants(kc_admin, user.id, expect=1) == 1  # Keycloak answered the killed worker's call
        retried = refresh(running.url, tokens["refresh_token"])
        assert retried.status_code == 200, retried.text
        assert_alive(running.url, retried.json()["token"]["refresh_token"])
    finally:
        kc_proxy.set_mode(FaultProxy.PASS)
        running.stop()


def test_a_reload_keeps_the_answer_of_a_refresh_whose_caller_gave_up(
    keycloak_server, kc_proxy, make_user, kc_admin, tmp_path_factory
):
    """kill -HUP (a reload) after a caller got its 504: once the old worker has drained and gone, the new one
    answers the retry with the tokens of the one grant; no Redis (the instance's local store keeps them)."""
    running = RunningBroker(keycloak_server, tmp_path_factory, kc_proxy.url)
    try:
        user = make_user()
        tokens = login(running.url, user)
        [old] = running.workers()
        kc_proxy.set_mode(FaultProxy.DELAY, seconds=6)  # past the caller's wait (connect 2 s + read 2 s)
        assert outcome(refresh(running.url, tokens["refresh_token"])) == (504, KEPT)
        kc_proxy.set_mode(FaultProxy.PASS)  # the request in flight keeps its delay
        running.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (old in running.workers() or not running.workers()):
            time.sleep(0.1)
        assert old not in running.workers()
        retried = refresh(running.url, tokens["refresh_token"])
        assert retried.status_code == 200, retried.text
        assert refresh_grants(kc_admin, user.id, expect=1) == 1
        assert_alive(running.url, retried.json()["token"]["refresh_token"])
    finally:
        kc_proxy.set_mode(FaultProxy.PASS)
        running.stop()


def _slowloris(port: int, count: int) -> tuple[list[socket.socket], threading.Event]:
    """`count` connections that send a request a byte per second and never finish it."""
    sockets = []
    for i in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        head = "POST /api/auth/login HTTP/1.1\r\nHost: x\r\n" if i % 2 else "GET /health HTTP/1.1\r\nHo"
        if i % 2:
            head += "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        sock.sendall(head.encode())
        sockets.append(sock)
    stop = threading.Event()

    def drip() -> None:
        while not stop.wait(1.0):
            for sock in sockets:
                try:
                    sock.send(b" " if sock.fileno() % 2 else b"x")
                except OSError:
                    pass

    threading.Thread(target=drip, daemon=True).start()
    return sockets, stop


def test_slow_clients_cannot_starve_the_others(broker):
    """200 connections trickling their headers or bodies a byte a second: /health keeps answering at once."""
    sockets, stop = _slowloris(broker.port, 200)
    try:
        time.sleep(1.5)
        slowest = 0.0
        for _ in range(50):
            started = time.monotonic()
            assert requests.get(broker.url + "/health", timeout=5).status_code == 200
            slowest = max(slowest, time.monotonic() - started)
        assert slowest < 1.0, f"/health waited {slowest:.2f}s behind slow clients"
    finally:
        stop.set()
        for sock in sockets:
            sock.close()


def _answers_in(data: bytes) -> tuple[int, bytes]:
    """How many whole HTTP answers (Content-Length framed) `data` begins with, and what is left after them."""
    count = 0
    while (end := data.find(b"\r\n\r\n")) >= 0:
        length = next(int(line.split(b":", 1)[1]) for line in data[:end].split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        if len(data) < end + 4 + length:
            break
        data, count = data[end + 4 + length:], count + 1
    return count, data


def test_a_connection_that_keeps_its_requests_coming_does_not_hold_the_worker(broker):
    """400 pipelined /health requests on one keep-alive connection (what a busy gateway's connection looks like to
    the one gevent worker): a request on a second connection is answered in between, not after all 400."""
    total = 400
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    busy = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
    other = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
    answered = [0]
    first = threading.Event()

    def read_busy() -> None:
        left = b""
        while answered[0] < total:
            data = busy.recv(65536)
            if not data:
                return
            count, left = _answers_in(left + data)
            answered[0] += count
            if answered[0]:
                first.set()

    reader = threading.Thread(target=read_busy, daemon=True)
    try:
        reader.start()
        busy.sendall(request * total)
        assert first.wait(10)
        other.sendall(request)
        assert other.recv(65536).startswith(b"HTTP/1.1 200 ")
        busy_when_answered = answered[0]
        reader.join(20)
        assert (answered[0], busy_when_answered < total // 2) == (total, True), busy_when_answered
    finally:
        busy.close()
        other.close()


# Redis faults: a proxy in front of the suite's real redis-server.

@pytest.fixture(scope="module")
def redis_proxy(redis_url) -> Iterator[FaultProxy]:
    """A fault proxy in front of the real Redis."""
    with FaultProxy("127.0.0.1", urlsplit(redis_url).port) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def redis_broker(keycloak_server, kc_proxy, redis_proxy, tmp_path_factory) -> Iterator[RunningBroker]:
    """One worker with BROKER_REDIS_URL and BROKER_SINGLE_INSTANCE (as compose runs it), Redis reached through the proxy."""
    running = RunningBroker(keycloak_server, tmp_path_factory, kc_proxy.url,
                            BROKER_REDIS_URL=f"redis://127.0.0.1:{redis_proxy.port}/0", BROKER_SINGLE_INSTANCE="true",
                            # Rate limits on, so their Redis counters meet the faults too (high: one client address).
                            BROKER_RATE_LIMITS_ENABLED="true", BROKER_RATE_LIMIT_REFRESH="1000 per minute",
                            BROKER_RATE_LIMIT_LOGIN_IP="1000 per minute")
    yield running
    running.stop()


@pytest.fixture(scope="module", params=["3", "1"], ids=["three-workers", "one-worker-of-several-instances"])
def redis_workers(request, keycloak_server, kc_proxy, redis_proxy, tmp_path_factory) -> Iterator[RunningBroker]:
    """Processes that may share Redis with others: three workers, or one worker without BROKER_SINGLE_INSTANCE."""
    running = RunningBroker(keycloak_server, tmp_path_factory, kc_proxy.url, BROKER_WORKERS=request.param,
                            BROKER_REDIS_URL=f"redis://127.0.0.1:{redis_proxy.port}/0")
    yield running
    running.stop()


@pytest.fixture
def redis_healthy(redis_proxy) -> Iterator[FaultProxy]:
    """The Redis proxy passes traffic before and after the case."""
    redis_proxy.set_mode(FaultProxy.PASS)
    yield redis_proxy
    redis_proxy.set_mode(FaultProxy.PASS)


def _duplicates(url: str, token: str, count: int) -> list[requests.Response]:
    barrier = threading.Barrier(count)

    def one(_: int) -> requests.Response:
        barrier.wait()
        return refresh(url, token)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


@pytest.mark.parametrize("mode", [FaultProxy.REFUSE, FaultProxy.BLACKHOLE, FaultProxy.RESET_ON_CONNECT])
def test_one_worker_with_redis_out_still_coalesces_and_answers_promptly(
    redis_broker, redis_healthy, make_user, kc_admin, mode
):
    """Redis stopped, blackholed or resetting: refreshes work, ten duplicates make one grant, /health is prompt."""
    user = make_user()
    tokens = login(redis_broker.url, user)
    redis_healthy.set_mode(mode)
    redis_healthy.reset_all()  # the broker's pooled Redis connections meet the fault too
    started = time.monotonic()
    answers = _duplicates(redis_broker.url, tokens["refresh_token"], 10)
    elapsed = time.monotonic() - started
    assert [a.status_code for a in answers] == [200] * 10
    assert len({a.text for a in answers}) == 1
    assert elapsed < 3, f"duplicates took {elapsed:.2f}s with Redis {mode}"
    started = time.monotonic()
    assert requests.get(redis_broker.url + "/health", timeout=5).status_code == 200
    assert time.monotonic() - started < 1
    assert refresh_grants(kc_admin, user.id, expect=1) == 1
    redis_healthy.set_mode(FaultProxy.PASS)
    assert_alive(redis_broker.url, answers[0].json()["token"]["refresh_token"])


def test_redis_outage_is_logged_once_not_per_request(redis_broker, redis_healthy, make_user):
    """Twenty refreshes during a Redis outage leave one outage line in the log, and no traceback."""
    time.sleep(5.5)  # past BROKER_REDIS_RETRY_SECONDS of an earlier case: the next call closes the breaker
    assert_alive(redis_broker.url, login(redis_broker.url, make_user())["refresh_token"])
    before = redis_broker.log_text()
    redis_healthy.set_mode(FaultProxy.REFUSE)
    redis_healthy.reset_all()
    for _ in range(2):
        user = make_user()
        token = login(redis_broker.url, user)["refresh_token"]
        for _ in range(10):
            response = refresh(redis_broker.url, token)
            assert response.status_code == 200, response.text
            token = response.json()["token"]["refresh_token"]
    new = redis_broker.log_text()[len(before):]
    assert new.count("Redis is unavailable") == 1
    assert "Traceback" not in new and '"level": "ERROR"' not in new


def test_processes_that_share_redis_answer_503_during_its_outage_and_recover(
    redis_workers, redis_healthy, make_user, kc_admin
):
    """Redis out where other processes may share it: refreshes get 503 (never a second use of a token), and work
    once Redis is back."""
    user = make_user()
    tokens = login(redis_workers.url, user)
    redis_healthy.set_mode(FaultProxy.REFUSE)
    redis_healthy.reset_all()
    answers = _duplicates(redis_workers.url, tokens["refresh_token"], 6)
    assert [outcome(a) for a in answers] == [
        (503, UNCOORDINATED)
    ] * 6
    assert all(a.headers["Retry-After"] == "5" for a in answers)
    assert refresh_grants(kc_admin, user.id) == 0
    redis_healthy.set_mode(FaultProxy.PASS)
    time.sleep(5.5)  # BROKER_REDIS_RETRY_SECONDS: the breaker lets a call through again
    answers = _duplicates(redis_workers.url, tokens["refresh_token"], 6)
    assert [a.status_code for a in answers] == [200] * 6
    assert refresh_grants(kc_admin, user.id, expect=1) == 1
