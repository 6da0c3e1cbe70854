"""The broker under gunicorn against the real Keycloak: login, refresh, rotation, logout, refusals."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.integration.helpers import claims

TOKEN_KEYS = {"access_token", "refresh_token", "expires_in", "refresh_expires_in", "token_type", "scope", "id_token"}
INVALID_CREDENTIALS = {"error": "invalid_grant", "message": "Invalid username or password"}
REQUIRED = {"error": "refresh_token_required", "message": "Refresh token is required"}
SESSION_ENDED = {"error": "invalid_grant", "message": "Session has ended"}
INVALID_REFRESH = {"error": "invalid_grant", "message": "Invalid refresh token"}
GRACE = 1.2  # past the session broker's BROKER_REFRESH_GRACE_SECONDS=1, after which a replay reaches Keycloak
REUSED = {"error": "invalid_grant", "message": "Refresh token was already used; the session has been ended"}


class Broker:
    """A tiny client of the running broker."""

    def __init__(self, url: str):
        self.url = url
        self.http = requests.Session()

    def post(self, path: str, **kwargs) -> requests.Response:
        return self.http.post(self.url + path, timeout=30, **kwargs)

    def login(self, username: str, password: str) -> requests.Response:
        return self.post("/api/auth/login", json={"username": username, "password": password})

    def tokens(self, username: str, password: str) -> dict:
        response = self.login(username, password)
        assert response.status_code == 200, response.text
        return response.json()["token"]

    def refresh(self, refresh_token: str) -> requests.Response:
        return self.post("/api/auth/refresh-token", json={"refresh_token": refresh_token})

    def logout(self, refresh_token: str) -> requests.Response:
        return self.post("/api/auth/logout", json={"refresh_token": refresh_token})


@pytest.fixture
def broker(broker_url: str) -> Broker:
    """A client of the broker running under gunicorn in front of the test Keycloak."""
    return Broker(broker_url)


def outcome(response: requests.Response) -> tuple[int, dict]:
    return response.status_code, response.json()


def test_login_returns_the_contract_token_object(broker):
    """alice logs in: 200, the message, exactly the contract's token fields, and no caching."""
    response = broker.login("alice", "alice-password")
    body = response.json()
    assert response.status_code == 200
    assert sorted(body) == ["message", "token"] and body["message"] == "Login successful"
    token = body["token"]
    assert set(token) == TOKEN_KEYS
    assert token["token_type"] == "Bearer"
    # Keycloak counts the refresh lifetime from the session's last refresh, in whole seconds: 1799 happens.
    assert (token["expires_in"], 1795 <= token["refresh_expires_in"] <= 1800) == (300, True)
    assert sorted(token["scope"].split()) == ["email", "openid", "profile"]
    assert claims(token["access_token"])["preferred_username"] == "alice"
    assert claims(token["id_token"])["email"] == "alice@example.com"
    assert (response.headers["Cache-Control"], response.headers["Pragma"]) == ("no-store", "no-cache")
    assert response.headers["X-Request-ID"]


def test_bob_has_both_realm_roles(broker):
    """The shipped realm gives bob the user and admin roles."""
    roles = claims(broker.tokens("bob", "bob-password")["access_token"])["realm_access"]["roles"]
    assert {"user", "admin"} <= set(roles)


def test_refresh_rotates_and_the_old_token_is_refused(broker):
    """A refresh answers new tokens; presenting the spent refresh token again is refused as reuse."""
    first = broker.tokens("alice", "alice-password")
    refreshed = broker.refresh(first["refresh_token"])
    assert refreshed.status_code == 200
    assert refreshed.json()["message"] == "Token refreshed successfully"
    assert set(refreshed.json()["token"]) == TOKEN_KEYS
    assert refreshed.json()["token"]["refresh_token"] != first["refresh_token"]
    time.sleep(GRACE)
    assert outcome(broker.refresh(first["refresh_token"])) == (400, REUSED)


def test_reuse_ends_the_session_for_the_newest_token_too(broker):
    """After a reuse Keycloak ends the session: the rotated-in token no longer refreshes either."""
    first = broker.tokens("alice", "alice-password")
    newest = broker.refresh(first["refresh_token"]).json()["token"]["refresh_token"]
    time.sleep(GRACE)
    broker.refresh(first["refresh_token"])
    assert outcome(broker.refresh(newest)) == (400, SESSION_ENDED)


def test_a_replay_within_the_grace_window_gets_the_same_tokens(broker):
    """Presenting a just-spent refresh token again within the grace window answers the same new tokens."""
    first = broker.tokens("alice", "alice-password")
    refreshed = broker.refresh(first["refresh_token"])
    replayed = broker.refresh(first["refresh_token"])
    assert (replayed.status_code, replayed.json()) == (200, refreshed.json())
    assert broker.refresh(refreshed.json()["token"]["refresh_token"]).status_code == 200


def test_logout_ends_the_session_and_is_idempotent(broker):
    """Logout answers 200; the session's refresh token is then refused; a second logout is 200 too."""
    tokens = broker.tokens("alice", "alice-password")
    newest = broker.refresh(tokens["refresh_token"]).json()["token"]["refresh_token"]
    assert outcome(broker.logout(newest)) == (200, {"message": "Logged out successfully"})
    assert outcome(broker.refresh(newest)) == (400, SESSION_ENDED)
    assert outcome(broker.logout(newest)) == (200, {"message": "Logged out successfully"})


def test_logout_of_one_session_leaves_the_others(broker):
    """A refresh token of a logged-out session is refused while another session of the user lives on."""
    ended = broker.tokens("alice", "alice-password")
    alive = broker.tokens("alice", "alice-password")
    assert broker.logout(ended["refresh_token"]).status_code == 200
    assert outcome(broker.refresh(ended["refresh_token"])) == (400, SESSION_ENDED)
    assert broker.refresh(alive["refresh_token"]).status_code == 200


def test_wrong_password_is_401(broker, make_user):
    """A wrong password answers 401 invalid_grant."""
    user = make_user()
    assert outcome(broker.login(user.username, "not-the-password")) == (401, INVALID_CREDENTIALS)


def test_unknown_user_is_401_like_a_wrong_password(broker):
    """An unknown user is indistinguishable from a wrong password."""
    assert outcome(broker.login("nobody-by-this-name", "whatever")) == (401, INVALID_CREDENTIALS)


def test_disabled_user_is_401(broker, make_user):
    """A disabled account answers 401 with a message that says so."""
    user = make_user(enabled=False)
    assert outcome(broker.login(user.username, user.password)) == (
        401,
        {"error": "invalid_grant", "message": "Account is disabled"},
    )


def test_user_with_a_required_action_is_401(broker, make_user):
    """An account with a pending required action cannot use the password grant; the answer says what to do."""
    user = make_user(required_actions=["UPDATE_PASSWORD"])
    assert outcome(broker.login(user.username, user.password)) == (
        401,
        {"error": "account_setup_required",
         "message": "Account is not fully set up: choose a new password in the account console, then log in again"},
    )


def test_an_unknown_scope_is_400_invalid_scope(broker):
    """A scope the client may not have answers 400 invalid_scope."""
    response = broker.post("/api/auth/login", json={"username": "alice", "password": "alice-password",
                                                      "scope": "openid no-such-scope"})
    assert outcome(response) == (
        400,
        {"error": "invalid_scope", "message": "The requested scope is not allowed for this client"},
    )


@pytest.mark.parametrize("garbage", ["garbage", "a.b.c", "eyJhbGciOiJIUzUxMiJ9.eyJ0eXAiOiJSZWZyZXNoIn0.AAAA"])
def test_garbage_refresh_tokens_are_refused(broker, garbage):
    """Strings that are not Keycloak refresh tokens answer 400 invalid_grant."""
    assert outcome(broker.refresh(garbage)) == (400, INVALID_REFRESH)


@pytest.mark.parametrize("kind", ["access_token", "id_token"])
def test_other_tokens_offered_as_refresh_tokens_are_refused(broker, kind):
    """An access or ID token posted as refresh_token answers 400 invalid_grant."""
    tokens = broker.tokens("alice", "alice-password")
    assert outcome(broker.refresh(tokens[kind])) == (400, INVALID_REFRESH)


def test_missing_refresh_token_never_reaches_keycloak(broker):
    """An empty refresh body answers 400 refresh_token_required."""
    assert outcome(broker.post("/api/auth/refresh-token", json={})) == (400, REQUIRED)


def test_form_encoded_refresh_works_like_json(broker):
    """`curl -d refresh_token=...` refreshes."""
    tokens = broker.tokens("alice", "alice-password")
    response = broker.post("/api/auth/refresh-token", data={"refresh_token": tokens["refresh_token"]})
    assert response.status_code == 200


def test_a_chunked_body_over_the_limit_is_413(broker):
    """A body sent without Content-Length is cut off at the limit by the real server stack."""

    def chunks():
        yield b'{"refresh_token": "'
        for _ in range(40):
            yield b"x" * 1024
        yield b'"}'

    response = broker.post("/api/auth/refresh-token", data=chunks(), headers={"Content-Type": "application/json"})
    assert outcome(response) == (413, {"error": "payload_too_large", "message": "The request body is too large"})


def test_concurrent_logins_of_different_users_each_get_their_own_tokens(broker, make_user):
    """Logins of many users at once through the threaded workers never mix up tokens.

    Each round logs every user in once, all at the same time. (Keycloak's brute-force detector refuses
    concurrent logins of one and the same user, so a user never logs in twice at once here; see
    test_concurrent_logins_of_one_user_trip_brute_force_detection.)
    """
    users = [("alice", "alice-password"), ("bob", "bob-password")]
    users += [(u.username, u.password) for u in (make_user() for _ in range(8))]

    def login(user):
        tokens = Broker(broker.url).tokens(*user)
        return user[0], claims(tokens["access_token"])["preferred_username"], claims(tokens["id_token"])

    results = []
    with ThreadPoolExecutor(max_workers=len(users)) as pool:
        for round_ in range(3):
            random.Random(round_).shuffle(users)
            results += list(pool.map(login, users))
    assert len(results) == 3 * len(users)
    for username, token_user, id_claims in results:
        assert (token_user, id_claims["preferred_username"]) == (username, username)


def test_concurrent_logins_of_one_user_trip_brute_force_detection(broker, make_user):
    """Keycloak refuses most of several simultaneous correct logins of one user; later ones succeed again.

    Keycloak's brute-force protection treats parallel logins of one user as an attack and answers
    "Invalid user credentials" (its event says user_temporarily_disabled). This pins that behaviour
    (documented in docs/errors.md) so an upgrade that changes it is noticed.
    """
    user = make_user()
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda _: Broker(broker.url).login(user.username, user.password).status_code,
                                 range(8)))
    assert sorted(set(statuses)) in ([200, 401], [401])
    assert statuses.count(401) >= 1
    assert Broker(broker.url).login(user.username, user.password).status_code == 200


def test_a_refresh_after_the_realm_revoked_older_tokens_is_refused(broker, kc_admin, keycloak_server):
    """Tokens issued before the realm's not-before ("Revocation: set to now") answer "Session has ended"."""
    tokens = broker.tokens("alice", "alice-password")
    time.sleep(1.1)  # not-before has one-second resolution
    kc_admin.update_realm(keycloak_server.realm, {"notBefore": int(time.time())})
    try:
        assert outcome(broker.refresh(tokens["refresh_token"])) == (400, SESSION_ENDED)
    finally:
        kc_admin.update_realm(keycloak_server.realm, {"notBefore": 0})


def test_a_user_disabled_after_login_cannot_refresh(broker, kc_admin, make_user):
    """Disabling a logged-in user makes refresh answer "Account is disabled"."""
    user = make_user()
    tokens = broker.tokens(user.username, user.password)
    kc_admin.update_user(user.id, {"enabled": False})
    assert outcome(broker.refresh(tokens["refresh_token"])) == (
        400,
        {"error": "invalid_grant", "message": "Account is disabled"},
    )


def test_a_scope_the_client_may_not_have_is_refused_on_refresh(broker):
    """Asking for an unknown scope on refresh answers 400 invalid_scope."""
    tokens = broker.tokens("alice", "alice-password")
    response = broker.post("/api/auth/refresh-token", json={"refresh_token": tokens["refresh_token"],
                                                             "scope": "openid no-such-scope"})
    assert outcome(response) == (
        400,
        {"error": "invalid_scope", "message": "The requested scope is not allowed for this client"},
    )


@pytest.mark.parametrize("garbage", ["garbage", "a.b.c"])
def test_logout_with_a_garbage_token_is_refused(broker, garbage):
    """Logout with a string that is no refresh token answers 400 invalid_grant."""
    assert outcome(broker.logout(garbage)) == (400, INVALID_REFRESH)


def test_the_broker_log_is_json_and_holds_no_secret(broker, broker_log):
    """Under gunicorn every log line is JSON, one access line per request, and marker secrets never appear."""
    password, refresh_token, bearer_token = "pw-MARKER-1d2c", "rt-MARKER-3e4f", "at-MARKER-5a6b"
    broker.post("/api/auth/login", json={"username": "alice", "password": password}, headers={"X-Request-ID": "rid-m1"})
    broker.post("/api/auth/refresh-token?refresh_token=qs-MARKER-7c8d", data={"refresh_token": refresh_token},
                headers={"Cookie": "session=ck-MARKER-9e0f"})
    broker.http.get(broker.url + "/api/auth/verify", headers={"Authorization": f"Bearer {bearer_token}"}, timeout=10)
    time.sleep(0.5)  # let the workers flush
    text = broker_log.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    mine = [line for line in lines if line.get("request_id") == "rid-m1"]
    assert [(line["logger"], line.get("status"), line.get("event")) for line in mine] == [
        ("app.access", 401, None), ("app.audit", None, "login")]  # the access line, then the audit event
    assert all(marker not in text for marker in ("MARKER-1d2c", "MARKER-3e4f", "MARKER-5a6b", "MARKER-7c8d",
                                                   "MARKER-9e0f", "alice-password", "token-broker-local-secret"))


def test_metrics_are_summed_across_workers(start_broker, redis_url):
    """/metrics under gunicorn with two workers (so with Redis, as the settings require) adds up every worker's samples."""
    url = start_broker(BROKER_WORKERS="2", BROKER_REDIS_URL=redis_url)

    def count() -> float:
        text = requests.get(url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith('broker_http_requests_total{method="GET",route="/health",status="200"}'):
                return float(line.split()[-1])
        return 0.0

    before = count()
    for _ in range(20):  # new connections, so both workers take some
        assert requests.get(url + "/health", timeout=10).status_code == 200
    assert count() - before == 20
