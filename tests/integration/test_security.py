"""The defences of docs/security.md, each against the real broker under gunicorn and the real Keycloak."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.helpers import claims, temp_client

REUSED = {"error": "invalid_grant", "message": "Refresh token was already used; the session has been ended"}
SESSION_ENDED = {"error": "invalid_grant", "message": "Session has ended"}
INVALID_REFRESH = {"error": "invalid_grant", "message": "Invalid refresh token"}
RATE_LIMITED = {"error": "rate_limited", "message": "Too many attempts; try again later"}
WRONG_PASSWORD = {"error": "invalid_grant", "message": "Invalid username or password"}
CSRF = {"X-Requested-With": "fetch"}


def login(url: str, user, **headers: str) -> dict:
    response = requests.post(f"{url}/api/auth/login", json={"username": user.username, "password": user.password},
                             headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["token"]


def refresh(url: str, token: str, user_agent: str, **body: str) -> requests.Response:
    return requests.post(f"{url}/api/auth/refresh-token", json={"refresh_token": token, **body},
                         headers={"User-Agent": user_agent}, timeout=30)


def request_series(url: str) -> dict[tuple[str, str, str], float]:
    """broker_http_requests_total by (route, method, status)."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {
        (s.labels["route"], s.labels["method"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(text) if family.name == "broker_http_requests"
        for s in family.samples if s.name == "broker_http_requests_total"
    }


# --- metrics -------------------------------------------------------------------------------------------------


def test_distinct_methods_do_not_grow_the_metrics(broker_url):
    """200 requests with 200 invented methods add one series (method "other"), not 200."""
    before = request_series(broker_url)
    methods = [f"X{uuid.uuid4().hex[:12].upper().translate(str.maketrans('0123456789', 'GHIJKLMNOP'))}"
               for _ in range(200)]
    statuses = {requests.request(method, f"{broker_url}/health", timeout=10).status_code for method in methods}
    after = request_series(broker_url)
    grown = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    assert statuses == {405}
    assert {key: value for key, value in grown.items() if key[0] != "/metrics"} == {("unmatched", "other", "405"): 200}


# --- password guessing ---------------------------------------------------------------------------------------


def guesses(url: str, username: str, count: int, addresses: list[str] | None = None) -> list[int]:
    """`count` wrong-password logins at once (each from its own X-Forwarded-For address, when given)."""
    barrier = threading.Barrier(count)

    def one(i: int) -> int:
        headers = {"X-Forwarded-For": addresses[i]} if addresses else {}
        barrier.wait()
        return requests.post(f"{url}/api/auth/login", json={"username": username, "password": f"wrong-{i}"},
                             headers=headers, timeout=60).status_code

    with ThreadPoolExecutor(max_workers=count) as pool:
        return sorted(pool.map(one, range(count)))


def test_parallel_wrong_passwords_reach_keycloak_at_most_the_limit(start_broker, make_user):
    """40 wrong passwords at once against a limit of 10: exactly 10 are judged by Keycloak, 30 are refused first."""
    url = start_broker(BROKER_RATE_LIMIT_LOGIN="10 per minute", BROKER_RATE_LIMIT_LOGIN_IP="1000 per minute",
                       BROKER_RATE_LIMIT_LOGIN_USER="1000 per minute")
    assert guesses(url, make_user().username, 40) == [401] * 10 + [429] * 30


def test_one_username_is_limited_across_addresses(start_broker, make_user):
    """Guesses for one user from eight addresses, spelt in three ways: the per-user limit of 5 holds them all."""
    url = start_broker(BROKER_TRUSTED_PROXY_HOPS="1", BROKER_RATE_LIMIT_LOGIN="100 per minute",
                       BROKER_RATE_LIMIT_LOGIN_IP="1000 per minute", BROKER_RATE_LIMIT_LOGIN_USER="5 per minute")
    user = make_user()
    spellings = [user.username, user.username.upper(), f" {user.username} "]
    results = []
    for i in range(8):
        response = requests.post(f"{url}/api/auth/login", timeout=30,
                                 json={"username": spellings[i % 3], "password": "wrong"},
                                 headers={"X-Forwarded-For": f"2001:db8:{i}::1"})
        results.append((response.status_code, response.json()))
    assert results == [(401, WRONG_PASSWORD)] * 5 + [(429, RATE_LIMITED)] * 3
    assert requests.post(f"{url}/api/auth/login", json={"username": user.username, "password": user.password},
                         timeout=30).status_code == 429  # the user's own login waits for the window too


def test_addresses_of_one_ipv6_64_count_as_one_client(start_broker, make_user):
    """Five guesses from five addresses of one /64 share the per-address limit of 3."""
    url = start_broker(BROKER_TRUSTED_PROXY_HOPS="1", BROKER_RATE_LIMIT_LOGIN="3 per minute",
                       BROKER_RATE_LIMIT_LOGIN_IP="1000 per minute", BROKER_RATE_LIMIT_LOGIN_USER="1000 per minute")
    assert guesses(url, make_user().username, 5, [f"2001:db8:5:7::{i + 1:x}" for i in range(5)]) == \
        [401] * 3 + [429] * 2


# --- tokens of other clients ---------------------------------------------------------------------------------


def test_a_token_of_another_client_is_refused_by_default(broker_url, start_broker, keycloak_server, kc_admin,
                                                          make_user):
    """An access token another client of the realm got is not for the broker; accepting it takes '*' on purpose."""
    user = make_user()
    with temp_client(kc_admin, secret="probe-secret") as other:
        response = keycloak_server.token(client_id=other, client_secret="probe-secret", grant_type="password",
                                         username=user.username, password=user.password)
        token = response.json()["access_token"]
    assert claims(token)["azp"] == other
    refused = requests.get(f"{broker_url}/api/auth/verify", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert (refused.status_code, refused.json()) == (
        401, {"error": "invalid_token", "message": "Access token is not meant for this audience"})
    opened = start_broker(BROKER_TOKEN_AUDIENCES="*", BROKER_TOKEN_AUTHORIZED_PARTIES="*")
    accepted = requests.get(f"{opened}/api/auth/verify", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert (accepted.status_code, accepted.headers["X-Auth-Username"]) == (204, user.username)


# --- the grace window ----------------------------------------------------------------------------------------


def test_a_replayed_spent_token_from_another_client_reaches_keycloak(broker_url, make_user):
    """A thief replaying the victim's spent token inside the grace window gets nothing; Keycloak sees the reuse."""
    user = make_user()
    spent = login(broker_url, user, **{"User-Agent": "victim-browser"})["refresh_token"]
    fresh = refresh(broker_url, spent, "victim-browser")
    assert fresh.status_code == 200, fresh.text
    stolen = refresh(broker_url, spent, "thief-tool")
    assert (stolen.status_code, stolen.json()) == (400, REUSED)
    after = refresh(broker_url, fresh.json()["token"]["refresh_token"], "victim-browser")
    assert (after.status_code, after.json()) == (400, SESSION_ENDED)  # Keycloak ended the stolen session


def test_a_retry_from_the_same_client_gets_the_kept_answer(broker_url, make_user):
    """The same browser presenting the token again inside the window gets the same tokens, and the session lives."""
    user = make_user()
    spent = login(broker_url, user, **{"User-Agent": "victim-browser"})["refresh_token"]
    first = refresh(broker_url, spent, "victim-browser")
    again = refresh(broker_url, spent, "victim-browser")
    assert (first.status_code, again.status_code, again.json()) == (200, 200, first.json())
    assert refresh(broker_url, first.json()["token"]["refresh_token"], "victim-browser").status_code == 200


def test_two_scopes_at_once_spend_the_token_once(broker_url, make_user):
    """The token with and without a scope at the same moment: one refresh, one 409, and the session lives on."""
    user = make_user()
    token = login(broker_url, user)["refresh_token"]
    barrier = threading.Barrier(2)

    def one(scope: str | None):
        barrier.wait()
        return refresh(broker_url, token, "one-browser", **({"scope": scope} if scope else {}))

    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(one, [None, "openid email"]))
    assert sorted(a.status_code for a in answers) == [200, 409]
    conflict = next(a for a in answers if a.status_code == 409)
    assert conflict.json() == {
        "error": "refresh_conflict",
        "message": "This refresh token was just refreshed with another scope; use the tokens that refresh returned",
    }
    winner = next(a for a in answers if a.status_code == 200).json()["token"]["refresh_token"]
    assert refresh(broker_url, winner, "one-browser").status_code == 200


# --- cookie mode ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cookie_broker(start_broker) -> str:
    """A broker in cookie mode over plain HTTP (so the cookie has no __Secure- prefix)."""
    return start_broker(BROKER_TOKEN_TRANSPORT="cookie", BROKER_COOKIE_SECURE="false",
                        BROKER_COOKIE_NAME="refresh_token", BROKER_RATE_LIMITS_ENABLED="false")


def test_a_malformed_origin_is_csrf_failed(cookie_broker, make_user):
    """Origin: http://[ is no origin at all: 403 csrf_failed (it was a 500 with a traceback)."""
    user = make_user()
    response = requests.post(f"{cookie_broker}/api/auth/login", timeout=30,
                             json={"username": user.username, "password": user.password},
                             headers={**CSRF, "Origin": "http://["})
    assert (response.status_code, response.json()) == (
        403, {"error": "csrf_failed", "message": "This request needs the CSRF header and an allowed origin"})


def test_two_refresh_cookies_are_refused_and_neither_is_cleared(cookie_broker, make_user):
    """A planted second cookie of the same name: 400, no refresh, and no Set-Cookie that would drop the real one."""
    user = make_user()
    with requests.Session() as browser:
        assert browser.post(f"{cookie_broker}/api/auth/login", headers=CSRF, timeout=30,
                            json={"username": user.username, "password": user.password}).status_code == 200
        real = browser.cookies["refresh_token"]
        response = requests.post(f"{cookie_broker}/api/auth/refresh-token", timeout=30,
                                 headers={**CSRF, "Cookie": f"refresh_token=planted; refresh_token={real}"})
        assert (response.status_code, response.json(), "Set-Cookie" in response.headers) == (400, {
            "error": "invalid_request",
            "message": "The request carries more than one refresh cookie; clear this site's cookies",
        }, False)
        assert browser.post(f"{cookie_broker}/api/auth/refresh-token", headers=CSRF, timeout=30).status_code == 200


# --- logout, headers, sizes ----------------------------------------------------------------------------------


def test_logout_is_rate_limited(start_broker):
    """Logouts per address are limited like refreshes: the fourth of a limit of 3 is 429 and reaches nobody."""
    url = start_broker(BROKER_RATE_LIMIT_LOGOUT="3 per minute")
    answers = [requests.post(f"{url}/api/auth/logout", json={"refresh_token": "garbage"}, timeout=30)
               for _ in range(5)]
    assert [(a.status_code, a.json()) for a in answers] == [(400, INVALID_REFRESH)] * 3 + [(429, RATE_LIMITED)] * 2
    assert 1 <= int(answers[-1].headers["Retry-After"]) <= 61  # the window of a minute, rounded up


def test_role_and_username_headers_are_unambiguous(broker_url, kc_admin, make_user):
    """A role named "admin,superuser" reaches a gateway as one role: commas inside items are percent-encoded."""
    role = f"admin,superuser-{uuid.uuid4().hex[:6]}"
    kc_admin.create_realm_role({"name": role})
    try:
        user = make_user(roles=[role])
        access = login(broker_url, user)["access_token"]
        response = requests.get(f"{broker_url}/api/auth/verify", headers={"Authorization": f"Bearer {access}"},
                                timeout=10)
        items = response.headers["X-Auth-Roles"].split(",")
        assert (response.status_code, [unquote(i) for i in items]) == (
            204, sorted(claims(access)["realm_access"]["roles"]))
        assert role.replace(",", "%2C") in items
    finally:
        kc_admin.delete_realm_role(role)


@pytest.mark.parametrize("path", ["/api/auth/refresh-token", "/api/auth/logout"])
def test_an_oversized_refresh_token_is_invalid_grant(broker_url, path):
    """Keycloak drops form fields over 4,000 characters: both sides of the bound answer invalid_grant."""
    for length in (4000, 4001, 8192):
        response = requests.post(f"{broker_url}{path}", json={"refresh_token": "x" * length}, timeout=30)
        assert (length, response.status_code, response.json()) == (length, 400, INVALID_REFRESH)


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}


@pytest.mark.parametrize(("method", "path"), [("GET", "/health"), ("GET", "/ready"), ("POST", "/api/auth/login"),
                                              ("GET", "/no-such-route"), ("GET", "/api/openapi.json"),
                                              ("GET", "/metrics")])
def test_every_answer_carries_the_security_headers(broker_url, method, path):
    """Successes and failures alike carry the security headers; the server names no version."""
    response = requests.request(method, f"{broker_url}{path}", timeout=10)
    assert {name: response.headers.get(name) for name in SECURITY_HEADERS} == SECURITY_HEADERS
    assert not any(c.isdigit() for c in response.headers.get("Server", ""))


def test_swagger_ui_gets_the_policy_it_needs(broker_url):
    """/api/docs loads its own script and styles, nothing from elsewhere."""
    response = requests.get(f"{broker_url}/api/docs", timeout=10)
    assert (response.status_code, response.headers["Content-Security-Policy"]) == (200, (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"))


@pytest.mark.parametrize(("name", "status"), [("swagger-ui.css", 200), ("swagger-ui-bundle.js", 200),
                                              ("index.html", 404), ("swagger-initializer.js", 404),
                                              ("swagger-ui.js.map", 404), ("../__init__.py", 404)])
def test_only_the_swagger_files_docs_need_are_served(broker_url, name, status):
    """The package's stock page (which loads a third-party demo document) and the rest of its folder are 404."""
    response = requests.get(f"{broker_url}/api/docs/static/{name}", timeout=10)
    assert response.status_code == status
    if status == 404:
        assert response.json() == {"error": "not_found", "message": "No such route"}
