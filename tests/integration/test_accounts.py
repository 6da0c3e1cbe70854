"""Accounts against the real Keycloak: registration, held-back accounts, IP binding."""

from __future__ import annotations

import uuid

import pytest
import requests

from tests.integration.helpers import claims

STRONG = "correct-horse-battery-staple"


@pytest.fixture(scope="module")
def registering(start_broker) -> str:
    """A broker with registration on, as the shipped local setup runs it."""
    return start_broker(BROKER_REGISTRATION="true", BROKER_RATE_LIMITS_ENABLED="false")


@pytest.fixture
def names(kc_admin):
    """A fresh username and email per test; any account made with them is deleted afterwards."""
    username = f"new-{uuid.uuid4().hex[:10]}"
    yield username, f"{username}@example.com"
    for user in kc_admin.get_users({"username": username, "exact": True}):
        kc_admin.delete_user(user["id"])


def register(url: str, **body: str) -> requests.Response:
    return requests.post(f"{url}/api/auth/register", json=body, timeout=30)


def accounts_named(kc_admin, username: str) -> list[dict]:
    return kc_admin.get_users({"username": username, "exact": True})


def test_registration_creates_the_account_and_logs_it_in(registering, names, kc_admin):
    """201 with the user and tokens; the account is enabled, unverified, with that password, and logs in again."""
    username, email = names
    response = register(registering, username=username, email=email, password=STRONG, given_name="Ada",
                        family_name="Lovelace")
    assert response.status_code == 201, response.text
    body = response.json()
    (account,) = accounts_named(kc_admin, username)
    assert (body["message"], body["user"]) == (
        "Registration successful", {"sub": account["id"], "username": username, "email": email})
    assert sorted(body["token"]) == ["access_token", "expires_in", "id_token", "refresh_expires_in", "refresh_token",
                                     "scope", "token_type"]
    assert claims(body["token"]["access_token"])["sub"] == account["id"]
    assert (account["enabled"], account["emailVerified"], account["firstName"], account["lastName"],
            account.get("requiredActions")) == (True, False, "Ada", "Lovelace", [])
    again = requests.post(f"{registering}/api/auth/login", json={"username": username, "password": STRONG}, timeout=30)
    assert again.status_code == 200


def test_a_taken_username_or_email_is_409_naming_which(registering, names):
    """The second registration with the same username, or the same email, is 409 user_exists and says which."""
    username, email = names
    assert register(registering, username=username, email=email, password=STRONG).status_code == 201
    same_name = register(registering, username=username, email=f"other-{email}", password=STRONG)
    same_email = register(registering, username=f"{username}-2", email=email, password=STRONG)
    assert [(r.status_code, r.json()) for r in (same_name, same_email)] == [
        (409, {"error": "user_exists", "message": "An account with this username already exists"}),
        (409, {"error": "user_exists", "message": "An account with this email address already exists"}),
    ]


@pytest.mark.parametrize(("password", "message"), [
    ("short-pw", "The password must be at least 10 characters long"),
    ("{username}", "The password must not be the username"),
])
def test_a_password_the_policy_refuses_is_400_and_leaves_no_account(registering, names, kc_admin, password, message):
    """The realm's policy says no: 400 invalid_password in plain words, and the just-created user is gone again."""
    username, email = names
    response = register(registering, username=username, email=email, password=password.format(username=username))
    assert (response.status_code, response.json()) == (400, {"error": "invalid_password", "message": message})
    assert accounts_named(kc_admin, username) == []


@pytest.mark.parametrize(("body", "message"), [
    ({"email": "x@example.com", "password": STRONG}, "username is required"),
    ({"username": "someone", "password": STRONG}, "email is required"),
    ({"username": "someone", "email": "not-an-email", "password": STRONG}, "email must be an email address"),
    ({"username": "someone", "email": "x@example.com"}, "password is required"),
])
def test_a_missing_or_malformed_field_is_invalid_request(registering, body, message):
    """Nothing is created for a body that is not a registration."""
    response = register(registering, **body)
    assert (response.status_code, response.json()) == (400, {"error": "invalid_request", "message": message})


def test_a_failed_login_after_creation_leaves_no_account(start_broker, names, kc_admin):
    """Break the last step (a login scope the client may not have): the error reaches the caller, the user is gone."""
    url = start_broker(BROKER_REGISTRATION="true", BROKER_LOGIN_SCOPE="openid no-such-scope")
    username, email = names
    response = register(url, username=username, email=email, password=STRONG)
    assert (response.status_code, response.json()) == (
        400, {"error": "invalid_scope", "message": "The requested scope is not allowed for this client"})
    assert accounts_named(kc_admin, username) == []


def test_registration_is_off_by_default(broker_url, names, kc_admin):
    """The default broker has no registration: 404 in the fixed shape, and no account."""
    username, email = names
    response = register(broker_url, username=username, email=email, password=STRONG)
    assert (response.status_code, response.json()) == (404, {"error": "not_found", "message": "No such route"})
    assert accounts_named(kc_admin, username) == []


# --- held-back accounts --------------------------------------------------------------------------------------


def test_the_right_password_of_a_held_back_account_names_what_is_pending(broker_url, make_user):
    """UPDATE_PASSWORD pending: the right password gets 401 account_setup_required naming it; a wrong one does not."""
    user = make_user(required_actions=["UPDATE_PASSWORD", "VERIFY_EMAIL"])
    right = requests.post(f"{broker_url}/api/auth/login", json={"username": user.username, "password": user.password},
                          timeout=30)
    wrong = requests.post(f"{broker_url}/api/auth/login", json={"username": user.username, "password": "nope-nope"},
                          timeout=30)
    assert (right.status_code, right.json()) == (401, {
        "error": "account_setup_required",
        "message": "Account is not fully set up: choose a new password and verify the email address in the "
                   "account console, then log in again",
    })
    assert (wrong.status_code, wrong.json()) == (
        401, {"error": "invalid_grant", "message": "Invalid username or password"})


# --- IP binding ----------------------------------------------------------------------------------------------


def test_a_refresh_from_another_address_is_location_blocked(start_broker, make_user):
    """BROKER_IP_BINDING=address: the login's address may refresh; another address gets 401 and spends nothing."""
    url = start_broker(BROKER_IP_BINDING="address", BROKER_TRUSTED_PROXY_HOPS="1", BROKER_RATE_LIMITS_ENABLED="false")
    user = make_user()
    here = {"X-Forwarded-For": "203.0.113.7"}
    tokens = requests.post(f"{url}/api/auth/login", json={"username": user.username, "password": user.password},
                           headers=here, timeout=30).json()["token"]
    elsewhere = requests.post(f"{url}/api/auth/refresh-token", json={"refresh_token": tokens["refresh_token"]},
                              headers={"X-Forwarded-For": "198.51.100.9"}, timeout=30)
    assert (elsewhere.status_code, elsewhere.json()) == (401, {
        "error": "location_blocked", "message": "This session was started from another network; log in again here"})
    home = requests.post(f"{url}/api/auth/refresh-token", json={"refresh_token": tokens["refresh_token"]},
                         headers=here, timeout=30)
    assert home.status_code == 200  # the blocked attempt did not spend the token


def test_prefix_binding_lets_a_neighbour_address_refresh(start_broker, make_user):
    """BROKER_IP_BINDING=prefix: another address of the same /24 may refresh; another network may not."""
    url = start_broker(BROKER_IP_BINDING="prefix", BROKER_TRUSTED_PROXY_HOPS="1", BROKER_RATE_LIMITS_ENABLED="false")
    user = make_user()
    tokens = requests.post(f"{url}/api/auth/login", json={"username": user.username, "password": user.password},
                           headers={"X-Forwarded-For": "203.0.113.7"}, timeout=30).json()["token"]
    neighbour = requests.post(f"{url}/api/auth/refresh-token", json={"refresh_token": tokens["refresh_token"]},
                              headers={"X-Forwarded-For": "203.0.113.200"}, timeout=30)
    assert neighbour.status_code == 200
    far = requests.post(f"{url}/api/auth/refresh-token",
                        json={"refresh_token": neighbour.json()["token"]["refresh_token"]},
                        headers={"X-Forwarded-For": "203.0.114.1"}, timeout=30)
    assert (far.status_code, far.json()["error"]) == (401, "location_blocked")
