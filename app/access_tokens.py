"""Local validation of Keycloak access tokens: the realm's signing keys, kept and refetched carefully.

`SigningKeys` holds the realm's JWKS. Keys are fetched once and kept; an unknown `kid` triggers at most
one refetch at a time (single-flight) and never more often than `min_refetch_interval`; keys older than
`max_age` are refreshed by one request while the others go on with the keys in hand; and when Keycloak
cannot be reached, the keys in hand keep working.

`AccessTokenValidator` checks a bearer token with joserfc (see docs/architecture.md for why): compact
JWS shape and size, an asymmetric algorithm that matches the key's own, the signature, `iss`, `typ`
(an access token, not a refresh or ID token), `exp`/`nbf`/`iat` with leeway, and optionally `aud`/`azp`.

`LogoutTokenValidator` checks the logout tokens Keycloak posts to /api/auth/backchannel-logout the same way
(same keys, same algorithms), then as OpenID Connect Back-Channel Logout 1.0 section 2.6 says, `jti` single use.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry
from joserfc.jws import JWSRegistry

from app.errors import BrokerError, InvalidRequest, InvalidToken, UpstreamUnavailable
from app.metrics import KEY_FETCHES

log = logging.getLogger(__name__)

# Asymmetric algorithms only: never "none", never an HMAC (an HMAC "verified" with a public key is forgeable).
ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
# joserfc allows only its "recommended" algorithms by default; a realm may sign with any of ours.
_JWS_REGISTRY = JWSRegistry(algorithms=sorted(ALLOWED_ALGORITHMS), strict_check_header=False)
MAX_TOKEN_BYTES = 8192
MAX_HEADER_BYTES = 1024


@dataclass(frozen=True)
class SigningKey:
    """One verification key of the realm, with the one algorithm it may be used with."""

    kid: str
    algorithm: str
    key: Any


def parse_jwks(document: Any) -> dict[str, SigningKey]:
    """The signature keys of a JWKS document by kid; encryption keys and unusable entries are skipped."""
    keys: dict[str, SigningKey] = {}
    entries = document.get("keys") if isinstance(document, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        kid, algorithm = entry.get("kid"), entry.get("alg")
        if not isinstance(kid, str) or not isinstance(algorithm, str) or algorithm not in ALLOWED_ALGORITHMS:
            continue
        try:
            keys[kid] = SigningKey(kid, algorithm, JWKRegistry.import_key(entry))
        except (JoseError, ValueError, TypeError):
            log.warning("skipping an unusable key (kid=%s) in the realm's JWKS", kid)
    return keys


class SigningKeys:
    """The realm's signing keys: fetched once, refetched on an unknown kid (single-flight, rate-bounded).

    The minimum interval gates refetches that could be driven by callers: those for an unknown kid, and
    any attempt after a failed one. The first fetch and the periodic refresh do not start the clock, so
    the first token signed with a newly rotated key right after start-up is still recognised.
    """

    def __init__(
        self,
        fetch: Callable[[], Any],
        *,
        min_refetch_interval: float,
        max_age: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._fetch = fetch
        self._min_interval = min_refetch_interval
        self._max_age = max_age
        self._clock = clock
        self._keys: dict[str, SigningKey] | None = None
        self._fetched_at = float("-inf")
        self._gate = float("-inf")  # when the last caller-driven or failed fetch happened
        self._lock = threading.Lock()

    def ready(self) -> bool:
        """True when keys are in hand (fetching them first if there are none and a fetch is due)."""
        if self._keys is None:
            self._refetch(wanted=None)
        return bool(self._keys)

    def get(self, kid: str) -> SigningKey | None:
        """The key for `kid`, refetching the JWKS when it is unknown; raise UpstreamUnavailable if there are no keys."""
        keys = self._keys
        if keys is not None and self._clock() - self._fetched_at > self._max_age:
            self._refresh_in_passing()
            keys = self._keys
        if keys is not None and kid in keys:
            return keys[kid]
        self._refetch(wanted=kid)
        if self._keys is None:
            raise UpstreamUnavailable("The realm's signing keys are not available yet")
        return self._keys.get(kid)

    def _refresh_in_passing(self) -> None:
        """Old keys: one caller refetches, the others carry on with the keys in hand."""
        if self._clock() - self._gate < self._min_interval:
            return  # a fetch failed (or was caller-driven) a moment ago: don't retry on every request
        if self._lock.acquire(blocking=False):
            try:
                if self._clock() - self._fetched_at > self._max_age:
                    self._fetch_now(caller_driven=False)
            finally:
                self._lock.release()

    def _refetch(self, wanted: str | None) -> None:
        with self._lock:  # single-flight: callers queue here and find the fresh keys afterwards
            if self._keys is not None and (wanted is None or wanted in self._keys):
                return
            if self._clock() - self._gate < self._min_interval:
                return
            self._fetch_now(caller_driven=self._keys is not None)

    def _fetch_now(self, *, caller_driven: bool) -> None:
        if caller_driven:
            self._gate = self._clock()
        try:
            keys = parse_jwks(self._fetch())
        except BrokerError as exc:
            self._gate = self._clock()
            KEY_FETCHES.labels("failed").inc()
            log.warning("could not fetch the realm's signing keys (%s); keeping the %d in hand",
                        exc.error, len(self._keys or {}))
            return
        if not keys:
            self._gate = self._clock()
            KEY_FETCHES.labels("unusable").inc()
            log.error("the realm's JWKS has no usable signature key; keeping the %d in hand", len(self._keys or {}))
            return
        KEY_FETCHES.labels("ok").inc()
        self._keys = keys
        self._fetched_at = self._clock()


@dataclass(frozen=True)
class TokenPolicy:
    """What a valid access token must satisfy besides its signature."""

    issuer: str
    leeway: int = 10
    audiences: frozenset[str] = frozenset()
    authorized_parties: frozenset[str] = frozenset()


class AccessTokenValidator:
    """Validates bearer tokens against the realm's keys and a TokenPolicy; raises InvalidToken.

    `policy` builds the TokenPolicy; it is called on the first validation (the issuer comes from Keycloak's
    discovery document, which may not be reachable at start-up) and its result kept.
    """

    def __init__(self, keys: SigningKeys, policy: Callable[[], TokenPolicy], clock: Callable[[], float] = time.time):
        self.keys = keys
        self._build_policy = policy
        self._policy: TokenPolicy | None = None
        self._clock = clock

    def policy(self) -> TokenPolicy:
        """The policy tokens are held to; raise BrokerError while it cannot be built (no discovery yet)."""
        if self._policy is None:
            self._policy = self._build_policy()
        return self._policy

    def validate(self, token: str) -> dict[str, Any]:
        """The token's claims if it is a valid access token of the realm; raise InvalidToken otherwise."""
        _, claims = _verified(token, self.keys, "Access token", InvalidToken)
        self._check_claims(claims, self.policy())
        return claims

    def _check_claims(self, claims: dict[str, Any], policy: TokenPolicy) -> None:
        faults: list[str] = []
        if claims.get("iss") != policy.issuer:
            faults.append("Access token was issued by another issuer")
        if claims.get("typ") != "Bearer":
            faults.append("Token is not an access token")
        now = self._clock()
        for name in ("exp", "iat"):
            if not _is_number(claims.get(name)):
                faults.append(f"Access token has no valid '{name}' claim")
        if _is_number(claims.get("iat")) and claims["iat"] > now + policy.leeway:
            faults.append("Access token was issued in the future")
        if claims.get("nbf") is not None and (not _is_number(claims["nbf"]) or claims["nbf"] > now + policy.leeway):
            faults.append("Access token is not valid yet")
        if policy.audiences and not policy.audiences & _as_set(claims.get("aud")):
            faults.append("Access token is not meant for this audience")
        if policy.authorized_parties and claims.get("azp") not in policy.authorized_parties:
            faults.append("Access token was issued to a client that is not accepted")
        expired = _is_number(claims.get("exp")) and claims["exp"] <= now - policy.leeway
        if faults:
            raise InvalidToken(faults[0])
        if expired:
            raise InvalidToken("Access token expired", expired=True)


# OpenID Connect Back-Channel Logout 1.0: the event a logout token must carry, and its explicit type (section 2.4:
# "logout+jwt"; RFC 7515 lets the "application/" prefix be left out, and media types compare case-insensitively).
LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
LOGOUT_JWT_TYPES = frozenset({"logout+jwt", "application/logout+jwt"})
# Keycloak's own claim; an access, ID or refresh token says "Bearer", "ID" or "Refresh" there.
KEYCLOAK_LOGOUT_TYP = "Logout"
# A logout token older than this (by its iat) is refused, so its jti need not be remembered longer.
LOGOUT_MAX_AGE = 600.0


@dataclass(frozen=True)
class LogoutTokenPolicy:
    """What a valid logout token must satisfy besides its signature."""

    issuer: str
    client_id: str
    leeway: int = 10
    max_age: float = LOGOUT_MAX_AGE


class LogoutTokenValidator:
    """Validates Keycloak's back-channel logout tokens (OIDC Back-Channel Logout 1.0, section 2.6); raises InvalidRequest.

    The signature is checked as for access tokens (the same SigningKeys, the same algorithm allowlist). Then:
    `typ` in the header, when there, is logout+jwt; `iss` is the realm; `aud` names the broker's client; `iat`
    is there, not in the future and at most `max_age` old; `exp`, when there, has not passed; `events` holds the
    back-channel logout event; there is no `nonce`; `sid` and/or `sub` name what ended; `jti` is there and used
    once: `first_use(jti, until)` records it until the token could no longer be accepted anyway, and says False
    when it was seen before (in Redis when there is one, see app/ended_sessions.py).
    """

    def __init__(self, keys: SigningKeys, policy: Callable[[], LogoutTokenPolicy],
                 first_use: Callable[[str, float], bool], clock: Callable[[], float] = time.time):
        self.keys = keys
        self._build_policy = policy
        self._policy: LogoutTokenPolicy | None = None
        self._first_use = first_use
        self._clock = clock

    def policy(self) -> LogoutTokenPolicy:
        """The policy logout tokens are held to; raise BrokerError while it cannot be built (no discovery yet)."""
        if self._policy is None:
            self._policy = self._build_policy()
        return self._policy

    def validate(self, token: str) -> dict[str, Any]:
        """The claims of a valid logout token seen for the first time; raise InvalidRequest otherwise.

        A valid token is spent by this call: the same token again is refused as a replay.
        """
        if token.split() != [token]:
            raise InvalidRequest("Logout token is malformed")
        header, claims = _verified(token, self.keys, "Logout token", InvalidRequest)
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in LOGOUT_JWT_TYPES):
            raise InvalidRequest("Logout token is not of type logout+jwt")
        policy = self.policy()
        fault = self._fault(claims, policy)
        if fault is not None:
            raise InvalidRequest(fault)
        until = claims["iat"] + policy.max_age
        if claims.get("exp") is not None:
            until = min(until, claims["exp"])
        if not self._first_use(claims["jti"], until + policy.leeway):
            raise InvalidRequest("Logout token was already used")
        return claims

    def _fault(self, claims: dict[str, Any], policy: LogoutTokenPolicy) -> str | None:
        """The first thing wrong with the claims, in the order of the spec's section 2.6, or None."""
        now = self._clock()
        if claims.get("iss") != policy.issuer:
            return "Logout token was issued by another issuer"
        if policy.client_id not in _as_set(claims.get("aud")):
            return "Logout token is not meant for this client"
        if not _is_number(claims.get("iat")):
            return "Logout token has no valid 'iat' claim"
        if claims["iat"] > now + policy.leeway:
            return "Logout token was issued in the future"
        if claims["iat"] < now - policy.max_age - policy.leeway:
            return "Logout token is too old"
        if claims.get("exp") is not None and not _is_number(claims["exp"]):
            return "Logout token has no valid 'exp' claim"
        if claims.get("exp") is not None and claims["exp"] <= now - policy.leeway:
            return "Logout token expired"
        if claims.get("nbf") is not None and (not _is_number(claims["nbf"]) or claims["nbf"] > now + policy.leeway):
            return "Logout token is not valid yet"
        if claims.get("typ", KEYCLOAK_LOGOUT_TYP) != KEYCLOAK_LOGOUT_TYP:
            return "Token is not a logout token"
        events = claims.get("events")
        if not isinstance(events, dict) or not isinstance(events.get(LOGOUT_EVENT), dict):
            return "Logout token has no back-channel logout event"
        if "nonce" in claims:
            return "Logout token must not have a 'nonce' claim"
        sid, sub = claims.get("sid"), claims.get("sub")
        if any(value is not None and (not isinstance(value, str) or not value) for value in (sid, sub)):
            return "Logout token has a malformed 'sid' or 'sub' claim"
        if sid is None and sub is None:
            return "Logout token names neither a session ('sid') nor a subject ('sub')"
        if not isinstance(claims.get("jti"), str) or not claims["jti"]:
            return "Logout token has no valid 'jti' claim"
        return None


def _verified(token: str, keys: SigningKeys, noun: str, refuse: Callable[[str], BrokerError]
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims of a compact JWS signed by one of the realm's keys; raise `refuse(sentence)` otherwise.

    `noun` starts every sentence ("Access token", "Logout token"); UpstreamUnavailable while there are no keys.
    """
    header = _header(token, noun, refuse)
    algorithm, kid = header.get("alg"), header.get("kid")
    if not isinstance(algorithm, str) or algorithm not in ALLOWED_ALGORITHMS:
        raise refuse(f"{noun} uses a signature algorithm that is not accepted")
    if not isinstance(kid, str) or not kid:
        raise refuse(f"{noun} names no signing key")
    key = keys.get(kid)
    if key is None:
        raise refuse(f"{noun} was signed with an unknown key")
    if key.algorithm != algorithm:
        raise refuse(f"{noun}'s algorithm does not match its key")
    try:
        claims = jwt.decode(token, key.key, algorithms=[key.algorithm], registry=_JWS_REGISTRY).claims
    except (JoseError, ValueError, TypeError):
        raise refuse(f"{noun} signature is invalid") from None
    if not isinstance(claims, dict):
        raise refuse(f"{noun} is malformed")
    return header, claims


def _header(token: str, noun: str, refuse: Callable[[str], BrokerError]) -> dict[str, Any]:
    if len(token) > MAX_TOKEN_BYTES:
        raise refuse(f"{noun} is too large")
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise refuse(f"{noun} is malformed")
    if len(parts[0]) > MAX_HEADER_BYTES:
        raise refuse(f"{noun} header is too large")
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise refuse(f"{noun} is malformed") from None
    if not isinstance(header, dict):
        raise refuse(f"{noun} is malformed")
    return header


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_set(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, str)}
    return set()


class Introspection:
    """BROKER_TOKEN_INTROSPECTION: asks Keycloak whether a token is still active, caching each verdict briefly.

    Entries are keyed by a SHA-256 of the token (the token itself is never kept), live `ttl` seconds and
    are bounded in number, the oldest going first.
    """

    def __init__(
        self,
        introspect: Callable[[str], bool],
        *,
        ttl: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._introspect = introspect
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._verdicts: OrderedDict[bytes, tuple[bool, float]] = OrderedDict()
        self._lock = threading.Lock()

    def active(self, token: str) -> bool:
        """True while Keycloak says the token's session lives; raise BrokerError when Keycloak cannot say."""
        key = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        with self._lock:
            cached = self._verdicts.get(key)
            if cached is not None and cached[1] > now:
                return cached[0]
        verdict = self._introspect(token)
        with self._lock:
            self._verdicts[key] = (verdict, now + self._ttl)
            self._verdicts.move_to_end(key)
            while len(self._verdicts) > self._max_entries:
                self._verdicts.popitem(last=False)
        return verdict
