"""Back-channel logout with the real Keycloak: sessions ended anywhere are refused by /verify within a second.

The realm's token-broker client sends its logout tokens to the URL in its `backchannel.logout.url` attribute;
each test points it at a broker of its own (or at a receiver that captures what Keycloak sends) and restores
it afterwards. Keycloak posts the logout token while it ends the session, before its own call returns.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.integration.conftest import CLIENT_ID
from tests.integration.helpers import claims, temp_client

PATH = "/api/auth/backchannel-logout"
URL_ATTRIBUTE = "backchannel.logout.url"
LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
ENDED = {"error": "invalid_token", "message": "The session of this access token has ended"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(part: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def verify(broker: str, access_token: str) -> requests.Response:
    return requests.get(f"{broker}/api/auth/verify", headers=bearer(access_token), timeout=10)


def login(broker: str, user) -> dict:
    response = requests.post(f"{broker}/api/auth/login", json={"username": user.username, "password": user.password},
                             timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["token"]


def refused_within(broker: str, access_token: str, started: float, limit: float = 1.0) -> float:
    """Poll /verify until it refuses the token as ended; the seconds since `started` (fails after `limit`)."""
    while True:
        response = verify(broker, access_token)
        elapsed = time.monotonic() - started
        if response.status_code == 401:
            assert response.json() == ENDED
            return elapsed
        assert response.status_code == 204, response.text
        assert elapsed < limit, f"/verify still accepted the token {elapsed:.2f}s after the session ended"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def broker(start_broker) -> str:
    """A broker of its own (rate limits off: the whole module logs in from one address)."""
    return start_broker(BROKER_RATE_LIMITS_ENABLED="false")


@contextmanager
def logout_url_of(kc_admin, client_id: str, url: str) -> Iterator[None]:
    """Point a client's back-channel logout URL at `url` for the block, then put the old value back."""
    internal = kc_admin.get_client_id(client_id)

    def set_url(value: str | None) -> None:
        representation = kc_admin.get_client(internal)
        attributes = representation.setdefault("attributes", {})
        if value is None:
            attributes.pop(URL_ATTRIBUTE, None)
        else:
            attributes[URL_ATTRIBUTE] = value
        kc_admin.update_client(internal, representation)

    original = kc_admin.get_client(internal).get("attributes", {}).get(URL_ATTRIBUTE)
    set_url(url)
    try:
        yield
    finally:
        set_url(original)


@pytest.fixture
def backchannel_to(kc_admin):
    """Point the token-broker client's back-channel logout URL at `url` for one test."""
    with_blocks = []

    def point(url: str) -> None:
        block = logout_url_of(kc_admin, CLIENT_ID, url)
        block.__enter__()
        with_blocks.append(block)

    yield point
    for block in reversed(with_blocks):
        block.__exit__(None, None, None)


class Receiver:
    """A tiny HTTP server that captures the logout tokens Keycloak posts to it (and answers 200)."""

    def __init__(self):
        self.tokens: list[str] = []
        self.requests: list[tuple[dict, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the standard library's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                receiver.requests.append((dict(self.headers), body))
                receiver.tokens += parse_qs(body).get("logout_token", [])
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/capture"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int = 1, timeout: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.tokens) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.tokens) >= count, f"Keycloak sent {len(self.tokens)} logout token(s), expected {count}"
        return self.tokens


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    capture = Receiver()
    yield capture
    capture.server.shutdown()
    capture.server.server_close()


def post_logout(broker: str, token: str) -> requests.Response:
    return requests.post(broker + PATH, data={"logout_token": token}, timeout=10)


# --- what Keycloak sends -----------------------------------------------------------------------------------------


def test_keycloak_sends_the_logout_token_docs_api_describes(keycloak_server, kc_admin, make_user, backchannel_to,
                                                            receiver):
    """Keycloak 26's logout token: a form POST, header typ logout+jwt, claims as docs/api.md lists them."""
    backchannel_to(receiver.url)
    user = make_user()
    tokens = keycloak_server.password_grant(user.username, user.password)
    kc_admin.user_logout(user.id)
    (token,) = receiver.wait()
    headers, body = receiver.requests[0]
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert list(parse_qs(body)) == ["logout_token"]
    header, payload = unb64(token.split(".")[0]), unb64(token.split(".")[1])
    assert set(header) == {"alg", "typ", "kid"}
    assert (header["alg"], header["typ"]) == ("RS256", "logout+jwt")
    assert set(payload) == {"exp", "iat", "jti", "iss", "aud", "sub", "typ", "sid", "events"}
    access = claims(tokens["access_token"])
    assert (payload["iss"], payload["aud"], payload["typ"]) == (keycloak_server.realm_url, CLIENT_ID, "Logout")
    assert (payload["sid"], payload["sub"]) == (access["sid"], access["sub"])
    assert payload["events"] == {LOGOUT_EVENT: {}}
    assert payload["exp"] - payload["iat"] == 120
    assert abs(payload["iat"] - time.time()) < 30


# --- sessions ended in Keycloak -------------------------------------------------------------------------------------


def test_a_session_ended_in_the_admin_api_is_refused_within_a_second(broker, kc_admin, make_user, backchannel_to):
    """The admin API logs the user out: /verify, 204 before, answers 401 "has ended" within a second."""
    backchannel_to(broker + PATH)
    user = make_user()
    access_token = login(broker, user)["access_token"]
    assert verify(broker, access_token).status_code == 204
    started = time.monotonic()
    kc_admin.user_logout(user.id)
    assert refused_within(broker, access_token, started) < 1.0
    me = requests.get(f"{broker}/api/auth/me", headers=bearer(access_token), timeout=10)
    assert (me.status_code, me.json()) == (401, ENDED)


def test_deleting_one_session_ends_only_that_one(keycloak_server, broker, kc_admin, make_user, backchannel_to):
    """Two logins of one user; the admin deletes one session: its token is refused, the other's still passes."""
    backchannel_to(broker + PATH)
    user = make_user()
    first, second = login(broker, user)["access_token"], login(broker, user)["access_token"]
    started = time.monotonic()
    deleted = kc_admin.connection.raw_delete(f"admin/realms/{keycloak_server.realm}/sessions/{claims(first)['sid']}")
    assert deleted.status_code == 204, deleted.text
    refused_within(broker, first, started)
    assert verify(broker, second).status_code == 204


def test_a_logout_at_keycloak_with_the_brokers_refresh_token_is_refused(keycloak_server, broker, make_user,
                                                                         backchannel_to):
    """A logout elsewhere that the broker did not see: its refresh token sent straight to Keycloak's logout endpoint."""
    backchannel_to(broker + PATH)
    user = make_user()
    tokens = login(broker, user)
    started = time.monotonic()
    response = requests.post(keycloak_server.logout_url, timeout=10, data={
        "client_id": keycloak_server.client_id, "client_secret": keycloak_server.client_secret,
        "refresh_token": tokens["refresh_token"]})
    assert response.status_code == 204, response.text
    refused_within(broker, tokens["access_token"], started)


def test_a_logout_through_the_broker_is_refused_too(broker, make_user, backchannel_to):
    """The broker's own /api/auth/logout: Keycloak tells the broker back, so /verify refuses the access token."""
    backchannel_to(broker + PATH)
    user = make_user()
    tokens = login(broker, user)
    started = time.monotonic()
    response = requests.post(f"{broker}/api/auth/logout", json={"refresh_token": tokens["refresh_token"]}, timeout=10)
    assert response.status_code == 200
    refused_within(broker, tokens["access_token"], started)


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    return verifier, b64(hashlib.sha256(verifier.encode()).digest())


def _code(browser: requests.Session, keycloak_server, client_id: str, redirect_uri: str, challenge: str,
          user=None) -> str:
    """Drive Keycloak's authorization endpoint like a browser (its login form when `user` is given); the code."""
    page = browser.get(f"{keycloak_server.realm_url}/protocol/openid-connect/auth", timeout=30, allow_redirects=False,
                       params={"client_id": client_id, "redirect_uri": redirect_uri, "response_type": "code",
                               "scope": "openid", "state": secrets.token_urlsafe(8), "code_challenge": challenge,
                               "code_challenge_method": "S256"})
    if user is not None:
        assert page.status_code == 200, page.text[:500]
        # Browsers send the Secure cookies of http://127.0.0.1 (a secure context); requests does not.
        for cookie in browser.cookies:
            cookie.secure = False
        action = html.unescape(re.search(r'<form[^>]*action="([^"]+)"', page.text).group(1))
        page = browser.post(action, data={"username": user.username, "password": user.password}, timeout=30,
                            allow_redirects=False)
        for cookie in browser.cookies:
            cookie.secure = False
    assert page.status_code == 302, page.text[:500]
    location = page.headers["Location"]
    assert location.startswith(redirect_uri), location
    return parse_qs(urlsplit(location).query)["code"][0]


def test_a_logout_through_another_client_of_the_sso_session_is_refused(keycloak_server, kc_admin, broker, make_user,
                                                                       backchannel_to):
    """One browser SSO session shared by another client and the broker's; the other client logs out: refused."""
    backchannel_to(broker + PATH)
    user = make_user()
    other_redirect = "http://127.0.0.1:9/other-app/callback"  # never called: the test reads the redirect itself
    broker_client = kc_admin.get_client(kc_admin.get_client_id(CLIENT_ID))
    broker_redirect = broker_client["redirectUris"][0]
    with temp_client(kc_admin, standardFlowEnabled=True, directAccessGrantsEnabled=False,
                     redirectUris=[other_redirect], secret="other-app-secret-1") as other:
        browser = requests.Session()
        other_verifier, other_challenge = _pkce()
        other_code = _code(browser, keycloak_server, other, other_redirect, other_challenge, user=user)
        other_tokens = keycloak_server.token(client_id=other, client_secret="other-app-secret-1",
                                             grant_type="authorization_code", code=other_code,
                                             redirect_uri=other_redirect, code_verifier=other_verifier).json()
        verifier, challenge = _pkce()
        code = _code(browser, keycloak_server, CLIENT_ID, broker_redirect, challenge)  # SSO: no login form
        broker_tokens = keycloak_server.token(grant_type="authorization_code", code=code, redirect_uri=broker_redirect,
                                              code_verifier=verifier).json()
        access_token = broker_tokens["access_token"]
        assert claims(access_token)["sid"] == claims(other_tokens["access_token"])["sid"]
        assert verify(broker, access_token).status_code == 204
        started = time.monotonic()
        response = requests.post(keycloak_server.logout_url, timeout=10, data={
            "client_id": other, "client_secret": "other-app-secret-1", "refresh_token": other_tokens["refresh_token"]})
        assert response.status_code == 204, response.text
        refused_within(broker, access_token, started)


def test_a_logout_reaches_every_broker_sharing_redis(start_broker, redis_url, kc_admin, make_user, backchannel_to):
    """Keycloak calls one broker; another broker on the same Redis refuses the session's token within a second."""
    called = start_broker(BROKER_REDIS_URL=redis_url, BROKER_RATE_LIMITS_ENABLED="false")
    other = start_broker(BROKER_REDIS_URL=redis_url, BROKER_RATE_LIMITS_ENABLED="false", BROKER_WORKERS="2")
    backchannel_to(called + PATH)
    user = make_user()
    access_token = login(other, user)["access_token"]
    assert verify(other, access_token).status_code == 204
    started = time.monotonic()
    kc_admin.user_logout(user.id)
    assert refused_within(other, access_token, started) < 1.0
    assert verify(called, access_token).status_code == 401
    time.sleep(max(0.0, started + 1.0 - time.monotonic()))
    # A second after the logout, each of the other broker's two workers refuses it (connections land on either).
    assert [verify(other, access_token).status_code for _ in range(8)] == [401] * 8


# --- bad logout tokens --------------------------------------------------------------------------------------------


def test_bad_logout_tokens_are_400_and_change_nothing(keycloak_server, kc_admin, broker, make_user, backchannel_to,
                                                      receiver):
    """Forged, tampered, wrong-audience and replayed logout tokens made from Keycloak's own: 400, session unharmed."""
    backchannel_to(receiver.url)
    # A genuine logout token for the broker's client, captured instead of delivered: a session that really ended.
    captured_user = make_user()
    keycloak_server.password_grant(captured_user.username, captured_user.password)
    kc_admin.user_logout(captured_user.id)
    (genuine,) = receiver.wait()
    # A genuine logout token for another client of the realm (its aud is that client, not the broker's).
    with temp_client(kc_admin, attributes={URL_ATTRIBUTE: receiver.url,
                                           "backchannel.logout.session.required": "true"},
                     secret="other-app-secret-2") as other:
        other_user = make_user()
        keycloak_server.token(client_id=other, client_secret="other-app-secret-2",
                              grant_type="password", username=other_user.username, password=other_user.password)
        kc_admin.user_logout(other_user.id)
        receiver.wait(2)
    foreign = receiver.tokens[1]
    assert unb64(foreign.split(".")[1])["aud"] == other

    # The victim: a live session at the broker, whose sid and sub the forgeries name.
    victim = make_user()
    access_token = login(broker, victim)["access_token"]
    victim_claims = claims(access_token)
    header, payload, signature = genuine.split(".")
    forged_claims = {**unb64(payload), "sid": victim_claims["sid"], "sub": victim_claims["sub"],
                     "jti": secrets.token_hex(8)}
    tampered = f"{header}.{b64(json.dumps(forged_claims).encode())}.{signature}"
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signing_input = f"{header}.{b64(json.dumps(forged_claims).encode())}".encode()
    self_signed = f"{signing_input.decode()}.{b64(impostor.sign(signing_input, padding.PKCS1v15(), hashes.SHA256()))}"

    for token, message in (
        (tampered, "Logout token signature is invalid"),
        (self_signed, "Logout token signature is invalid"),
        (foreign, "Logout token is not meant for this client"),
        (access_token, "Logout token is not of type logout+jwt"),
        ("not-a-token", "Logout token is malformed"),
    ):
        response = post_logout(broker, token)
        assert (response.status_code, response.json()) == (400, {"error": "invalid_request", "message": message})
        assert response.headers["Cache-Control"] == "no-store"
        assert verify(broker, access_token).status_code == 204

    first = post_logout(broker, genuine)  # the captured token, delivered late: valid once
    assert (first.status_code, first.json()) == (200, {"message": "Logout recorded"})
    replay = post_logout(broker, genuine)
    assert (replay.status_code, replay.json()) == (
        400, {"error": "invalid_request", "message": "Logout token was already used"})
    assert verify(broker, access_token).status_code == 204
