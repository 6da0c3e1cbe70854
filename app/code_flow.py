"""The authorization code + PKCE login (BROKER_CODE_FLOW, cookie mode): Keycloak's own pages do the login.

`CodeFlow.start(return_to)` makes a login attempt: a random `state`, `nonce` and PKCE verifier (S256), and
where to go afterwards. The attempt travels in a short-lived cookie of the browser that started it, sealed
(AES-GCM under a key derived from the client secret), so only this broker can read or make one, and it
binds the callback to that browser. `CodeFlow.finish(...)` checks the callback against it: the same
`state`, not expired, not used before (each state is spent once, in Redis or this process), then redeems
the code with the verifier and checks the ID token (signature by a realm key, issuer, audience, `nonce`,
expiry). Any failure is 400 invalid_request (or Keycloak's refusal) and no session cookie is set.

`return_to` is a relative path on the broker's origin ("/app", never "//host" or "/\\host") or a URL on an
origin of BROKER_RETURN_ORIGINS: never an open redirect.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Callable
from urllib.parse import urlencode, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from joserfc import jwt
from joserfc.errors import JoseError

from app.access_tokens import _JWS_REGISTRY, ALLOWED_ALGORITHMS, SigningKeys
from app.config import Settings
from app.errors import InvalidRequest
from app.keycloak_client import KeycloakClient, TokenSet
from app.shared_store import SharedStore, SharedStoreDown

ATTEMPT_SECONDS = 600  # how long a login on Keycloak's pages may take, from /authorize to /callback


@dataclass(frozen=True)
class Attempt:
    """One login in progress, as its cookie carries it."""

    state: str
    nonce: str
    verifier: str
    return_to: str
    expires: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class CodeFlow:
    """Starts and finishes code + PKCE logins for one realm client."""

    def __init__(self, settings: Settings, keycloak: KeycloakClient, keys: SigningKeys,
                 store: SharedStore | None = None, clock: Callable[[], float] = time.time):
        self._settings = settings
        self._keycloak = keycloak
        self._keys = keys
        self._store = store
        self._clock = clock
        self._key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"token-broker/code-flow",
                         info=b"attempt-cookie").derive(settings.client_secret.encode())
        self._spent: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    # --- start ---------------------------------------------------------------------------------------------

    def allowed_return(self, return_to: str | None) -> str:
        """Where the callback may send the browser: a relative path, or a URL on an allowed origin."""
        target = (return_to or "/").strip()
        if len(target) > 2048 or any(c in target for c in "\r\n\t\\") or not target.isprintable():
            raise InvalidRequest("return_to must be a path on this site or a URL on an allowed origin")
        if target.startswith("/") and not target.startswith("//"):
            return target
        parts = urlsplit(target)
        origin = f"{parts.scheme}://{parts.netloc}".lower()
        if parts.scheme in ("http", "https") and origin in self._settings.return_origins:
            return target
        raise InvalidRequest("return_to must be a path on this site or a URL on an allowed origin")

    def start(self, return_to: str | None) -> tuple[str, str]:
        """The URL of Keycloak's login page for a new attempt, and the sealed cookie value that carries it."""
        attempt = Attempt(state=secrets.token_urlsafe(32), nonce=secrets.token_urlsafe(32),
                          verifier=secrets.token_urlsafe(64), return_to=self.allowed_return(return_to),
                          expires=self._clock() + ATTEMPT_SECONDS)
        challenge = _b64(hashlib.sha256(attempt.verifier.encode()).digest())
        query = urlencode({
            "response_type": "code", "client_id": self._settings.client_id,
            "redirect_uri": self._settings.callback_url, "scope": self._settings.login_scope,
            "state": attempt.state, "nonce": attempt.nonce,
            "code_challenge": challenge, "code_challenge_method": "S256",
        })
        return f"{self._keycloak.discovery()['authorization_endpoint']}?{query}", self._seal(attempt)

    # --- finish --------------------------------------------------------------------------------------------

    def finish(self, sealed: str | None, *, state: str | None, code: str | None,
               error: str | None = None) -> tuple[TokenSet, str]:
        """The tokens of a completed login and where to send the browser; raise InvalidRequest otherwise."""
        attempt = self._open(sealed)
        if not state or not secrets.compare_digest(state, attempt.state):
            raise InvalidRequest("The login callback does not belong to a login this browser started")
        if attempt.expires <= self._clock():
            raise InvalidRequest("The login took too long; start it again")
        if not self._spend(attempt.state):
            raise InvalidRequest("This login callback was used already; start the login again")
        if error:
            raise InvalidRequest(f"The identity provider did not complete the login ({error[:64]})")
        if not code:
            raise InvalidRequest("The login callback carries no code")
        tokens = self._keycloak.exchange_code(code, attempt.verifier, self._settings.callback_url)
        self._check_id_token(tokens.id_token, attempt.nonce)
        return tokens, attempt.return_to

    def _check_id_token(self, id_token: str | None, nonce: str) -> None:
        """The ID token must be the realm's, for this client, unexpired, and carry this attempt's nonce."""
        refused = InvalidRequest("The identity provider's ID token does not match this login")
        try:
            header = json.loads(base64.urlsafe_b64decode((id_token or "").split(".")[0] + "=="))
        except (ValueError, IndexError):
            raise refused from None
        algorithm, kid = header.get("alg"), header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None or algorithm not in ALLOWED_ALGORITHMS or key.algorithm != algorithm:
            raise refused
        try:
            claims: dict[str, Any] = jwt.decode(id_token, key.key, algorithms=[algorithm],
                                                registry=_JWS_REGISTRY).claims
        except (JoseError, ValueError, TypeError):
            raise refused from None
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        now, leeway = self._clock(), self._settings.token_leeway
        if (claims.get("iss") != self._keycloak.discovery()["issuer"] or self._settings.client_id not in audiences
                or not isinstance(claims.get("nonce"), str) or not secrets.compare_digest(claims["nonce"], nonce)
                or not isinstance(claims.get("exp"), (int, float)) or claims["exp"] <= now - leeway):
            raise refused

    # --- the attempt cookie and spent states ---------------------------------------------------------------

    def _seal(self, attempt: Attempt) -> str:
        nonce = os.urandom(12)
        return _b64(nonce + AESGCM(self._key).encrypt(nonce, json.dumps(asdict(attempt)).encode(), b"attempt"))

    def _open(self, sealed: str | None) -> Attempt:
        try:
            blob = base64.urlsafe_b64decode((sealed or "") + "=" * (-len(sealed or "") % 4))
            payload = json.loads(AESGCM(self._key).decrypt(blob[:12], blob[12:], b"attempt"))
            return Attempt(**payload)
        except (InvalidTag, ValueError, TypeError):
            raise InvalidRequest("The login callback does not belong to a login this browser started") from None

    def _spend(self, state: str) -> bool:
        """Mark a state used; False when it was used before (a replayed callback)."""
        name = hashlib.sha256(b"token-broker/code-flow/state\x00" + state.encode()).hexdigest()
        if self._store is not None:
            try:
                return bool(self._store.call(lambda r: r.set(f"token-broker:code-state:{name}", "1", nx=True,
                                                             ex=ATTEMPT_SECONDS)))
            except SharedStoreDown:
                pass  # this process's memory still refuses a replay that reaches it
        with self._lock:
            now = self._clock()
            while self._spent and next(iter(self._spent.values())) <= now:
                self._spent.popitem(last=False)
            if name in self._spent:
                return False
            self._spent[name] = now + ATTEMPT_SECONDS
            return True
