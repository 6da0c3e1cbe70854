"""Settings read once from the environment, typed, and validated in full at start-up."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Mapping, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")


class ConfigError(Exception):
    """The environment does not describe a usable broker; `problems` names every bad variable."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class _Reader:
    """Reads variables, converting each and collecting problems instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env
        self.problems: list[str] = []

    def get(self, name: str, default: T, convert: Callable[[str], T]) -> T:
        raw = self.env.get(name, "").strip()
        if raw == "":
            return default
        try:
            return convert(raw)
        except ValueError as exc:
            self.problems.append(f"{name}: {exc}")
            return default

    def secret(self, name: str) -> str:
        """A secret from NAME or from the file named by NAME_FILE; exactly one, and never a default."""
        value = self.env.get(name, "")
        file_name = self.env.get(f"{name}_FILE", "").strip()
        if value and file_name:
            self.problems.append(f"{name} and {name}_FILE are both set; set only one")
            return ""
        if file_name:
            try:
                value = Path(file_name).read_text(encoding="utf-8").strip()
            except OSError as exc:
                self.problems.append(f"{name}_FILE: cannot read {file_name!r} ({exc.strerror})")
                return ""
            if not value:
                self.problems.append(f"{name}_FILE: {file_name!r} is empty")
            return value
        if not value.strip():
            self.problems.append(f"{name} (or {name}_FILE) must be set: the broker's client secret has no default")
        return value.strip()


def _url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http:// or https:// URL, got {raw!r}")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query or fragment")
    return raw.rstrip("/")


def _name(raw: str) -> str:
    if "/" in raw or any(c.isspace() for c in raw):
        raise ValueError(f"must not contain '/' or spaces, got {raw!r}")
    return raw


def _redis_url(raw: str) -> str:
    if urlsplit(raw).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")
    return raw


def _one_of(*choices: str) -> Callable[[str], str]:
    def convert(raw: str) -> str:
        if raw.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {raw!r}")
        return raw.lower()

    return convert


def _cookie_name(raw: str) -> str:
    if not all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in raw):
        raise ValueError(f"must be a cookie name (letters, digits and !#$%&'*+-.^_`|~), got {raw!r}")
    if raw.startswith("__Host-"):
        raise ValueError("__Host- cookies must have Path=/, but the refresh cookie is scoped to /api/auth")
    return raw


# Headers a cross-site form or plain navigation can carry (CORS-safelisted), that the browser sets itself
# (forbidden request headers), or that proxies add to every request: none of them proves anything about CSRF.
_NOT_A_CSRF_PROOF = frozenset({
    "accept", "accept-language", "content-language", "content-type", "range",
    "accept-charset", "accept-encoding", "connection", "content-length", "cookie", "cookie2", "date", "dnt",
    "expect", "host", "keep-alive", "origin", "referer", "set-cookie", "te", "trailer", "transfer-encoding",
    "upgrade", "user-agent", "via", "authorization", "forwarded", "x-real-ip", "x-request-id", "cache-control",
    "pragma", "upgrade-insecure-requests", "priority", "true-client-ip", "x-client-ip", "cf-connecting-ip",
    "traceparent", "tracestate",
})


def _header_name(raw: str) -> str:
    if not raw or not all(c.isalnum() or c == "-" for c in raw):
        raise ValueError(f"must be an HTTP header name, got {raw!r}")
    lower = raw.lower()
    if lower in _NOT_A_CSRF_PROOF or lower.startswith(("sec-", "proxy-", "access-control-", "x-forwarded-")):
        raise ValueError(f"{raw!r} cannot prove a request is not cross-site (a form, the browser or a proxy sends "
                         "it); pick a custom header such as X-Requested-With")
    return raw


_ORIGIN = re.compile(r"https?://(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                     r"(?::[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?")


def _origins(raw: str) -> frozenset[str]:
    origins = set()
    for origin in (o.strip() for o in raw.split(",") if o.strip()):
        parts = urlsplit(origin)
        if origin == "*":
            raise ValueError("'*' is not allowed: list the frontends' origins (credentials need explicit origins)")
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
            raise ValueError(f"{origin!r} is not an origin like https://app.example.com")
        if not _ORIGIN.fullmatch(origin):
            # flask-cors reads an origin with a wildcard or other pattern characters as a regular expression, and
            # an unanchored one: https://*.example.com would let https://xexample.com.attacker.net in.
            raise ValueError(f"{origin!r} is not an exact origin (no wildcards or patterns): list each frontend")
        origins.add(origin.lower())  # scheme and host are case-insensitive; browsers send them in lower case
    return frozenset(origins)


# The grammar of the `limits` package's parse_many, written out so that gunicorn's master, which reads the
# settings before any worker patches the standard library for gevent, does not import `limits` (and with it
# ssl and socket).
_ONE_RATE = r"\s*[0-9]+\s*(?:/|\s*per\s*)\s*(?:[0-9]+\s*)?(?:hour|minute|second|day|month|year)s?\s*"
_RATES = re.compile(rf"{_ONE_RATE}(?:[,;|]{_ONE_RATE})*", re.IGNORECASE)


def _rate_limit(raw: str) -> str:
    if not _RATES.fullmatch(raw):
        raise ValueError(f"must be a rate limit such as '10 per minute' or '5/second', got {raw!r}")
    return raw


def _stream_name(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9:._-]{1,200}", raw):
        raise ValueError(f"must be a Redis key name of letters, digits and ':._-', got {raw!r}")
    return raw


def _names(raw: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    if not names:
        raise ValueError("must be a comma-separated list of names")
    return names


def _bool(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {raw!r}")


def _bind(raw: str) -> str:
    host, sep, port = raw.rpartition(":")
    if raw.startswith("unix:"):
        return raw
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be HOST:PORT or unix:PATH, got {raw!r}")
    return raw


def _scope(raw: str) -> str:
    if not all(c.isprintable() for c in raw):
        raise ValueError("must be space-separated scope names")
    return " ".join(raw.split())


def _number_between(low: float, high: float, *, whole: bool = False, above_low: bool = False) -> Callable[[str], float]:
    """A number of seconds (or, `whole`, a count) from `low` (exclusive when `above_low`) to `high`."""

    def convert(raw: str) -> float:
        try:
            value = int(raw) if whole else float(raw)
        except ValueError:
            raise ValueError(f"must be {'a whole number' if whole else 'a number of seconds'}, got {raw!r}") from None
        if not (low < value if above_low else low <= value) or value > high:
            if whole:
                raise ValueError(f"must be between {low} and {high}, got {value}")
            raise ValueError(f"must be between {low:g} and {high:g} seconds, got {raw!r}")
        return value

    return convert


def _seconds_between(low: float, high: float) -> Callable[[str], float]:
    return _number_between(low, high)


def _int_between(low: int, high: int) -> Callable[[str], int]:
    return _number_between(low, high, whole=True)  # type: ignore[return-value]


_positive_float = _number_between(0, 300, above_low=True)


def _readable_file(raw: str) -> str:
    if not os.access(raw, os.R_OK) or not Path(raw).is_file():
        raise ValueError(f"{raw!r} is not a readable file")
    return raw


def _writable_dir(raw: str) -> str:
    if not Path(raw).is_dir() or not os.access(raw, os.W_OK | os.X_OK):
        raise ValueError(f"{raw!r} is not a writable directory")
    return raw


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {raw!r}")
    return level


COOKIE_TRANSPORT = "cookie"  # BROKER_TOKEN_TRANSPORT's opt-in mode (the default is "body")


def _setting(env: str, convert: Callable[[str], T] | None, default: T, *, shown: bool = True) -> T:
    """A Settings field read from the environment variable `env` through `convert` (None: a secret).

    Secrets, and values that may carry one (`shown=False`), stay out of the repr and so out of any log line.
    """
    return field(default=default, repr=shown and convert is not None, metadata={"env": env, "convert": convert})


@dataclass(frozen=True)
class Settings:
    """Everything the broker is told by its operator. Built by `Settings.from_env`, never at import time.

    Each field names its variable, its converter and its default, once; docs/operations.md lists them.
    """

    keycloak_url: str = _setting("KEYCLOAK_URL", _url, "http://127.0.0.1:8080")
    keycloak_realm: str = _setting("KEYCLOAK_REALM", _name, "demo")
    client_id: str = _setting("KEYCLOAK_CLIENT_ID", _name, "token-broker")
    client_secret: str = _setting("KEYCLOAK_CLIENT_SECRET", None, "")  # no default: from_env refuses ""
    connect_timeout: float = _setting("KEYCLOAK_CONNECT_TIMEOUT", _positive_float, 2.0)
    read_timeout: float = _setting("KEYCLOAK_READ_TIMEOUT", _positive_float, 10.0)
    ca_bundle: str | None = _setting("KEYCLOAK_CA_BUNDLE", _readable_file, None)
    # Plain http:// to a host that is not this machine sends the client secret and passwords in clear.
    keycloak_allow_http: bool = _setting("KEYCLOAK_ALLOW_HTTP", _bool, False)
    max_body_bytes: int = _setting("BROKER_MAX_BODY_BYTES", _int_between(256, 1024 * 1024), 16384)
    upstream_retry_after: int = _setting("BROKER_UPSTREAM_RETRY_AFTER", _int_between(1, 3600), 5)
    login_scope: str = _setting("BROKER_LOGIN_SCOPE", _scope, "openid")
    log_level: str = _setting("BROKER_LOG_LEVEL", _log_level, "INFO")
    token_leeway: int = _setting("BROKER_TOKEN_LEEWAY", _int_between(0, 300), 10)
    # None: the broker's own client (KEYCLOAK_CLIENT_ID); "*" accepts any (see accepted_audiences).
    token_audiences: frozenset[str] | None = _setting("BROKER_TOKEN_AUDIENCES", _names, None)
    token_authorized_parties: frozenset[str] | None = _setting("BROKER_TOKEN_AUTHORIZED_PARTIES", _names, None)
    jwks_min_refetch_seconds: float = _setting("BROKER_JWKS_MIN_REFETCH_SECONDS", _positive_float, 10.0)
    jwks_max_age_seconds: float = _setting(
        "BROKER_JWKS_MAX_AGE_SECONDS", _seconds_between(10, 86400), 600.0)
    token_introspection: bool = _setting("BROKER_TOKEN_INTROSPECTION", _bool, False)
    introspection_cache_seconds: float = _setting(
        "BROKER_INTROSPECTION_CACHE_SECONDS", _positive_float, 10.0)
    # REDIS_URL, its earlier name, is still read (see from_env). A Redis URL may carry a password: not shown.
    redis_url: str | None = _setting("BROKER_REDIS_URL", _redis_url, None, shown=False)
    refresh_coalescing: bool = _setting("BROKER_REFRESH_COALESCING", _bool, True)
    refresh_grace_seconds: float = _setting("BROKER_REFRESH_GRACE_SECONDS", _positive_float, 5.0)
    token_transport: str = _setting("BROKER_TOKEN_TRANSPORT", _one_of("body", "cookie"), "body")
    cookie_name: str = _setting("BROKER_COOKIE_NAME", _cookie_name, "__Secure-refresh_token")
    cookie_secure: bool = _setting("BROKER_COOKIE_SECURE", _bool, True)
    csrf_header: str = _setting("BROKER_CSRF_HEADER", _header_name, "X-Requested-With")
    cors_origins: frozenset[str] = _setting("BROKER_CORS_ORIGINS", _origins, frozenset())
    rate_limits_enabled: bool = _setting("BROKER_RATE_LIMITS_ENABLED", _bool, True)
    rate_limit_login: str = _setting("BROKER_RATE_LIMIT_LOGIN", _rate_limit, "10 per minute")
    rate_limit_login_ip: str = _setting("BROKER_RATE_LIMIT_LOGIN_IP", _rate_limit, "60 per minute")
    rate_limit_refresh: str = _setting("BROKER_RATE_LIMIT_REFRESH", _rate_limit, "120 per minute")
    rate_limit_logout: str = _setting("BROKER_RATE_LIMIT_LOGOUT", _rate_limit, "60 per minute")
    rate_limit_login_user: str = _setting("BROKER_RATE_LIMIT_LOGIN_USER", _rate_limit, "30 per minute")
    trusted_proxy_hops: int = _setting("BROKER_TRUSTED_PROXY_HOPS", _int_between(0, 10), 0)
    bind: str = _setting("BROKER_BIND", _bind, "127.0.0.1:8000")
    workers: int = _setting("BROKER_WORKERS", _int_between(1, 64), 1)
    worker_connections: int = _setting("BROKER_WORKER_CONNECTIONS", _int_between(10, 100000), 1000)
    worker_timeout: int = _setting("BROKER_WORKER_TIMEOUT", _int_between(5, 600), 30)
    graceful_timeout: int = _setting("BROKER_GRACEFUL_TIMEOUT", _int_between(1, 600), 25)
    refresh_answer_limit: float = _setting("BROKER_REFRESH_ANSWER_LIMIT", _positive_float, 20.0)
    upstream_concurrency: int = _setting("BROKER_UPSTREAM_CONCURRENCY", _int_between(1, 10000), 32)
    redis_timeout: float = _setting("BROKER_REDIS_TIMEOUT", _seconds_between(0.01, 10), 0.25)
    redis_retry_seconds: float = _setting(
        "BROKER_REDIS_RETRY_SECONDS", _seconds_between(0.1, 300), 5.0)
    single_instance: bool = _setting("BROKER_SINGLE_INSTANCE", _bool, False)
    state_dir: str | None = _setting("BROKER_STATE_DIR", _writable_dir, None)
    # Accounts (docs/api.md, POST /api/auth/register; docs/operations.md, "Audit events").
    registration: bool = _setting("BROKER_REGISTRATION", _bool, False)
    registration_email_verified: bool = _setting("BROKER_REGISTRATION_EMAIL_VERIFIED", _bool, False)
    rate_limit_register: str = _setting("BROKER_RATE_LIMIT_REGISTER", _rate_limit, "10 per hour")
    ip_binding: str = _setting("BROKER_IP_BINDING", _one_of("off", "address", "prefix"), "off")
    audit_stream: str | None = _setting("BROKER_AUDIT_REDIS_STREAM", _stream_name, None)
    audit_stream_maxlen: int = _setting("BROKER_AUDIT_STREAM_MAXLEN", _int_between(100, 10_000_000), 100_000)
    audit_webhook_url: str | None = _setting("BROKER_AUDIT_WEBHOOK_URL", _url, None, shown=False)
    audit_queue_size: int = _setting("BROKER_AUDIT_QUEUE_SIZE", _int_between(10, 1_000_000), 10_000)
    # Sessions (docs/api.md: back-channel logout; the code + PKCE login).
    ended_session_seconds: float = _setting("BROKER_ENDED_SESSION_SECONDS", _seconds_between(60, 7 * 86400), 3600.0)
    code_flow: bool = _setting("BROKER_CODE_FLOW", _bool, False)
    callback_url: str = _setting("BROKER_CALLBACK_URL", _url, "http://127.0.0.1:8000/api/auth/callback")
    return_origins: frozenset[str] = _setting("BROKER_RETURN_ORIGINS", _origins, frozenset())

    @property
    def realm_url(self) -> str:
        """The realm's base URL, e.g. http://127.0.0.1:8080/realms/demo."""
        return f"{self.keycloak_url}/realms/{self.keycloak_realm}"

    @property
    def accepted_audiences(self) -> frozenset[str]:
        """The `aud` values of which an access token must name one; empty: any audience (BROKER_TOKEN_AUDIENCES=*)."""
        return _accepted(self.token_audiences, self.client_id)

    @property
    def accepted_authorized_parties(self) -> frozenset[str]:
        """The clients (`azp`) whose access tokens are accepted; empty: any (BROKER_TOKEN_AUTHORIZED_PARTIES=*)."""
        return _accepted(self.token_authorized_parties, self.client_id)

    @property
    def tls_verify(self) -> bool | str:
        """What `requests` takes as `verify`: on by default, or the operator's CA bundle."""
        return self.ca_bundle or True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from environment variables; raise ConfigError listing every problem at once."""
        env = dict(os.environ if environ is None else environ)
        reader = _Reader(env)
        legacy_redis = env.pop("REDIS_URL", "").strip()
        if legacy_redis:
            current = env.get("BROKER_REDIS_URL", "").strip()
            if current and current != legacy_redis:
                reader.problems.append("BROKER_REDIS_URL and REDIS_URL (its old name) are both set and differ; "
                                       "set only BROKER_REDIS_URL")
            env["BROKER_REDIS_URL"] = current or legacy_redis
        values = {}
        for spec in fields(cls):
            name, convert = spec.metadata["env"], spec.metadata["convert"]
            values[spec.name] = reader.secret(name) if convert is None else reader.get(name, spec.default, convert)
        settings = cls(**values)
        reader.problems.extend(_promise_problems(settings, env))
        reader.problems.extend(_security_problems(settings))
        if not settings.cookie_secure and settings.cookie_name.startswith(("__Secure-", "__Host-")):
            reader.problems.append(
                "BROKER_COOKIE_NAME: a __Secure- or __Host- cookie needs BROKER_COOKIE_SECURE=true "
                "(browsers drop such cookies without Secure); pick another name for plain-HTTP local runs"
            )
        if reader.problems:
            raise ConfigError(reader.problems)
        return settings


def _accepted(names: frozenset[str] | None, client_id: str) -> frozenset[str]:
    if names is None:
        return frozenset({client_id})
    return frozenset() if "*" in names else names


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _security_problems(settings: Settings) -> list[str]:
    """Settings that would weaken a defence of docs/security.md, each naming its variable."""
    problems = []
    if urlsplit(settings.keycloak_url).scheme == "http" and not _loopback(settings.keycloak_url) \
            and not settings.keycloak_allow_http:
        problems.append(
            "KEYCLOAK_URL: plain http:// to a host other than this machine sends the client secret and users' "
            "passwords in clear; use https://, or set KEYCLOAK_ALLOW_HTTP=true for a private network you trust "
            "(compose's)"
        )
    if settings.code_flow and settings.token_transport != COOKIE_TRANSPORT:
        problems.append("BROKER_CODE_FLOW=true needs BROKER_TOKEN_TRANSPORT=cookie: the login's callback hands the "
                        "session to the browser in the refresh cookie")
    if settings.audit_stream and not settings.redis_url:
        problems.append("BROKER_AUDIT_REDIS_STREAM needs BROKER_REDIS_URL: the stream lives in that Redis")
    for name, values in (("BROKER_TOKEN_AUDIENCES", settings.token_audiences),
                         ("BROKER_TOKEN_AUTHORIZED_PARTIES", settings.token_authorized_parties)):
        if values is not None and "*" in values and len(values) > 1:
            problems.append(f"{name}: '*' accepts any value and cannot be combined with names")
    return problems


def _promise_problems(settings: Settings, env: Mapping[str, str]) -> list[str]:
    """Combinations of settings that would break a promise of docs/reliability.md, each naming its variables."""
    problems = []
    if env.get("BROKER_THREADS", "").strip():
        problems.append(
            "BROKER_THREADS no longer applies: the broker serves with gevent (one process holds up to "
            "BROKER_WORKER_CONNECTIONS connections); unset it"
        )
    if settings.workers > 1 and not settings.redis_url:
        problems.append(
            f"BROKER_WORKERS={settings.workers} needs BROKER_REDIS_URL: without a shared store, identical refreshes "
            "that land on different worker processes each reach Keycloak, and Keycloak ends the session on the "
            "second (and a back-channel logout, an IP binding or a code-flow login would reach one worker only); "
            "keep BROKER_WORKERS=1 (one gevent process serves many connections) or set BROKER_REDIS_URL"
        )
    if settings.single_instance and settings.workers > 1:
        problems.append(
            f"BROKER_SINGLE_INSTANCE=true needs BROKER_WORKERS=1 (got {settings.workers}): it lets a refresh go on "
            "without Redis while Redis is out, which is safe only when one process is the broker's only one"
        )
    lease = settings.connect_timeout + settings.refresh_answer_limit
    if settings.redis_url and settings.refresh_grace_seconds >= lease:
        problems.append(
            f"BROKER_REFRESH_GRACE_SECONDS ({settings.refresh_grace_seconds:g}s) must be shorter than "
            f"KEYCLOAK_CONNECT_TIMEOUT + BROKER_REFRESH_ANSWER_LIMIT ({lease:g}s) with BROKER_REDIS_URL: a refresh's "
            "Redis lock must outlast the time the broker keeps trying to share its outcome"
        )
    if settings.refresh_answer_limit < settings.read_timeout:
        problems.append(
            f"BROKER_REFRESH_ANSWER_LIMIT ({settings.refresh_answer_limit:g}s) must be at least "
            f"KEYCLOAK_READ_TIMEOUT ({settings.read_timeout:g}s): the broker keeps reading a refresh's answer "
            "after its caller stopped waiting"
        )
    longest = settings.connect_timeout + settings.refresh_answer_limit
    for name, value in (("BROKER_WORKER_TIMEOUT", settings.worker_timeout),
                        ("BROKER_GRACEFUL_TIMEOUT", settings.graceful_timeout)):
        if value <= longest:
            problems.append(
                f"{name} ({value}s) must be longer than the longest refresh, KEYCLOAK_CONNECT_TIMEOUT + "
                f"BROKER_REFRESH_ANSWER_LIMIT ({longest:g}s): otherwise a worker can be stopped while Keycloak "
                "is answering a refresh, and that answer is lost"
            )
    return problems
