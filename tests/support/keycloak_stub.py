"""Keycloak's HTTP faked by `responses`: the faked realm's URLs and tokens, and a stub that says what Keycloak does."""

from __future__ import annotations

import functools
import json
from urllib.parse import parse_qs

import requests
import responses

from tests.support.realm_keys import RealmKeys

KEYCLOAK = "http://keycloak.test:8080"  # tests/support/realm_keys.ISSUER is this realm
REALM_URL = f"{KEYCLOAK}/realms/demo"
TOKEN_URL = f"{REALM_URL}/protocol/openid-connect/token"
LOGOUT_URL = f"{REALM_URL}/protocol/openid-connect/logout"
DISCOVERY_URL = f"{REALM_URL}/.well-known/openid-configuration"
AUTHORIZATION_URL = f"{REALM_URL}/protocol/openid-connect/auth"
JWKS_URL = f"{REALM_URL}/protocol/openid-connect/certs"
INTROSPECTION_URL = f"{TOKEN_URL}/introspect"
SECRET = "stub-client-secret-4f9a"

KEYCLOAK_TOKENS = {
    "access_token": "access.token.value",
    "expires_in": 300,
    "refresh_expires_in": 1800,
    "refresh_token": "refresh.token.value",
    "token_type": "Bearer",
    "id_token": "id.token.value",
    "not-before-policy": 0,
    "session_state": "5e0c0f0a-session",
    "scope": "openid profile email",
}
CONTRACT_TOKENS = {k: v for k, v in KEYCLOAK_TOKENS.items() if k not in ("not-before-policy", "session_state")}


@functools.cache
def _shared_realm_keys() -> RealmKeys:
    """One key pair for every test that does not rotate keys (RSA generation is slow)."""
    return RealmKeys()


class KeycloakStub:
    """Says what the faked Keycloak does; every method registers one answer of the realm's endpoints."""

    def __init__(self, mock: responses.RequestsMock, realm_keys: RealmKeys | None = None):
        self.mock = mock
        self.realm_keys = realm_keys or _shared_realm_keys()
        self.mock.get(
            DISCOVERY_URL,
            json={
                "issuer": REALM_URL,
                "token_endpoint": TOKEN_URL,
                "end_session_endpoint": LOGOUT_URL,
                "jwks_uri": JWKS_URL,
                "introspection_endpoint": INTROSPECTION_URL,
                "authorization_endpoint": AUTHORIZATION_URL,
            },
        )
        # The JWKS is read when asked, so a rotation of realm_keys shows at the next fetch.
        self.mock.add_callback(
            responses.GET, JWKS_URL, callback=lambda _: (200, {}, json.dumps(self.realm_keys.jwks())),
            content_type="application/json",
        )

    def introspects(self, active: bool) -> None:
        """The introspection endpoint answers whether the token is active."""
        self.mock.post(INTROSPECTION_URL, json={"active": active})

    def calls_to(self, url: str) -> int:
        """How many requests reached `url`."""
        return sum(1 for call in self.mock.calls if call.request.url == url)

    def issues_tokens(self, body: dict | None = None) -> None:
        """The token endpoint answers 200 with a token response."""
        self.mock.post(TOKEN_URL, json=KEYCLOAK_TOKENS if body is None else body)

    def refuses(self, status: int, error: str, description: str | None = None, url: str = TOKEN_URL) -> None:
        """The endpoint answers an OAuth error body."""
        body = {"error": error}
        if description is not None:
            body["error_description"] = description
        self.mock.post(url, status=status, json=body)

    def answers(self, status: int, body: str, content_type: str, url: str = TOKEN_URL) -> None:
        """The endpoint answers a raw body (an HTML page from a proxy, say)."""
        self.mock.post(url, status=status, body=body, content_type=content_type)

    def fails(self, exc: Exception, url: str = TOKEN_URL) -> None:
        """The HTTP call itself fails (connection refused, timeout)."""
        self.mock.post(url, body=exc)

    def logs_out(self) -> None:
        """The logout endpoint answers 204, as Keycloak does."""
        self.mock.post(LOGOUT_URL, status=204)

    def is_down(self) -> None:
        """Nothing answers at Keycloak's address, discovery included."""
        self.mock.reset()
        self.mock.get(DISCOVERY_URL, body=requests.ConnectionError("refused"))
        self.mock.get(JWKS_URL, body=requests.ConnectionError("refused"))

    def token_calls(self, url: str = TOKEN_URL) -> list[dict[str, str]]:
        """The forms the broker posted to `url`, in order."""
        return [
            {k: v[0] for k, v in parse_qs(call.request.body).items()}
            for call in self.mock.calls
            if call.request.url == url
        ]


def body_of(response) -> dict:
    """The JSON body of a test-client response, parsed strictly."""
    return json.loads(response.get_data(as_text=True))
