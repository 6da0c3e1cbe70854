"""The broker's parts, built once from the settings: the one typed object the web layer serves from.

Plain Python (no Flask): `Broker.build(settings)` makes the Keycloak client, the signing keys and the
access-token validator, the optional introspection check, the refresher and the readiness verdict, and
wires them together. app/web/factory.py puts the result on the Flask app; `app.web.context.broker()`
hands it to routes and hooks.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Callable

from app.access_tokens import (AccessTokenValidator, Introspection, LogoutTokenPolicy, LogoutTokenValidator, SigningKeys,
                               TokenPolicy)
from app.accounts import Registration, SessionAddresses
from app.audit import AuditEvents
from app.code_flow import CodeFlow
from app.ended_sessions import EndedSessions, UsedLogoutTokens
from app.config import Settings
from app.errors import BrokerError, UpstreamUnavailable
from app.keycloak_client import KeycloakClient
from app.local_store import LocalOutcomes
from app.login_attempts import LoginAttempts
from app.refresh_coalescing import RedisOutcomes, RefreshCoalescer, UncoalescedRefresh
from app.shared_store import SharedStore

Refresher = RefreshCoalescer | UncoalescedRefresh


def package_version() -> str:
    """The installed token-broker version (what /health reports)."""
    try:
        return version("token-broker")
    except PackageNotFoundError:
        return "0.0.0+unknown"


class Readiness:
    """Whether the broker can validate and issue tokens: Keycloak's discovery document and keys in hand.

    A negative verdict is kept `hold` seconds, so frequent probes of a broker whose Keycloak is down cost
    Keycloak at most one discovery attempt per that interval and process.
    """

    def __init__(self, keycloak: KeycloakClient, keys: SigningKeys, *, hold: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self._keycloak = keycloak
        self._keys = keys
        self._hold = hold
        self._clock = clock
        self._lock = threading.Lock()
        self._checking = threading.Lock()  # one check at a time; probes arriving meanwhile do not wait for it
        self._refused_until = float("-inf")
        self._refusal = ""

    def check(self) -> None:
        """Return when ready; raise UpstreamUnavailable saying what is missing otherwise (never waits on another probe)."""
        with self._lock:
            if self._refused_until > self._clock():
                raise UpstreamUnavailable(self._refusal)
        if not self._checking.acquire(blocking=False):
            # Another probe is asking Keycloak right now (a slow Keycloak, or the first start): not ready yet.
            raise UpstreamUnavailable("The broker is still checking Keycloak; try again shortly")
        try:
            message = self._missing()
            if message is not None:
                with self._lock:
                    self._refused_until, self._refusal = self._clock() + self._hold, message
        finally:
            self._checking.release()
        if message is not None:
            raise UpstreamUnavailable(message)

    def _missing(self) -> str | None:
        try:
            self._keycloak.discovery()
        except BrokerError:
            return "Keycloak's discovery document is not available yet"
        if not self._keys.ready():
            return "The realm's signing keys are not available yet"
        return None


def redis_options(settings: Settings) -> dict:
    """Options of every Redis client but the coalescing one: BROKER_REDIS_TIMEOUT per connect and command, no retries."""
    from redis.backoff import NoBackoff  # only with BROKER_REDIS_URL: redis-py is not loaded otherwise
    from redis.retry import Retry

    return {"socket_timeout": settings.redis_timeout, "socket_connect_timeout": settings.redis_timeout,
            "retry": Retry(NoBackoff(), 0)}


def shared_store(settings: Settings) -> SharedStore:
    """The Redis of BROKER_REDIS_URL behind its circuit breaker (refresh coalescing, IP binding)."""
    return SharedStore.from_url(settings.redis_url, timeout=settings.redis_timeout,
                                retry_seconds=settings.redis_retry_seconds)


def build_refresher(settings: Settings, keycloak: KeycloakClient, store: SharedStore | None = None) -> Refresher:
    """Refresh coalescing (in-process, plus Redis or the local store across processes), unless switched off."""
    if not settings.refresh_coalescing:
        return UncoalescedRefresh(keycloak.refresh)
    # Both leases outlive the slowest refresh the broker allows: discovery is fetched before the lock is
    # taken, and the refresh itself is bounded by the connect timeout plus the answer limit.
    lease = settings.connect_timeout + settings.refresh_answer_limit + 2.0
    shared: RedisOutcomes | LocalOutcomes | None = None
    if settings.redis_url:
        store = store or shared_store(settings)
        shared = RedisOutcomes(store, lease=lease)
    elif settings.state_dir:
        # Under gunicorn (which sets BROKER_STATE_DIR): outcomes outlive a worker that is replaced.
        shared = LocalOutcomes(settings.state_dir, lease=lease)
    return RefreshCoalescer(
        keycloak.refresh,
        grace=settings.refresh_grace_seconds,
        wait=settings.connect_timeout + settings.read_timeout,
        shared=shared,
        # A failing local file is no reason to refuse: with no Redis there is one worker, the only process.
        redis_required=bool(settings.redis_url) and not settings.single_instance,
        prepare=keycloak.discovery,
    )


@dataclass(frozen=True)
class Broker:
    """Everything a request may need, built once per app; nothing in it holds per-request state."""

    settings: Settings
    keycloak: KeycloakClient
    signing_keys: SigningKeys
    access_tokens: AccessTokenValidator
    introspection: Introspection | None  # BROKER_TOKEN_INTROSPECTION: ask Keycloak whether a session lives
    refresher: Refresher
    readiness: Readiness
    login_attempts: LoginAttempts
    registration: Registration
    session_addresses: SessionAddresses | None  # BROKER_IP_BINDING: where each session logged in from
    audit: AuditEvents
    ended_sessions: EndedSessions  # back-channel logout: sessions Keycloak ended, refused by /me and /verify
    logout_tokens: LogoutTokenValidator  # back-channel logout: the tokens Keycloak posts, checked and used once
    code_flow: CodeFlow  # the code + PKCE login (BROKER_CODE_FLOW)
    version: str = field(default_factory=package_version)
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def build(cls, settings: Settings, keycloak: KeycloakClient | None = None) -> "Broker":
        """Build and wire every part from `settings` (a test may pass its own Keycloak client)."""
        keycloak = keycloak or KeycloakClient(settings)
        store = shared_store(settings) if settings.redis_url else None
        keys = SigningKeys(keycloak.jwks, min_refetch_interval=settings.jwks_min_refetch_seconds,
                           max_age=settings.jwks_max_age_seconds)
        policy = lambda: TokenPolicy(  # noqa: E731 - the issuer is known once discovery has been fetched
            issuer=keycloak.discovery()["issuer"],
            leeway=settings.token_leeway,
            audiences=settings.accepted_audiences,
            authorized_parties=settings.accepted_authorized_parties,
        )
        return cls(
            settings=settings,
            keycloak=keycloak,
            signing_keys=keys,
            access_tokens=AccessTokenValidator(keys, policy),
            introspection=(Introspection(keycloak.introspect, ttl=settings.introspection_cache_seconds)
                           if settings.token_introspection else None),
            refresher=build_refresher(settings, keycloak, store),
            readiness=Readiness(keycloak, keys),
            login_attempts=LoginAttempts(
                per_address_user=settings.rate_limit_login,
                per_user=settings.rate_limit_login_user,
                storage_uri=settings.redis_url,
                storage_options=redis_options(settings) if settings.redis_url else None,
                retry_seconds=settings.redis_retry_seconds,
                enabled=settings.rate_limits_enabled,
            ),
            registration=Registration(keycloak, email_verified=settings.registration_email_verified,
                                      login_scope=settings.login_scope),
            session_addresses=SessionAddresses(store) if settings.ip_binding != "off" else None,
            audit=AuditEvents.from_settings(settings),
            ended_sessions=EndedSessions(store, ttl=settings.ended_session_seconds),
            logout_tokens=LogoutTokenValidator(
                keys, lambda: LogoutTokenPolicy(issuer=keycloak.discovery()["issuer"], client_id=settings.client_id,
                                                leeway=settings.token_leeway),
                UsedLogoutTokens(store).first_use),
            code_flow=CodeFlow(settings, keycloak, keys, store),
        )
