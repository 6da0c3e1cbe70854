"""Benchmark: the cost of verifying one Keycloak-sized RS256 access token with each candidate JOSE library.

Usage: .venv/bin/python bench/jose_verify.py [iterations]
Needs the candidates installed (pip install pyjwt joserfc jwcrypto); prints microseconds per verify.
"""

from __future__ import annotations

import json
import sys
import time

from cryptography.hazmat.primitives.asymmetric import rsa

ITERATIONS = int(sys.argv[1]) if len(sys.argv) > 1 else 3000


def keycloak_like_claims() -> dict:
    now = int(time.time())
    return {
        "exp": now + 300, "iat": now, "jti": "onrtac:6f1f8f3e-0f7e-4a34-9b9b-1c1d2f3a4b5c",
        "iss": "http://127.0.0.1:8080/realms/demo", "aud": "account", "sub": "0b2f0d3e-8c1b-4d58-9b7d-3c4d5e6f7a8b",
        "typ": "Bearer", "azp": "token-broker", "sid": "5e0c0f0a-1b2c-3d4e-5f60-718293a4b5c6", "acr": "1",
        "realm_access": {"roles": ["default-roles-demo", "offline_access", "uma_authorization", "user", "admin"]},
        "resource_access": {"account": {"roles": ["manage-account", "manage-account-links", "view-profile"]}},
        "scope": "openid email profile", "email_verified": True, "name": "Bob Builder",
        "preferred_username": "bob", "given_name": "Bob", "family_name": "Builder", "email": "bob@example.com",
    }


def timed(name: str, verify) -> None:
    verify()  # warm up and prove it works
    start = time.perf_counter()
    for _ in range(ITERATIONS):
        verify()
    per_call = (time.perf_counter() - start) / ITERATIONS * 1e6
    print(f"{name:10s} {per_call:8.1f} µs/verify")


def main() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = keycloak_like_claims()
    header = {"kid": "k1", "typ": "JWT"}

    import jwt

    token = jwt.encode(claims, key, algorithm="RS256", headers=header)
    print(f"token: {len(token)} bytes, RS256 2048-bit, {ITERATIONS} iterations")
    public = key.public_key()
    timed("pyjwt", lambda: jwt.decode(token, public, algorithms=["RS256"], issuer=claims["iss"],
                                      options={"verify_aud": False, "require": ["exp", "iat"]}))

    from joserfc import jwt as rfc_jwt
    from joserfc.jwk import RSAKey

    rfc_key = RSAKey.import_key(public)
    registry = rfc_jwt.JWTClaimsRegistry(iss={"essential": True, "value": claims["iss"]}, exp={"essential": True})

    def joserfc_verify():
        decoded = rfc_jwt.decode(token, rfc_key, algorithms=["RS256"])
        registry.validate(decoded.claims)
        return decoded.claims

    timed("joserfc", joserfc_verify)

    from jwcrypto import jwk as jc_jwk, jwt as jc_jwt

    jc_key = jc_jwk.JWK.from_pyca(public)
    timed("jwcrypto", lambda: json.loads(jc_jwt.JWT(jwt=token, key=jc_key, algs=["RS256"]).claims))


if __name__ == "__main__":
    main()
