"""Locally generated realm signing keys and Keycloak-shaped access tokens for unit and API tests."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

from joserfc import jwt
from joserfc.jwk import RSAKey

ISSUER = "http://keycloak.test:8080/realms/demo"


def b64(data: dict | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class RealmKeys:
    """An RSA signing key (and optionally more) published as a JWKS, and a minter of tokens signed with it."""

    def __init__(self, kid: str = "key-1"):
        self.keys = {kid: RSAKey.generate_key(2048, parameters={"kid": kid, "alg": "RS256", "use": "sig"})}
        self.current = kid
        self._encryption_key = RSAKey.generate_key(
            2048, parameters={"kid": "enc-1", "alg": "RSA-OAEP", "use": "enc"}, private=False
        )

    def rotate(self, kid: str) -> None:
        """Add a new key and sign with it from now on (the old one stays published)."""
        self.keys[kid] = RSAKey.generate_key(2048, parameters={"kid": kid, "alg": "RS256", "use": "sig"})
        self.current = kid

    def jwks(self) -> dict:
        """The public JWKS, with an encryption key beside the signature keys, as Keycloak serves it."""
        signing = [k.as_dict(private=False) for k in self.keys.values()]
        return {"keys": signing + [self._encryption_key.as_dict(private=False)]}

    def claims(self, **overrides: Any) -> dict:
        """Keycloak-shaped access-token claims for bob, valid for five minutes."""
        now = int(time.time())
        claims = {
            "exp": now + 300, "iat": now, "jti": "jti-1", "iss": ISSUER, "aud": ["token-broker", "account"],
            "sub": "0b2f0d3e-bob", "typ": "Bearer", "azp": "token-broker", "sid": "sid-1",
            "realm_access": {"roles": ["user", "admin", "default-roles-demo"]},
            "resource_access": {"account": {"roles": ["view-profile", "manage-account"]}},
            "scope": "openid email profile", "email_verified": True, "name": "Bob Builder",
            "preferred_username": "bob", "given_name": "Bob", "family_name": "Builder", "email": "bob@example.com",
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, kid: str | None = None, header: dict | None = None, **claims: Any) -> str:
        """A token signed with the current key (or `kid`), with claims overriding the defaults."""
        kid = kid or self.current
        header = {"alg": "RS256", "typ": "JWT", "kid": kid, **(header or {})}
        return jwt.encode(header, self.claims(**claims), self.keys[kid], algorithms=[header["alg"]])

    def hmac_token_with_public_key(self) -> str:
        """The classic confusion attack: HS256 'signed' with the RSA public key as the HMAC secret."""
        public_pem = self.keys[self.current].as_pem(private=False)
        signing_input = f"{b64({'alg': 'HS256', 'kid': self.current})}.{b64(self.claims())}"
        signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64(signature)}"

    def with_header(self, header: dict) -> str:
        """A valid token whose header is swapped for `header` (the signature no longer matches)."""
        _, payload, signature = self.token().split(".")
        return f"{b64(header)}.{payload}.{signature}"

    def unsigned_token(self) -> str:
        """alg: none, no signature."""
        return f"{b64({'alg': 'none', 'kid': self.current})}.{b64(self.claims())}."
