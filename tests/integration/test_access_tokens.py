"""/me and /verify with real Keycloak tokens, introspection, and a signing-key rotation under traffic."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from dataclasses import replace

import pytest
import requests

from app import create_app
from app.config import Settings
from tests.integration.helpers import claims


def login(broker_url: str, username: str, password: str) -> dict:
    response = requests.post(f"{broker_url}/api/auth/login", json={"username": username, "password": password},
                             timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["token"]


def kid_of(token: str) -> str:
    """The kid in a JWT's header."""
    header = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"]


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_me_answers_alices_identity(broker_url):
    """alice's access token: /me answers her identity from the token, roles included."""
    token = login(broker_url, "alice", "alice-password")["access_token"]
    response = requests.get(f"{broker_url}/api/auth/me", headers=bearer(token), timeout=10)
    token_claims = claims(token)
    assert response.status_code == 200
    assert response.json() == {
        "sub": token_claims["sub"],
        "username": "alice",
        "email": "alice@example.com",
        "email_verified": True,
        "name": "Alice Liddell",
        "given_name": "Alice",
        "family_name": "Liddell",
        "roles": sorted(token_claims["realm_access"]["roles"]),
        "client_roles": {c: sorted(a["roles"]) for c, a in token_claims["resource_access"].items()},
        "scope": token_claims["scope"],
        "expires_at": token_claims["exp"],
    }
    assert {"user", "default-roles-demo"} <= set(response.json()["roles"])
    assert "admin" not in response.json()["roles"]


def test_verify_gives_the_gateway_bobs_identity(broker_url):
    """bob's access token: /verify answers 204 with his subject, username, email and realm roles."""
    token = login(broker_url, "bob", "bob-password")["access_token"]
    response = requests.get(f"{broker_url}/api/auth/verify", headers=bearer(token), timeout=10)
    assert (response.status_code, response.content) == (204, b"")
    assert response.headers["X-Auth-Subject"] == claims(token)["sub"]
    assert (response.headers["X-Auth-Username"], response.headers["X-Auth-Email"]) == ("bob", "bob@example.com")
    assert {"user", "admin"} <= set(response.headers["X-Auth-Roles"].split(","))
    assert "token-broker" in claims(token)["aud"]  # the realm's audience mapper, needed for introspection


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("refresh_token", "Access token uses a signature algorithm that is not accepted"),
        ("id_token", "Token is not an access token"),
    ],
)
def test_other_keycloak_tokens_are_not_bearer_tokens(broker_url, kind, message):
    """Keycloak's refresh token (HS512) and ID token (typ ID) are refused as bearer tokens."""
    token = login(broker_url, "alice", "alice-password")[kind]
    response = requests.get(f"{broker_url}/api/auth/verify", headers=bearer(token), timeout=10)
    assert (response.status_code, response.json()) == (401, {"error": "invalid_token", "message": message})


@pytest.fixture
def settings(keycloak_server) -> Settings:
    """Settings of a broker in front of the test Keycloak."""
    return Settings(keycloak_url=keycloak_server.base_url, keycloak_realm=keycloak_server.realm,
                    client_id=keycloak_server.client_id, client_secret=keycloak_server.client_secret)


def test_after_logout_the_token_stays_valid_without_introspection(settings):
    """Local validation cannot see a logout: the access token passes until it expires (the documented trade-off)."""
    client = create_app(settings).test_client()
    tokens = json.loads(client.post("/api/auth/login", json={"username": "alice", "password": "alice-password"})
                        .get_data())["token"]
    assert client.post("/api/auth/logout", json={"refresh_token": tokens["refresh_token"]}).status_code == 200
    assert client.get("/api/auth/verify", headers=bearer(tokens["access_token"])).status_code == 204


def test_after_logout_introspection_refuses_the_token(settings):
    """With BROKER_TOKEN_INTROSPECTION on, a logged-out session's access token is refused at once."""
    client = create_app(replace(settings, token_introspection=True, introspection_cache_seconds=1)).test_client()
    tokens = json.loads(client.post("/api/auth/login", json={"username": "alice", "password": "alice-password"})
                        .get_data())["token"]
    assert client.get("/api/auth/verify", headers=bearer(tokens["access_token"])).status_code == 204
    assert client.post("/api/auth/logout", json={"refresh_token": tokens["refresh_token"]}).status_code == 200
    time.sleep(1.1)  # let the cached "active" verdict lapse
    response = client.get("/api/auth/verify", headers=bearer(tokens["access_token"]))
    assert (response.status_code, json.loads(response.get_data())) == (
        401,
        {"error": "invalid_token", "message": "The session of this access token has ended"},
    )


def test_ready_reports_keys_in_hand(broker_url):
    """The broker is ready once discovery and the realm's keys are in hand."""
    response = requests.get(f"{broker_url}/ready", timeout=10)
    assert (response.status_code, response.json()) == (200, {"status": "ready"})


def test_key_rotation_under_traffic_fails_no_request(broker_url, kc_admin, keycloak_server):
    """Rotating the realm's signing key while /verify traffic flows: every old and new token keeps passing."""
    old_token = login(broker_url, "bob", "bob-password")["access_token"]
    old_kid = kid_of(old_token)
    failures: list[int] = []
    checked = [0]
    stop = threading.Event()

    def traffic() -> None:
        with requests.Session() as http:
            while not stop.is_set():
                status = http.get(f"{broker_url}/api/auth/verify", headers=bearer(old_token), timeout=10).status_code
                checked[0] += 1
                if status != 204:
                    failures.append(status)

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for thread in threads:
        thread.start()
    realm_id = kc_admin.get_realm(keycloak_server.realm)["id"]
    name = f"rotated-{uuid.uuid4().hex[:6]}"
    kc_admin.create_component({
        "name": name, "providerId": "rsa-generated", "providerType": "org.keycloak.keys.KeyProvider",
        "parentId": realm_id, "config": {"priority": ["500"], "keySize": ["2048"], "algorithm": ["RS256"]},
    })
    try:
        new_kids = set()
        with requests.Session() as http:
            for _ in range(6):  # tokens signed with the new key, checked by both workers
                token = login(broker_url, "alice", "alice-password")["access_token"]
                new_kids.add(kid_of(token))
                for _ in range(4):
                    assert http.get(f"{broker_url}/api/auth/verify", headers=bearer(token), timeout=10).status_code == 204
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        component = kc_admin.get_components(query={"name": name})
        for entry in component:
            kc_admin.delete_component(entry["id"])
    assert old_kid not in new_kids and len(new_kids) == 1
    assert (failures, checked[0] > 20) == ([], True)
