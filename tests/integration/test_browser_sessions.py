"""Refresh coalescing, cookie mode and rate limits against the real Keycloak (rotation on) and a real Redis."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

PARALLEL = 20


def login(url: str, user) -> dict:
    response = requests.post(f"{url}/api/auth/login", json={"username": user.username, "password": user.password},
                             timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["token"]


def parallel_refreshes(url: str, refresh_token: str, count: int = PARALLEL) -> list[requests.Response]:
    """`count` refreshes of one token released at the same moment, each on its own connection."""
    barrier = threading.Barrier(count)

    def one(_):
        with requests.Session() as http:
            barrier.wait()
            return http.post(f"{url}/api/auth/refresh-token", json={"refresh_token": refresh_token}, timeout=60)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def grants_seen_by_keycloak(kc_admin, since_ms: int) -> dict[str, int]:
    """Refresh grants Keycloak recorded in its event store since `since_ms`, by outcome.

    Refused refreshes carry no user id in Keycloak's events, so they are counted by time; the tests of
    this module run one after another, so nothing else refreshes meanwhile.
    """
    counts = {"REFRESH_TOKEN": 0, "REFRESH_TOKEN_ERROR": 0}
    for event in kc_admin.get_events(query={"type": list(counts), "max": 10000}):
        if event["type"] in counts and event["time"] >= since_ms:
            counts[event["type"]] += 1
    return counts


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture(scope="module")
def one_worker(start_broker) -> str:
    """A broker with one gunicorn worker (coalescing in process only)."""
    return start_broker(BROKER_WORKERS="1")


@pytest.fixture(scope="module")
def one_worker_uncoalesced(start_broker) -> str:
    """The same broker with coalescing switched off: the failure the feature exists for."""
    return start_broker(BROKER_WORKERS="1", BROKER_REFRESH_COALESCING="false")


@pytest.fixture(scope="module")
def workers_with_redis(start_broker, redis_url) -> str:
    """A broker with three gunicorn workers that coalesce through Redis."""
    return start_broker(BROKER_WORKERS="3", BROKER_REDIS_URL=redis_url)


@pytest.mark.parametrize("broker", ["one_worker", "workers_with_redis"])
def test_parallel_refreshes_of_one_token_make_one_grant(request, broker, make_user, kc_admin):
    """Twenty parallel refreshes of one token: all 200 with identical tokens, one grant, and the session lives on."""
    url = request.getfixturevalue(broker)
    user = make_user()
    tokens = login(url, user)
    started = now_ms()
    responses = parallel_refreshes(url, tokens["refresh_token"])
    assert [r.status_code for r in responses] == [200] * PARALLEL
    assert len({r.text for r in responses}) == 1
    assert grants_seen_by_keycloak(kc_admin, started) == {"REFRESH_TOKEN": 1, "REFRESH_TOKEN_ERROR": 0}
    newest = responses[0].json()["token"]["refresh_token"]
    follow_up = requests.post(f"{url}/api/auth/refresh-token", json={"refresh_token": newest}, timeout=30)
    assert follow_up.status_code == 200


def test_without_coalescing_parallel_refreshes_end_the_session(one_worker_uncoalesced, make_user, kc_admin):
    """The same twenty refreshes with coalescing off: Keycloak sees many grants, refuses the reuse, ends the session."""
    url = one_worker_uncoalesced
    user = make_user()
    tokens = login(url, user)
    started = now_ms()
    responses = parallel_refreshes(url, tokens["refresh_token"])
    statuses = [r.status_code for r in responses]
    assert statuses.count(400) >= 1
    assert all(r.json()["error"] == "invalid_grant" for r in responses if r.status_code == 400)
    seen = grants_seen_by_keycloak(kc_admin, started)
    assert seen["REFRESH_TOKEN"] + seen["REFRESH_TOKEN_ERROR"] == PARALLEL
    winners = [r.json()["token"]["refresh_token"] for r in responses if r.status_code == 200]
    for newest in winners:
        after = requests.post(f"{url}/api/auth/refresh-token", json={"refresh_token": newest}, timeout=30)
        assert (after.status_code, after.json()["error"]) == (400, "invalid_grant")


# --- cookie mode ---------------------------------------------------------------------------------------------

FRONTEND = "http://frontend.example.test"


@pytest.fixture(scope="module")
def cookie_broker(start_broker) -> str:
    """A broker in cookie mode over plain HTTP (Secure off, so a non-prefixed cookie name) with one frontend origin."""
    return start_broker(BROKER_TOKEN_TRANSPORT="cookie", BROKER_COOKIE_SECURE="false", BROKER_COOKIE_NAME="refresh",
                        BROKER_CORS_ORIGINS=FRONTEND)


def test_cookie_mode_full_cycle_with_a_cookie_jar(cookie_broker):
    """Login → refresh → logout driven by a cookie jar; the refresh token never appears in a JSON body."""
    browser = requests.Session()
    browser.headers.update({"X-Requested-With": "fetch", "Origin": FRONTEND})
    logged_in = browser.post(f"{cookie_broker}/api/auth/login",
                             json={"username": "alice", "password": "alice-password"}, timeout=30)
    assert logged_in.status_code == 200 and "refresh_token" not in logged_in.json()["token"]
    first_cookie = browser.cookies.get("refresh", path="/api/auth")
    assert first_cookie and "HttpOnly" in logged_in.headers["Set-Cookie"]

    refreshed = browser.post(f"{cookie_broker}/api/auth/refresh-token", timeout=30)
    assert refreshed.status_code == 200 and "refresh_token" not in refreshed.text
    assert browser.cookies.get("refresh", path="/api/auth") not in (None, first_cookie)

    no_csrf = requests.post(f"{cookie_broker}/api/auth/refresh-token",
                            cookies={"refresh": browser.cookies.get("refresh", path="/api/auth")}, timeout=30)
    assert (no_csrf.status_code, no_csrf.json()["error"]) == (403, "csrf_failed")

    logged_out = browser.post(f"{cookie_broker}/api/auth/logout", timeout=30)
    assert (logged_out.status_code, logged_out.json()) == (200, {"message": "Logged out successfully"})
    assert browser.cookies.get("refresh", path="/api/auth") is None
    again = browser.post(f"{cookie_broker}/api/auth/refresh-token", timeout=30)
    assert (again.status_code, again.json()["error"]) == (400, "refresh_token_required")


def test_an_unlisted_origin_gets_no_cors_grant(cookie_broker):
    """A preflight from an unlisted origin gets no Access-Control-Allow-Origin; the listed one does."""
    def preflight(origin):
        return requests.options(f"{cookie_broker}/api/auth/refresh-token", timeout=10, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-requested-with"})

    assert "Access-Control-Allow-Origin" not in preflight("http://evil.example.test").headers
    granted = preflight(FRONTEND).headers
    assert (granted["Access-Control-Allow-Origin"], granted["Access-Control-Allow-Credentials"]) == (FRONTEND, "true")


# --- rate limits ---------------------------------------------------------------------------------------------


def test_rate_limits_are_shared_across_workers_with_redis(start_broker, redis_url):
    """Three workers sharing Redis counters: the sixth refresh from one address within the window is 429."""
    url = start_broker(BROKER_WORKERS="3", BROKER_REDIS_URL=redis_url, BROKER_RATE_LIMIT_REFRESH="5 per minute")
    statuses = [requests.post(f"{url}/api/auth/refresh-token", json={"refresh_token": f"garbage-{i}"},
                              timeout=30).status_code for i in range(6)]
    assert statuses == [400] * 5 + [429]


def test_rate_limits_reset_after_the_window(start_broker):
    """A limit of 2 per 2 seconds trips on the third refresh and lets requests through again after the window."""
    url = start_broker(BROKER_WORKERS="1", BROKER_RATE_LIMIT_REFRESH="2 per 2 seconds")
    post = lambda: requests.post(f"{url}/api/auth/refresh-token", json={"refresh_token": "garbage"}, timeout=30)  # noqa: E731
    first = [post().status_code for _ in range(3)]
    time.sleep(2.2)
    assert (first, post().status_code) == ([400, 400, 429], 400)
