"""Refresh coalescing, cookie mode with its CSRF proof, CORS and rate limits, with Keycloak faked."""

from __future__ import annotations

import gc
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import responses

from app import create_app
from tests.support.keycloak_stub import CONTRACT_TOKENS, KEYCLOAK_TOKENS, LOGOUT_URL, TOKEN_URL, body_of
from tests.support.metrics import changes, samples, series

FRONTEND = "https://app.example.test"


def slow_token_endpoint(keycloak, status: int = 200, body: dict | None = None, delay: float = 0.2) -> list[str]:
    """The token endpoint answers after `delay` seconds; returns the list of refresh tokens it was sent."""
    seen: list[str] = []
    lock = threading.Lock()

    def answer(request):
        with lock:
            seen.append(request.body)
        time.sleep(delay)
        return status, {}, json.dumps(body if body is not None else KEYCLOAK_TOKENS)

    keycloak.mock.add_callback(responses.POST, TOKEN_URL, callback=answer, content_type="application/json")
    return seen


def parallel_refreshes(app, count: int, token: str = "rt-same", scope: str | None = None) -> list[tuple[int, dict]]:
    """`count` refreshes of one token at the same moment, each through its own test client."""
    barrier = threading.Barrier(count)

    def one(_):
        client = app.test_client()
        barrier.wait()
        body = {"refresh_token": token, **({"scope": scope} if scope else {})}
        response = client.post("/api/auth/refresh-token", json=body)
        return response.status_code, body_of(response)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def test_parallel_identical_refreshes_make_one_keycloak_call(app, keycloak):
    """Twenty simultaneous refreshes of one token: one grant at Keycloak, twenty identical 200s."""
    seen = slow_token_endpoint(keycloak)
    results = parallel_refreshes(app, 20)
    assert len(seen) == 1
    assert results == [(200, {"message": "Token refreshed successfully", "token": CONTRACT_TOKENS})] * 20


def test_without_coalescing_every_refresh_reaches_keycloak(settings, keycloak):
    """BROKER_REFRESH_COALESCING=false sends each refresh on its own (the switch the integration test uses)."""
    seen = slow_token_endpoint(keycloak, delay=0.05)
    parallel_refreshes(create_app(replace(settings, refresh_coalescing=False)), 8)
    assert len(seen) == 8


def test_a_refused_coalesced_refresh_is_shared(app, keycloak):
    """When the one grant is refused, every caller gets the same 400 invalid_grant."""
    seen = slow_token_endpoint(keycloak, status=400,
                               body={"error": "invalid_grant", "error_description": "Token is not active"})
    results = parallel_refreshes(app, 10)
    assert len(seen) == 1
    assert results == [(400, {"error": "invalid_grant", "message": "Refresh token expired"})] * 10


def test_the_same_token_with_another_scope_spends_nothing(app, keycloak):
    """A second scope for a token just refreshed is a 409 that never reaches Keycloak (it would be a reuse)."""
    seen = slow_token_endpoint(keycloak, delay=0.01)
    client = app.test_client()
    first = client.post("/api/auth/refresh-token", json={"refresh_token": "rt"})
    second = client.post("/api/auth/refresh-token", json={"refresh_token": "rt", "scope": "openid"})
    assert (first.status_code, second.status_code, body_of(second), len(seen)) == (200, 409, {
        "error": "refresh_conflict",
        "message": "This refresh token was just refreshed with another scope; use the tokens that refresh returned",
    }, 1)


def test_a_late_duplicate_within_the_grace_window_gets_the_same_tokens(settings, keycloak):
    """A duplicate arriving after the grant finished but within the grace window is answered from it."""
    seen = slow_token_endpoint(keycloak, delay=0.0)
    client = create_app(replace(settings, refresh_grace_seconds=0.3)).test_client()
    first = client.post("/api/auth/refresh-token", json={"refresh_token": "rt"})
    second = client.post("/api/auth/refresh-token", json={"refresh_token": "rt"})
    time.sleep(0.4)
    client.post("/api/auth/refresh-token", json={"refresh_token": "rt"})
    assert body_of(first) == body_of(second)
    assert len(seen) == 2


def test_coalesced_refreshes_are_counted(app, keycloak):
    """/metrics tells coalesced refreshes from upstream ones: five identical refreshes, one grant, four joined it."""
    slow_token_endpoint(keycloak, delay=0.1)
    before = samples(app.test_client())
    parallel_refreshes(app, 5, token="rt-metrics")
    after = samples(app.test_client())
    upstream, coalesced = series("broker_refreshes_total", kind="upstream"), series("broker_refreshes_total", kind="coalesced")
    assert changes(before, after, upstream, coalesced) == {upstream: 1, coalesced: 4}


# --- cookie mode ---------------------------------------------------------------------------------------------

COOKIE = "__Secure-refresh_token"
CSRF = {"X-Requested-With": "fetch"}


@pytest.fixture
def cookie_app(settings, keycloak):
    """A broker in cookie mode with one allowed frontend origin."""
    return create_app(replace(settings, token_transport="cookie", cors_origins=frozenset({FRONTEND})))


def set_cookie_header(response) -> str:
    (header,) = response.headers.getlist("Set-Cookie")
    return header


def test_cookie_login_sets_the_cookie_and_keeps_the_token_out_of_json(cookie_app, keycloak):
    """Login in cookie mode: HttpOnly, Secure, SameSite=Strict cookie on /api/auth; no refresh_token in JSON."""
    keycloak.issues_tokens()
    response = cookie_app.test_client().post("/api/auth/login", json={"username": "alice", "password": "pw"},
                                             headers=CSRF)
    expected = {k: v for k, v in CONTRACT_TOKENS.items() if k != "refresh_token"}
    assert (response.status_code, body_of(response)) == (200, {"message": "Login successful", "token": expected})
    cookie = set_cookie_header(response)
    for attribute in ("Secure", "HttpOnly", "Max-Age=1800", "Path=/api/auth", "SameSite=Strict"):
        assert attribute in cookie.split("; ")
    assert cookie.startswith(f"{COOKIE}=refresh.token.value;")


def test_cookie_refresh_reads_the_cookie_and_rotates_it(cookie_app, keycloak):
    """Refresh with only the cookie (and the CSRF header) posts the cookie's token and sets the new one."""
    keycloak.issues_tokens({**KEYCLOAK_TOKENS, "refresh_token": "rotated.refresh"})
    client = cookie_app.test_client()
    client.set_cookie(COOKIE, "from.the.cookie", path="/api/auth")
    response = client.post("/api/auth/refresh-token", headers=CSRF)
    assert response.status_code == 200 and "refresh_token" not in body_of(response)["token"]
    assert keycloak.token_calls()[0]["refresh_token"] == "from.the.cookie"
    assert set_cookie_header(response).startswith(f"{COOKIE}=rotated.refresh;")


@pytest.mark.parametrize(
    ("headers", "why"),
    [({}, "no CSRF header"), ({"X-Requested-With": "  "}, "blank CSRF header"),
     ({**CSRF, "Origin": "https://evil.example.test"}, "unlisted origin")],
)
def test_cookie_requests_without_the_csrf_proof_are_403(cookie_app, keycloak, headers, why):
    """A cookie-authenticated refresh or logout without the CSRF proof is 403 csrf_failed, Keycloak untouched."""
    client = cookie_app.test_client()
    client.set_cookie(COOKIE, "from.the.cookie", path="/api/auth")
    for path in ("/api/auth/refresh-token", "/api/auth/logout"):
        response = client.post(path, headers=headers)
        assert (response.status_code, body_of(response)) == (
            403,
            {"error": "csrf_failed", "message": "This request needs the CSRF header and an allowed origin"},
        ), why
    assert keycloak.token_calls() == []


def test_the_listed_origin_and_same_origin_pass_the_csrf_check(cookie_app, keycloak):
    """An Origin on the allowlist, or the broker's own, passes."""
    keycloak.issues_tokens()
    client = cookie_app.test_client()
    client.set_cookie(COOKIE, "c", path="/api/auth")
    for origin in (FRONTEND, "http://localhost"):
        assert client.post("/api/auth/refresh-token", headers={**CSRF, "Origin": origin}).status_code == 200


def test_cookie_login_needs_the_csrf_header_too(cookie_app, keycloak):
    """In cookie mode a login without the CSRF header is 403: a cross-site form must not plant a session."""
    response = cookie_app.test_client().post("/api/auth/login", data={"username": "alice", "password": "pw"})
    assert response.status_code == 403


def test_cookie_logout_clears_the_cookie(cookie_app, keycloak):
    """Logout ends the session and expires the cookie."""
    keycloak.logs_out()
    client = cookie_app.test_client()
    client.set_cookie(COOKIE, "c", path="/api/auth")
    response = client.post("/api/auth/logout", headers=CSRF)
    assert (response.status_code, body_of(response)) == (200, {"message": "Logged out successfully"})
    assert keycloak.token_calls(LOGOUT_URL)[0]["refresh_token"] == "c"
    assert set_cookie_header(response).startswith(f'{COOKIE}=; Expires=Thu, 01 Jan 1970')


def test_a_dead_cookie_is_cleared_when_keycloak_refuses_it(cookie_app, keycloak):
    """Refresh with a cookie Keycloak refuses: 400 invalid_grant, and the cookie is expired."""
    keycloak.refuses(400, "invalid_grant", "Session not active")
    client = cookie_app.test_client()
    client.set_cookie(COOKIE, "dead", path="/api/auth")
    response = client.post("/api/auth/refresh-token", headers=CSRF)
    assert (response.status_code, body_of(response)) == (400, {"error": "invalid_grant", "message": "Session has ended"})
    assert set_cookie_header(response).startswith(f"{COOKIE}=;")


@pytest.mark.parametrize("path", ["/api/auth/refresh-token", "/api/auth/logout"])
def test_a_body_token_in_cookie_mode_needs_the_csrf_proof_too(cookie_app, keycloak, path):
    """A cross-site form posting its own token must not set or clear the victim's cookie: 403, no Set-Cookie."""
    keycloak.issues_tokens()
    keycloak.logs_out()
    client = cookie_app.test_client()
    refused = client.post(path, data={"refresh_token": "attacker-token"}, headers={"Origin": "https://evil.example.test"})
    assert (refused.status_code, refused.headers.getlist("Set-Cookie")) == (403, [])
    assert client.post(path, json={"refresh_token": "in-body"}, headers=CSRF).status_code == 200
    assert keycloak.token_calls() + keycloak.token_calls(LOGOUT_URL) != []


def test_no_cookie_and_no_body_token_is_refresh_token_required(cookie_app, keycloak):
    """Cookie mode without a cookie or body token: 400 refresh_token_required."""
    response = cookie_app.test_client().post("/api/auth/refresh-token", headers=CSRF)
    assert (response.status_code, body_of(response)) == (
        400, {"error": "refresh_token_required", "message": "Refresh token is required"})


# --- CORS ----------------------------------------------------------------------------------------------------


def test_a_listed_origin_gets_a_credentialed_cors_grant(cookie_app):
    """A preflight from the listed frontend is answered with its origin (never '*') and credentials allowed."""
    response = cookie_app.test_client().options("/api/auth/refresh-token", headers={
        "Origin": FRONTEND, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-requested-with"})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == FRONTEND
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert "x-requested-with" in response.headers["Access-Control-Allow-Headers"].lower()


def test_an_unlisted_origin_gets_no_cors_grant(cookie_app, keycloak):
    """A request or preflight from any other origin gets no Access-Control-Allow-* header."""
    client = cookie_app.test_client()
    preflight = client.options("/api/auth/refresh-token", headers={
        "Origin": "https://evil.example.test", "Access-Control-Request-Method": "POST"})
    keycloak.issues_tokens()
    actual = client.post("/api/auth/refresh-token", json={"refresh_token": "x"},
                         headers={"Origin": "https://evil.example.test"})
    for response in (preflight, actual):
        assert not [h for h in response.headers.keys() if h.startswith("Access-Control-Allow")]


@pytest.mark.parametrize("origin", [f"{FRONTEND}.attacker.net", f"{FRONTEND}:8443", "https://xapp.example.test",
                                    "http://app.example.test"])
def test_an_origin_that_merely_starts_or_ends_like_the_listed_one_gets_no_grant(cookie_app, origin):
    """The allowlist is matched exactly (anchored), never as a prefix or a pattern."""
    response = cookie_app.test_client().options("/api/auth/refresh-token", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST"})
    assert not [h for h in response.headers.keys() if h.startswith("Access-Control-Allow")]


def test_an_ipv6_literal_origin_is_matched_exactly(settings, keycloak):
    """Brackets are no pattern: http://[::1]:3000 is granted, http://1:3000 is not."""
    client = create_app(replace(settings, cors_origins=frozenset({"http://[::1]:3000"}))).test_client()
    granted = client.options("/api/auth/login", headers={"Origin": "http://[::1]:3000",
                                                         "Access-Control-Request-Method": "POST"})
    refused = client.options("/api/auth/login", headers={"Origin": "http://1:3000",
                                                         "Access-Control-Request-Method": "POST"})
    assert (granted.headers.get("Access-Control-Allow-Origin"), refused.headers.get("Access-Control-Allow-Origin")) \
        == ("http://[::1]:3000", None)


def test_an_oversized_cookie_is_refused_and_dropped(cookie_app, keycloak):
    """A cookie too long to be a refresh token of the realm: invalid_grant, and the answer clears the cookie."""
    client = cookie_app.test_client()
    client.set_cookie(COOKIE, "x" * 4001, path="/api/auth")
    response = client.post("/api/auth/refresh-token", headers=CSRF)
    assert (response.status_code, body_of(response)) == (400, {"error": "invalid_grant",
                                                               "message": "Invalid refresh token"})
    assert set_cookie_header(response).startswith(f"{COOKIE}=;")
    assert keycloak.token_calls() == []


def test_cors_is_off_without_an_allowlist(client):
    """With no BROKER_CORS_ORIGINS the broker sends no CORS headers at all."""
    response = client.options("/api/auth/login", headers={"Origin": FRONTEND, "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in response.headers


# --- rate limits ---------------------------------------------------------------------------------------------


@pytest.fixture
def limited(settings, keycloak):
    """A broker with small limits: 3 refused logins per user, 5 logins and 4 refreshes per address, per minute."""
    return create_app(replace(settings, rate_limit_login="3 per minute", rate_limit_login_ip="5 per minute",
                              rate_limit_refresh="4 per minute")).test_client()


RATE_LIMITED = {"error": "rate_limited", "message": "Too many attempts; try again later"}


def test_a_broker_without_rate_limits_serves_logins_after_a_garbage_collection(settings, keycloak):
    """BROKER_RATE_LIMITS_ENABLED=false: the app still holds its (disabled) limiter, whose views refer to it weakly."""
    keycloak.issues_tokens()
    client = create_app(replace(settings, rate_limits_enabled=False)).test_client()
    gc.collect()
    response = client.post("/api/auth/login", json={"username": "alice", "password": "pw"})
    assert (response.status_code, body_of(response)) == (
        200, {"message": "Login successful", "token": CONTRACT_TOKENS})


def test_refused_logins_of_one_user_trip_the_per_user_limit(limited, keycloak):
    """The fourth refused login for one username within the window is 429 with Retry-After; Keycloak not asked."""
    keycloak.refuses(400, "invalid_grant", "Invalid user credentials")
    statuses = [limited.post("/api/auth/login", json={"username": "Alice", "password": "x"}).status_code
                for _ in range(3)]
    response = limited.post("/api/auth/login", json={"username": "alice ", "password": "x"})
    assert statuses == [401, 401, 401]
    assert (response.status_code, body_of(response)) == (429, RATE_LIMITED)
    assert 1 <= int(response.headers["Retry-After"]) <= 61
    assert response.headers["X-Request-ID"] and response.headers["Cache-Control"] == "no-store"
    assert len(keycloak.token_calls()) == 3


def test_successful_logins_do_not_count_against_the_user(limited, keycloak):
    """Only refused logins count per user: four good ones pass (the per-address limit is 5)."""
    keycloak.issues_tokens()
    assert [limited.post("/api/auth/login", json={"username": "bob", "password": "pw"}).status_code
            for _ in range(4)] == [200] * 4


def test_logins_from_one_address_trip_the_per_address_limit(limited, keycloak):
    """Logins for many usernames from one address: the sixth is 429."""
    keycloak.issues_tokens()
    statuses = [limited.post("/api/auth/login", json={"username": f"user{i}", "password": "pw"}).status_code
                for i in range(6)]
    assert statuses == [200] * 5 + [429]


def test_refreshes_from_one_address_trip_the_refresh_limit(limited, keycloak):
    """The fifth refresh from one address within the window is 429."""
    keycloak.issues_tokens()
    statuses = [limited.post("/api/auth/refresh-token", json={"refresh_token": f"t{i}"}).status_code
                for i in range(5)]
    assert statuses == [200] * 4 + [429]


def test_the_forwarded_address_counts_only_through_trusted_hops(settings, keycloak):
    """With one trusted proxy hop, clients behind it are limited apart; without it, X-Forwarded-For is ignored."""
    keycloak.issues_tokens()
    tight = replace(settings, rate_limit_refresh="1 per minute")
    for hops, expected in ((1, [200, 200]), (0, [200, 429])):
        client = create_app(replace(tight, trusted_proxy_hops=hops)).test_client()
        statuses = [client.post("/api/auth/refresh-token", json={"refresh_token": "t"},
                                headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code for i in (1, 2)]
        assert statuses == expected, hops


def test_an_offline_token_cookie_lives_with_the_browser_session(cookie_app, keycloak):
    """refresh_expires_in 0 (an offline token) sets a cookie without Max-Age, not one that is deleted at once."""
    keycloak.issues_tokens({**KEYCLOAK_TOKENS, "refresh_expires_in": 0})
    response = cookie_app.test_client().post("/api/auth/login", headers=CSRF,
                                              json={"username": "alice", "password": "pw", "scope": "openid offline_access"})
    cookie = set_cookie_header(response)
    assert cookie.startswith(f"{COOKIE}=refresh.token.value;")
    assert "Max-Age" not in cookie and "Expires" not in cookie
