"""Accounts: registration through the admin API, the pending actions of a held-back account, IP binding.

`Registration.register` creates the user (enabled, no credentials), sets its password (never temporary)
and logs it in; if setting the password or the login fails, the user is deleted again before the error
reaches the caller, so there is never a half-created account. Keycloak itself checks the password against
the realm's policy and the username and email against the accounts it has.

`setup_message` turns a held-back account's required actions into the sentence of 401
account_setup_required. Keycloak answers "Account is not fully set up" only to the right password (a wrong
one gets "Invalid user credentials", tests/integration/test_keycloak_probes.py), so naming the actions tells
a guesser nothing new.

`SessionAddresses` (BROKER_IP_BINDING) remembers, per Keycloak session (`sid`), the client address or
network its login came from, in Redis when there is one (so every instance sees it) or in this process,
for as long as the session's refresh token lives; a refresh from elsewhere is refused before it reaches
Keycloak. A store that fails lets the refresh through: an outage must not log anybody out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from app.errors import AccountSetupRequired
from app.keycloak_client import KeycloakClient, TokenSet
from app.shared_store import SharedStore, SharedStoreDown

log = logging.getLogger(__name__)


def unverified_claims(jwt: str | None) -> dict[str, Any]:
    """The payload of a JWT, not checked: for reading `sid`/`sub` of tokens Keycloak just sent or will check."""
    try:
        payload = (jwt or "").split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        return {}
    return claims if isinstance(claims, dict) else {}


@dataclass(frozen=True)
class Registered:
    """A new account and the tokens of its first login."""

    sub: str
    username: str
    email: str
    tokens: TokenSet


class Registration:
    """POST /api/auth/register: create, set the password, log in; undo the creation if a later step fails."""

    def __init__(self, keycloak: KeycloakClient, *, email_verified: bool, login_scope: str):
        self._keycloak = keycloak
        self._email_verified = email_verified
        self._login_scope = login_scope

    def register(self, *, username: str, email: str, password: str, given_name: str | None = None,
                 family_name: str | None = None) -> Registered:
        """The new account, logged in; raise UserExists, InvalidPassword, InvalidRequest or the login's error."""
        user_id = self._keycloak.create_user(username=username, email=email, first_name=given_name,
                                             last_name=family_name, email_verified=self._email_verified)
        try:
            self._keycloak.set_password(user_id, password)
            tokens = self._keycloak.login(username, password, self._login_scope)
        except BaseException:
            self._undo(user_id)
            raise
        claims = unverified_claims(tokens.access_token)
        return Registered(sub=str(claims.get("sub") or user_id),
                          username=str(claims.get("preferred_username") or username.lower()),
                          email=str(claims.get("email") or email.lower()), tokens=tokens)

    def _undo(self, user_id: str) -> None:
        try:
            self._keycloak.delete_user(user_id)
        except Exception:  # noqa: BLE001 - the caller gets the original error; the operator gets this line
            log.error("a registration failed after its user was created, and deleting the user failed too: "
                      "user id %s must be deleted by hand", user_id)
            return
        log.info("a registration failed after its user was created; the user was deleted again")


# Keycloak's required-action ids and what the user has to do for each (pairs, not a dict literal: bandit's
# B105 would read the key UPDATE_PASSWORD as a hard-coded password).
REQUIRED_ACTIONS = dict((
    ("UPDATE_PASSWORD", "choose a new password"),
    ("VERIFY_EMAIL", "verify the email address"),
    ("CONFIGURE_TOTP", "set up one-time codes"),
    ("UPDATE_PROFILE", "complete the profile"),
    ("TERMS_AND_CONDITIONS", "accept the terms and conditions"),
    ("UPDATE_EMAIL", "update the email address"),
    ("webauthn-register", "register a security key"),
    ("webauthn-register-passwordless", "register a passkey"),
    ("delete_credential", "confirm a credential removal"),
    ("VERIFY_PROFILE", "complete the profile"),
))


def setup_message(actions: list[str]) -> str:
    """The 401 account_setup_required sentence, naming what is pending when Keycloak said."""
    order = list(REQUIRED_ACTIONS)
    ranked = sorted(actions, key=lambda a: order.index(a) if a in REQUIRED_ACTIONS else len(order))
    steps = list(dict.fromkeys(REQUIRED_ACTIONS.get(a, "finish a pending step") for a in ranked))
    if not steps:
        return AccountSetupRequired.message
    listed = steps[0] if len(steps) == 1 else ", ".join(steps[:-1]) + " and " + steps[-1]
    return f"Account is not fully set up: {listed} in the account console, then log in again"


def network_of(address: str, mode: str) -> str:
    """What BROKER_IP_BINDING compares: the address itself ("address"), or its /24 or /48 ("prefix")."""
    if mode != "prefix":
        return address
    try:
        network = ipaddress.ip_network(address, strict=False)
    except ValueError:
        return address
    prefix = 24 if network.version == 4 else 48
    return str(network.supernet(new_prefix=prefix)) if network.prefixlen > prefix else str(network)


class SessionAddresses:
    """Where each Keycloak session logged in from: Redis (every instance) or this process (bounded)."""

    PREFIX = "token-broker:ip-binding:"

    def __init__(self, store: SharedStore | None, *, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        self._store = store
        self._local: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()

    @staticmethod
    def _key(sid: str) -> str:
        return hashlib.sha256(b"token-broker/ip-binding\x00" + sid.encode()).hexdigest()

    def remember(self, sid: str, network: str, ttl: float) -> None:
        """Note (or renew) the session's network for `ttl` seconds; a failing store is logged, not raised."""
        key, ttl = self._key(sid), max(1.0, ttl)
        if self._store is not None:
            try:
                self._store.call(lambda r: r.set(self.PREFIX + key, network, px=int(ttl * 1000)))
            except SharedStoreDown:
                log.warning("could not record a session's address (Redis is out); its refreshes are not bound")
            return
        with self._lock:
            self._local[key] = (network, self._clock() + ttl)
            self._local.move_to_end(key)
            while len(self._local) > self._max_entries:
                self._local.popitem(last=False)

    def allows(self, sid: str, network: str) -> bool:
        """False only when the session is known to have logged in from another network."""
        key = self._key(sid)
        if self._store is not None:
            try:
                known = self._store.call(lambda r: r.get(self.PREFIX + key))
            except SharedStoreDown:
                return True  # an outage must not log anybody out
            return known is None or known.decode() == network
        with self._lock:
            entry = self._local.get(key)
        return entry is None or entry[1] <= self._clock() or entry[0] == network
