"""Probe tests: what the real Keycloak answers (status and raw JSON body) on its token, logout and revoke endpoints."""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import pytest
import requests

from tests.integration.helpers import claims, temp_client

INVALID_CLIENT_CREDENTIALS = "Invalid client or Invalid client credentials"
OTHER_CLIENT_SECRET = "probe-other-secret"
# Keycloak's brute-force detector treats two failures closer than quickLoginCheckMilliSeconds (1000 ms in the
# shipped realm) as a quick-login attack; spacing failures further apart isolates the failureFactor rule.
SLOWER_THAN_QUICK_LOGIN_CHECK = 1.1


def answer(response: requests.Response) -> tuple[int, dict]:
    """Status and decoded JSON body of a Keycloak answer, for comparing both at once."""
    return response.status_code, response.json()


def brute_force_status(kc_admin, user_id: str, failures: int) -> dict:
    """The user's brute-force status once Keycloak has counted `failures` (it records failures asynchronously)."""
    deadline = time.monotonic() + 5
    status = kc_admin.get_bruteforce_detection_status(user_id)
    while status["numFailures"] < failures and time.monotonic() < deadline:
        time.sleep(0.05)
        status = kc_admin.get_bruteforce_detection_status(user_id)
    return status


def grant_error(description: str) -> dict:
    return {"error": "invalid_grant", "error_description": description}


def b64_json(value: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def refresh(kc, refresh_token: str, **form: str) -> requests.Response:
    return kc.token(grant_type="refresh_token", refresh_token=refresh_token, **form)


def refreshed(kc, refresh_token: str, **form: str) -> str:
    """Refresh successfully and return the rotated refresh token."""
    response = refresh(kc, refresh_token, **form)
    assert response.status_code == 200, response.text
    return response.json()["refresh_token"]


def _post_with_client(kc, url: str, **form: str | None) -> requests.Response:
    data = {"client_id": kc.client_id, "client_secret": kc.client_secret, **form}
    return requests.post(url, data={k: v for k, v in data.items() if v is not None}, timeout=30)


def logout(kc, refresh_token: str | None, **form: str | None) -> requests.Response:
    return _post_with_client(kc, kc.logout_url, refresh_token=refresh_token, **form)


def revoke(kc, token: str | None, **form: str | None) -> requests.Response:
    return _post_with_client(kc, f"{kc.realm_url}/protocol/openid-connect/revoke", token=token, **form)


def login(kc, user, **form: str) -> dict:
    """Password grant (scope openid) for a throw-away user; returns the token response."""
    response = kc.token(grant_type="password", username=user.username, password=user.password, scope="openid", **form)
    assert response.status_code == 200, response.text
    return response.json()


def password_grant(kc, username: str, password: str, **form: str) -> requests.Response:
    return kc.token(grant_type="password", username=username, password=password, **form)


@pytest.fixture(scope="module")
def other_client(kc_admin) -> Iterator[dict]:
    """A second confidential client with direct access grants; its credentials as a form fragment."""
    with temp_client(kc_admin, secret=OTHER_CLIENT_SECRET) as client_id:
        yield {"client_id": client_id, "client_secret": OTHER_CLIENT_SECRET}


@pytest.fixture(scope="module")
def expired(keycloak_server, kc_admin) -> Iterator[dict]:
    """Refresh tokens of a client whose sessions idle out after 2 s, each from its own login, all expired."""
    kc = keycloak_server
    password = f"pw-{secrets.token_urlsafe(12)}"
    username = f"user-{uuid.uuid4().hex[:10]}"
    user_id = kc_admin.create_user(
        {
            "username": username,
            "enabled": True,
            "email": f"{username}@example.com",
            "emailVerified": True,
            "firstName": "Test",
            "lastName": username,
            "requiredActions": [],
            "credentials": [{"type": "password", "value": password, "temporary": False}],
        }
    )
    secret = "probe-short-secret"
    try:
        with temp_client(kc_admin, secret=secret, attributes={"client.session.idle.timeout": "2"}) as client_id:
            creds = {"client_id": client_id, "client_secret": secret}
            tokens = {}
            for name in ("refresh", "logout", "revoke"):
                response = password_grant(kc, username, password, scope="openid", **creds)
                assert response.status_code == 200, response.text
                body = response.json()
                assert body["refresh_expires_in"] == 2
                tokens[name] = body["refresh_token"]
            time.sleep(3.2)
            yield {"creds": creds, "tokens": tokens, "user_id": user_id}
    finally:
        kc_admin.delete_user(user_id)


# --- client authentication --------------------------------------------------------------------------------------


def test_no_client_id_is_401_invalid_client(keycloak_server):
    """A token request without client_id (and without a secret) is 401 invalid_client, not a 400 naming client_id."""
    response = keycloak_server.token(client_id=None, client_secret=None, grant_type="password", username="x", password="y")
    assert answer(response) == (401, {"error": "invalid_client", "error_description": INVALID_CLIENT_CREDENTIALS})


def test_unknown_client_is_401_invalid_client(keycloak_server):
    """An unknown client_id is 401 invalid_client."""
    response = keycloak_server.token(client_id="no-such-client", grant_type="password", username="x", password="y")
    assert answer(response) == (401, {"error": "invalid_client", "error_description": INVALID_CLIENT_CREDENTIALS})


def test_disabled_client_is_401_invalid_client(keycloak_server, kc_admin, make_user):
    """A disabled client with the right secret is 401 invalid_client, like an unknown one."""
    user = make_user()
    with temp_client(kc_admin, secret="s3cret", enabled=False) as client_id:
        response = password_grant(keycloak_server, user.username, user.password, client_id=client_id, client_secret="s3cret")
    assert answer(response) == (401, {"error": "invalid_client", "error_description": INVALID_CLIENT_CREDENTIALS})


def test_wrong_secret_is_401_unauthorized_client(keycloak_server):
    """A wrong client secret is 401 unauthorized_client (not invalid_client)."""
    response = keycloak_server.token(client_secret="wrong", grant_type="password", username="x", password="y")
    assert answer(response) == (401, {"error": "unauthorized_client", "error_description": INVALID_CLIENT_CREDENTIALS})


def test_missing_secret_is_401_unauthorized_client(keycloak_server):
    """A confidential client_id without a secret is 401 unauthorized_client."""
    response = keycloak_server.token(client_secret=None, grant_type="password", username="x", password="y")
    assert answer(response) == (401, {"error": "unauthorized_client", "error_description": INVALID_CLIENT_CREDENTIALS})


def test_direct_grants_disabled_is_400_unauthorized_client(keycloak_server, kc_admin, make_user):
    """A client without direct access grants gets 400 unauthorized_client for the password grant."""
    user = make_user()
    with temp_client(kc_admin, secret="s3cret", directAccessGrantsEnabled=False) as client_id:
        response = password_grant(keycloak_server, user.username, user.password, client_id=client_id, client_secret="s3cret")
    assert answer(response) == (
        400,
        {"error": "unauthorized_client", "error_description": "Client not allowed for direct access grants"},
    )


# --- password grant -----------------------------------------------------------------------------------------------


def test_success_response_fields(keycloak_server, make_user):
    """A password grant and a refresh answer the same fields; id_token only when the scope has openid."""
    user = make_user()
    common = {
        "access_token", "expires_in", "refresh_expires_in", "refresh_token",
        "token_type", "not-before-policy", "session_state", "scope",
    }
    with_openid = login(keycloak_server, user)
    assert set(with_openid) == common | {"id_token"}
    assert with_openid["token_type"] == "Bearer"
    assert sorted(with_openid["scope"].split()) == ["email", "openid", "profile"]  # order varies between calls
    assert (with_openid["expires_in"], with_openid["refresh_expires_in"], with_openid["not-before-policy"]) == (300, 1800, 0)
    refreshed_response = refresh(keycloak_server, with_openid["refresh_token"])
    assert refreshed_response.status_code == 200
    assert set(refreshed_response.json()) == common | {"id_token"}
    without_openid = password_grant(keycloak_server, user.username, user.password)
    assert without_openid.status_code == 200
    assert set(without_openid.json()) == common
    assert sorted(without_openid.json()["scope"].split()) == ["email", "profile"]


def test_wrong_password_is_400_invalid_grant(keycloak_server, make_user):
    """A wrong password is 400 invalid_grant "Invalid user credentials"."""
    user = make_user()
    response = password_grant(keycloak_server, user.username, "wrong-password")
    assert answer(response) == (400, grant_error("Invalid user credentials"))


def test_unknown_user_is_400_invalid_grant(keycloak_server):
    """An unknown username answers exactly like a wrong password."""
    response = password_grant(keycloak_server, f"nobody-{uuid.uuid4().hex[:8]}", "whatever")
    assert answer(response) == (400, grant_error("Invalid user credentials"))


def test_missing_password_is_400_invalid_grant(keycloak_server, make_user):
    """A password grant without a password is 400 invalid_grant "Invalid user credentials"."""
    user = make_user()
    response = keycloak_server.token(grant_type="password", username=user.username)
    assert answer(response) == (400, grant_error("Invalid user credentials"))


def test_missing_username_is_401_invalid_request(keycloak_server):
    """A password grant without a username is 401 (sic) invalid_request "Missing parameter: username"."""
    response = keycloak_server.token(grant_type="password", password="whatever")
    assert answer(response) == (401, {"error": "invalid_request", "error_description": "Missing parameter: username"})


def test_missing_grant_type_is_400_invalid_request(keycloak_server):
    """A token request without grant_type is 400 invalid_request."""
    response = keycloak_server.token(username="x", password="y")
    assert answer(response) == (400, {"error": "invalid_request", "error_description": "Missing form parameter: grant_type"})


def test_unknown_grant_type_is_400_unsupported_grant_type(keycloak_server):
    """An unknown grant_type is 400 unsupported_grant_type."""
    response = keycloak_server.token(grant_type="no-such-grant")
    assert answer(response) == (400, {"error": "unsupported_grant_type", "error_description": "Unsupported grant_type"})


def test_quick_failures_lock_out_after_two_even_for_the_right_password(keycloak_server, kc_admin, make_user):
    """Two failures within a second lock the user out; the right password then gets the wrong-password answer, while refreshing an existing session still works."""
    user = make_user()
    session = login(keycloak_server, user)
    for _ in range(2):
        assert answer(password_grant(keycloak_server, user.username, "wrong")) == (400, grant_error("Invalid user credentials"))
    status = brute_force_status(kc_admin, user.id, failures=2)
    assert (status["numFailures"], status["disabled"]) == (2, True)
    assert answer(password_grant(keycloak_server, user.username, user.password)) == (
        400,
        grant_error("Invalid user credentials"),
    )
    assert refresh(keycloak_server, session["refresh_token"]).status_code == 200


def test_failure_factor_locks_out_on_the_tenth_spaced_failure(keycloak_server, kc_admin, make_user):
    """With failures spaced beyond the quick-login check, the 10th failure (failureFactor 10) locks the user out, and the right password then gets the wrong-password answer."""
    user = make_user()
    for attempt in range(1, 11):
        time.sleep(SLOWER_THAN_QUICK_LOGIN_CHECK)
        assert answer(password_grant(keycloak_server, user.username, "wrong")) == (400, grant_error("Invalid user credentials"))
        status = brute_force_status(kc_admin, user.id, failures=attempt)
        assert (status["numFailures"], status["disabled"]) == (attempt, attempt == 10)
    assert answer(password_grant(keycloak_server, user.username, user.password)) == (
        400,
        grant_error("Invalid user credentials"),
    )


def test_disabled_user_is_400_account_disabled(keycloak_server, make_user):
    """A disabled user with the right password gets "Account disabled"; with a wrong password the usual answer."""
    user = make_user(enabled=False)
    assert answer(password_grant(keycloak_server, user.username, user.password)) == (400, grant_error("Account disabled"))
    assert answer(password_grant(keycloak_server, user.username, "wrong")) == (400, grant_error("Invalid user credentials"))


@pytest.mark.parametrize("action", ["UPDATE_PASSWORD", "VERIFY_EMAIL", "UPDATE_PROFILE"])
def test_required_action_is_400_not_fully_set_up(keycloak_server, make_user, action):
    """A user with a pending required action gets "Account is not fully set up", but only with the right password:
    a wrong one gets "Invalid user credentials", so the answer tells a guesser nothing (account_setup_required)."""
    user = make_user(required_actions=[action])
    response = password_grant(keycloak_server, user.username, user.password)
    assert answer(response) == (400, grant_error("Account is not fully set up"))
    wrong = password_grant(keycloak_server, user.username, "wrong-password")
    assert answer(wrong) == (400, grant_error("Invalid user credentials"))


@pytest.mark.parametrize(("missing", "held_back"), [("email", True), ("firstName", False), ("lastName", False),
                                                   ("all", True)])
def test_incomplete_profile_is_400_not_fully_set_up(keycloak_server, kc_admin, missing, held_back):
    """A user missing the email gets "Account is not fully set up"; first and last name are optional in the shipped
    realm's user profile (registration asks for them only optionally), so a user without them logs in."""
    username = f"user-{uuid.uuid4().hex[:10]}"
    password = f"pw-{secrets.token_urlsafe(12)}"
    profile = {"email": f"{username}@example.com", "emailVerified": True, "firstName": "Test", "lastName": "User"}
    if missing == "all":
        profile = {}
    else:
        del profile[missing]
    user_id = kc_admin.create_user(
        {
            "username": username,
            "enabled": True,
            "requiredActions": [],
            "credentials": [{"type": "password", "value": password, "temporary": False}],
            **profile,
        }
    )
    try:
        response = password_grant(keycloak_server, username, password)
    finally:
        kc_admin.delete_user(user_id)
    if held_back:
        assert answer(response) == (400, grant_error("Account is not fully set up"))
    else:
        assert response.status_code == 200, response.text


def test_invalid_scope_is_400_invalid_scope_echoing_the_whole_request(keycloak_server, make_user):
    """An unknown scope is 400 invalid_scope whose description repeats the whole requested scope string."""
    user = make_user()
    response = password_grant(keycloak_server, user.username, user.password, scope="openid no-such-scope")
    assert answer(response) == (
        400,
        {"error": "invalid_scope", "error_description": "Invalid scopes: openid no-such-scope"},
    )


# --- refresh grant ------------------------------------------------------------------------------------------------


def test_refresh_without_token_is_400_invalid_request(keycloak_server):
    """A refresh grant without refresh_token is 400 invalid_request "No refresh token"."""
    response = keycloak_server.token(grant_type="refresh_token")
    assert answer(response) == (400, {"error": "invalid_request", "error_description": "No refresh token"})


@pytest.mark.parametrize(
    "token",
    [
        "",
        "not-a-token",
        b64_json({"alg": "HS512", "typ": "JWT"}) + "." + b64_json({"typ": "Refresh", "exp": 9999999999}) + ".c2ln",
        b64_json({"alg": "none"}) + "." + b64_json({"typ": "Refresh"}) + ".",
    ],
    ids=["empty", "garbage", "jwt-shaped", "alg-none"],
)
def test_refresh_with_garbage_is_invalid_refresh_token(keycloak_server, token):
    """Empty, garbage and JWT-shaped forged refresh tokens are 400 invalid_grant "Invalid refresh token"."""
    assert answer(refresh(keycloak_server, token)) == (400, grant_error("Invalid refresh token"))


def test_refresh_with_tampered_signature_is_invalid_refresh_token(keycloak_server, make_user):
    """A real refresh token with a damaged signature is "Invalid refresh token"."""
    header, payload, signature = login(keycloak_server, make_user())["refresh_token"].split(".")
    tampered = f"{header}.{payload}.{'A' * 8}{signature[8:]}"
    assert answer(refresh(keycloak_server, tampered)) == (400, grant_error("Invalid refresh token"))


@pytest.mark.parametrize("kind", ["access_token", "id_token"])
def test_refresh_with_other_token_kinds_is_invalid_refresh_token(keycloak_server, make_user, kind):
    """The access token or the ID token offered as refresh token is "Invalid refresh token" and spends nothing."""
    tokens = login(keycloak_server, make_user())
    assert answer(refresh(keycloak_server, tokens[kind])) == (400, grant_error("Invalid refresh token"))
    assert refresh(keycloak_server, tokens["refresh_token"]).status_code == 200


def test_refresh_with_other_clients_token_is_client_mismatch(keycloak_server, make_user, other_client):
    """Another client's refresh token (either way round) is refused as a client mismatch without spending it."""
    user = make_user()
    ours = login(keycloak_server, user)["refresh_token"]
    theirs = login(keycloak_server, user, **other_client)["refresh_token"]
    mismatch = (400, grant_error("Invalid refresh token. Token client and authorized client don't match"))
    assert answer(refresh(keycloak_server, theirs)) == mismatch
    assert answer(refresh(keycloak_server, ours, **other_client)) == mismatch
    assert refresh(keycloak_server, ours).status_code == 200
    assert refresh(keycloak_server, theirs, **other_client).status_code == 200


def test_refresh_after_logout_is_session_not_active(keycloak_server, make_user):
    """A refresh token whose session was logged out is "Session not active"."""
    token = login(keycloak_server, make_user())["refresh_token"]
    assert logout(keycloak_server, token).status_code == 204
    assert answer(refresh(keycloak_server, token)) == (400, grant_error("Session not active"))


def test_reuse_of_rotated_token_kills_the_newest_token(keycloak_server, kc_admin, make_user):
    """Reusing a rotated refresh token is "Maximum allowed refresh token reuse exceeded" and the newest token then fails with "Session doesn't have required client"."""
    user = make_user()
    first = login(keycloak_server, user)["refresh_token"]
    newest = refreshed(keycloak_server, first)
    assert answer(refresh(keycloak_server, first)) == (400, grant_error("Maximum allowed refresh token reuse exceeded"))
    assert answer(refresh(keycloak_server, newest)) == (400, grant_error("Session doesn't have required client"))
    assert answer(refresh(keycloak_server, first)) == (400, grant_error("Session doesn't have required client"))
    # The user session itself survives, emptied of this client; only a new login gets the user back in.
    sessions = kc_admin.get_sessions(user.id)
    assert [s["clients"] for s in sessions] == [{}]
    assert logout(keycloak_server, newest).status_code == 204
    assert kc_admin.get_sessions(user.id) == []
    assert refresh(keycloak_server, login(keycloak_server, user)["refresh_token"]).status_code == 200


def test_concurrent_refreshes_of_one_token_end_the_login(keycloak_server, make_user):
    """Four concurrent refreshes of one token: exactly one wins, and even the winner's new token is then dead."""
    token = login(keycloak_server, make_user())["refresh_token"]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: refresh(keycloak_server, token), range(4)))
    winners = [r for r in responses if r.status_code == 200]
    assert len(winners) == 1
    for loser in (r for r in responses if r.status_code != 200):
        status, body = answer(loser)
        assert status == 400
        assert body in (
            grant_error("Maximum allowed refresh token reuse exceeded"),
            grant_error("Session doesn't have required client"),
        )
    assert answer(refresh(keycloak_server, winners[0].json()["refresh_token"])) == (
        400,
        grant_error("Session doesn't have required client"),
    )


def test_older_generation_token_is_stale_and_kills_the_newest(keycloak_server, make_user):
    """A refresh token two rotations old, issued in an earlier second than the last refresh, is "Stale token" and ends the chain."""
    first = login(keycloak_server, make_user())["refresh_token"]
    time.sleep(1.1)
    second = refreshed(keycloak_server, first)
    time.sleep(1.1)
    third = refreshed(keycloak_server, second)
    assert answer(refresh(keycloak_server, first)) == (400, grant_error("Stale token"))
    assert answer(refresh(keycloak_server, third)) == (400, grant_error("Session doesn't have required client"))


def test_older_generation_token_from_the_same_second_is_accepted(keycloak_server, make_user):
    """Keycloak's staleness check has one-second resolution: a token two rotations old, minted in the same second as the last refresh, is accepted."""
    user = make_user()
    for _ in range(5):
        first = login(keycloak_server, user)["refresh_token"]
        second = refreshed(keycloak_server, first)
        third = refreshed(keycloak_server, second)
        if claims(first)["iat"] == claims(third)["iat"]:
            break
    else:
        pytest.fail("could not run three token requests within one second")
    replayed = refresh(keycloak_server, first)
    assert replayed.status_code == 200, replayed.text
    # The replay made `first` the current token; `third` survives too unless the replay fell into a later second.
    if claims(replayed.json()["refresh_token"])["iat"] == claims(third)["iat"]:
        assert refresh(keycloak_server, third).status_code == 200
    else:
        assert answer(refresh(keycloak_server, third)) == (400, grant_error("Stale token"))


def test_expired_refresh_token_is_token_not_active(keycloak_server, expired):
    """An expired refresh token is "Token is not active"."""
    response = refresh(keycloak_server, expired["tokens"]["refresh"], **expired["creds"])
    assert answer(response) == (400, grant_error("Token is not active"))


def test_refresh_after_admin_user_logout_is_session_not_active(keycloak_server, kc_admin, make_user):
    """After the admin logs the user out (which also sets the user's not-before), refresh is "Session not active"."""
    user = make_user()
    token = login(keycloak_server, user)["refresh_token"]
    kc_admin.user_logout(user.id)
    assert kc_admin.get_user(user.id)["notBefore"] > 0
    assert answer(refresh(keycloak_server, token)) == (400, grant_error("Session not active"))
    assert refresh(keycloak_server, login(keycloak_server, user)["refresh_token"]).status_code == 200


def test_refresh_after_client_not_before_is_stale_token(keycloak_server, kc_admin, make_user, other_client):
    """A refresh token issued before the client's not-before is "Stale token", though its session is alive."""
    user = make_user()
    token = login(keycloak_server, user, **other_client)["refresh_token"]
    time.sleep(1.1)
    internal_id = kc_admin.get_client_id(other_client["client_id"])
    kc_admin.update_client(internal_id, {"notBefore": int(time.time())})
    try:
        assert answer(refresh(keycloak_server, token, **other_client)) == (400, grant_error("Stale token"))
        assert len(kc_admin.get_sessions(user.id)) == 1
    finally:
        kc_admin.update_client(internal_id, {"notBefore": 0})


def test_refresh_after_realm_not_before_is_stale_token(keycloak_server, kc_admin, make_user):
    """A refresh token issued before the realm's not-before ("revocation: set to now") is "Stale token"."""
    token = login(keycloak_server, make_user())["refresh_token"]
    time.sleep(1.1)
    kc_admin.update_realm(keycloak_server.realm, {"notBefore": int(time.time())})
    try:
        assert answer(refresh(keycloak_server, token)) == (400, grant_error("Stale token"))
    finally:
        kc_admin.update_realm(keycloak_server.realm, {"notBefore": 0})


def test_disabled_user_refresh_is_user_disabled_and_session_survives(keycloak_server, kc_admin, make_user):
    """Refreshing for a disabled user is "User disabled"; the session survives and refresh works again once re-enabled."""
    user = make_user()
    token = login(keycloak_server, user)["refresh_token"]
    kc_admin.update_user(user.id, {"enabled": False})
    assert answer(refresh(keycloak_server, token)) == (400, grant_error("User disabled"))
    assert len(kc_admin.get_sessions(user.id)) == 1
    kc_admin.update_user(user.id, {"enabled": True})
    assert refresh(keycloak_server, token).status_code == 200


# --- logout -------------------------------------------------------------------------------------------------------


def test_logout_is_204_and_ends_the_session(keycloak_server, kc_admin, make_user):
    """Logout with a valid refresh token is 204 with an empty body and removes the user session."""
    user = make_user()
    token = login(keycloak_server, user)["refresh_token"]
    response = logout(keycloak_server, token)
    assert (response.status_code, response.text) == (204, "")
    assert kc_admin.get_sessions(user.id) == []


def test_logout_twice_is_204(keycloak_server, make_user):
    """A second logout with the same refresh token is again 204."""
    token = login(keycloak_server, make_user())["refresh_token"]
    assert logout(keycloak_server, token).status_code == 204
    response = logout(keycloak_server, token)
    assert (response.status_code, response.text) == (204, "")


@pytest.mark.parametrize("token", ["", "garbage", "access_token"])
def test_logout_with_garbage_is_invalid_refresh_token(keycloak_server, make_user, token):
    """Logout with an empty, garbage or access token is 400 invalid_grant "Invalid refresh token"."""
    if token == "access_token":
        token = login(keycloak_server, make_user())["access_token"]
    assert answer(logout(keycloak_server, token)) == (400, grant_error("Invalid refresh token"))


def test_logout_with_other_clients_token_is_client_mismatch(keycloak_server, kc_admin, make_user, other_client):
    """Logout with another client's refresh token is refused as a client mismatch and leaves the session alone."""
    user = make_user()
    theirs = login(keycloak_server, user, **other_client)["refresh_token"]
    assert answer(logout(keycloak_server, theirs)) == (
        400,
        grant_error("Invalid refresh token. Token client and authorized client don't match"),
    )
    assert len(kc_admin.get_sessions(user.id)) == 1


def test_logout_with_wrong_secret_is_401(keycloak_server, make_user):
    """Logout with a wrong client secret is 401 unauthorized_client."""
    token = login(keycloak_server, make_user())["refresh_token"]
    assert answer(logout(keycloak_server, token, client_secret="wrong")) == (
        401,
        {"error": "unauthorized_client", "error_description": INVALID_CLIENT_CREDENTIALS},
    )


def test_logout_without_refresh_token_is_an_html_page(keycloak_server):
    """Logout without refresh_token is not an error: it is 200 with the HTML "Do you want to log out?" page."""
    response = logout(keycloak_server, None)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert "Do you want to log out?" in response.text


def test_logout_with_expired_token_is_204_and_ends_the_session(keycloak_server, kc_admin, expired):
    """Logout does not check expiry: an expired refresh token is 204 and its session is removed."""
    before = len(kc_admin.get_sessions(expired["user_id"]))
    response = _post_with_client(
        keycloak_server, keycloak_server.logout_url, refresh_token=expired["tokens"]["logout"], **expired["creds"]
    )
    assert (response.status_code, response.text) == (204, "")
    assert len(kc_admin.get_sessions(expired["user_id"])) == before - 1


def test_logout_with_used_token_is_204_and_ends_the_session(keycloak_server, kc_admin, make_user):
    """Logout does not check rotation: an already-used refresh token is 204 and ends the session of the newest one."""
    user = make_user()
    first = login(keycloak_server, user)["refresh_token"]
    newest = refreshed(keycloak_server, first)
    response = logout(keycloak_server, first)
    assert (response.status_code, response.text) == (204, "")
    assert kc_admin.get_sessions(user.id) == []
    assert answer(refresh(keycloak_server, newest)) == (400, grant_error("Session not active"))


# --- revocation (RFC 7009) ----------------------------------------------------------------------------------------


def test_revoke_refresh_token_is_200_empty_and_ends_the_session(keycloak_server, kc_admin, make_user):
    """Revoking a refresh token is 200 with an empty body and removes the session."""
    user = make_user()
    token = login(keycloak_server, user)["refresh_token"]
    response = revoke(keycloak_server, token)
    assert (response.status_code, response.text) == (200, "")
    assert kc_admin.get_sessions(user.id) == []
    assert answer(refresh(keycloak_server, token)) == (400, grant_error("Session not active"))


def test_revoke_access_token_is_200_and_leaves_the_session(keycloak_server, make_user):
    """Revoking an access token is 200 with an empty body and does not affect the refresh token."""
    tokens = login(keycloak_server, make_user())
    response = revoke(keycloak_server, tokens["access_token"])
    assert (response.status_code, response.text) == (200, "")
    assert refresh(keycloak_server, tokens["refresh_token"]).status_code == 200


@pytest.mark.parametrize("token", ["garbage", ""])
def test_revoke_garbage_is_200_with_invalid_token(keycloak_server, token):
    """Revoking garbage is 200 with an error body invalid_token "Invalid token"."""
    assert answer(revoke(keycloak_server, token)) == (200, {"error": "invalid_token", "error_description": "Invalid token"})


def test_revoke_already_revoked_or_logged_out_is_200_with_invalid_token(keycloak_server, make_user):
    """Revoking a token whose session is gone (revoked or logged out) is 200 with invalid_token "Invalid token"."""
    user = make_user()
    revoked = login(keycloak_server, user)["refresh_token"]
    logged_out = login(keycloak_server, user)["refresh_token"]
    assert revoke(keycloak_server, revoked).status_code == 200
    assert logout(keycloak_server, logged_out).status_code == 204
    for token in (revoked, logged_out):
        assert answer(revoke(keycloak_server, token)) == (
            200,
            {"error": "invalid_token", "error_description": "Invalid token"},
        )


def test_revoke_expired_token_is_200_with_invalid_token(keycloak_server, expired):
    """Revoking an expired refresh token is 200 with invalid_token "Invalid token"."""
    response = _post_with_client(
        keycloak_server,
        f"{keycloak_server.realm_url}/protocol/openid-connect/revoke",
        token=expired["tokens"]["revoke"],
        **expired["creds"],
    )
    assert answer(response) == (200, {"error": "invalid_token", "error_description": "Invalid token"})


def test_revoke_other_clients_token_is_400_unmatching_clients(keycloak_server, make_user, other_client):
    """Revoking another client's refresh token is 400 invalid_request "Unmatching clients" and spends nothing."""
    user = make_user()
    theirs = login(keycloak_server, user, **other_client)["refresh_token"]
    assert answer(revoke(keycloak_server, theirs)) == (
        400,
        {"error": "invalid_request", "error_description": "Unmatching clients"},
    )
    assert refresh(keycloak_server, theirs, **other_client).status_code == 200


def test_revoke_without_token_is_400_invalid_request(keycloak_server):
    """Revocation without a token parameter is 400 invalid_request "Token not provided"."""
    assert answer(revoke(keycloak_server, None)) == (
        400,
        {"error": "invalid_request", "error_description": "Token not provided"},
    )


def test_revoke_without_client_auth_is_401_invalid_client(keycloak_server):
    """Revocation without client credentials is 401 invalid_client."""
    response = revoke(keycloak_server, "garbage", client_id=None, client_secret=None)
    assert answer(response) == (401, {"error": "invalid_client", "error_description": INVALID_CLIENT_CREDENTIALS})
