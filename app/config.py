"""Settings read once from the environment, typed, and validated in full at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")


class ConfigError(Exception):
    """The environment does not describe a usable broker; `problems` names every bad variable."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Settings:
    """Everything the broker is told by its operator. Built by `Settings.from_env`, never at import time."""

    keycloak_url: str
    keycloak_realm: str
    client_id: str
    client_secret: str = ""
    connect_timeout: float = 2.0
    read_timeout: float = 10.0
    ca_bundle: str | None = None
    max_body_bytes: int = 16 * 1024
    upstream_retry_after: int = 5
    login_scope: str = "openid"
    log_level: str = "INFO"
    token_leeway: int = 10
    token_audiences: frozenset[str] = frozenset()
    token_authorized_parties: frozenset[str] = frozenset()
    jwks_min_refetch_seconds: float = 10.0
    jwks_max_age_seconds: float = 600.0
    introspection: bool = False
    introspection_cache_seconds: float = 10.0
    redis_url: str | None = None
    refresh_coalescing: bool = True
    refresh_grace_seconds: float = 5.0
    token_transport: str = "body"
    cookie_name: str = "__Secure-refresh_token"
    cookie_secure: bool = True
    csrf_header: str = "X-Requested-With"
    cors_origins: frozenset[str] = frozenset()
    rate_limits_enabled: bool = True
    rate_limit_login: str = "10 per minute"
    rate_limit_login_ip: str = "60 per minute"
    rate_limit_refresh: str = "120 per minute"
    trusted_proxy_hops: int = 0
    bind: str = "127.0.0.1:8000"
    workers: int = 1
    worker_connections: int = 1000
    worker_timeout: int = 30
    graceful_timeout: int = 25
    refresh_answer_limit: float = 20.0
    upstream_concurrency: int = 32
    redis_timeout: float = 0.25
    redis_retry_seconds: float = 5.0
    single_instance: bool = False
    state_dir: str | None = None

    @property
    def realm_url(self) -> str:
        """The realm's base URL, e.g. http://127.0.0.1:8080/realms/demo."""
        return f"{self.keycloak_url}/realms/{self.keycloak_realm}"

    @property
    def tls_verify(self) -> bool | str:
        """What `requests` takes as `verify`: on by default, or the operator's CA bundle."""
        return self.ca_bundle or True

    def __repr__(self) -> str:  # keep the secret out of any log line or traceback
        return (
            f"Settings(keycloak_url={self.keycloak_url!r}, keycloak_realm={self.keycloak_realm!r}, "
            f"client_id={self.client_id!r}, client_secret='***')"
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from environment variables; raise ConfigError listing every problem at once."""
        env = os.environ if environ is None else environ
        reader = _Reader(env)
        keycloak_url = reader.get("KEYCLOAK_URL", "http://127.0.0.1:8080", _url)
        settings = cls(
            keycloak_url=keycloak_url,
            keycloak_realm=reader.get("KEYCLOAK_REALM", "demo", _name),
            client_id=reader.get("KEYCLOAK_CLIENT_ID", "token-broker", _name),
            client_secret=reader.secret("KEYCLOAK_CLIENT_SECRET"),
            connect_timeout=reader.get("KEYCLOAK_CONNECT_TIMEOUT", 2.0, _positive_float),
            read_timeout=reader.get("KEYCLOAK_READ_TIMEOUT", 10.0, _positive_float),
            ca_bundle=reader.get("KEYCLOAK_CA_BUNDLE", None, _readable_file),
            max_body_bytes=reader.get("BROKER_MAX_BODY_BYTES", 16 * 1024, _int_between(256, 1024 * 1024)),
            upstream_retry_after=reader.get("BROKER_UPSTREAM_RETRY_AFTER", 5, _int_between(1, 3600)),
            login_scope=reader.get("BROKER_LOGIN_SCOPE", "openid", _scope),
            log_level=reader.get("BROKER_LOG_LEVEL", "INFO", _log_level),
            token_leeway=reader.get("BROKER_TOKEN_LEEWAY", 10, _int_between(0, 300)),
            token_audiences=reader.get("BROKER_TOKEN_AUDIENCES", frozenset(), _names),
            token_authorized_parties=reader.get("BROKER_TOKEN_AUTHORIZED_PARTIES", frozenset(), _names),
            jwks_min_refetch_seconds=reader.get("BROKER_JWKS_MIN_REFETCH_SECONDS", 10.0, _positive_float),
            jwks_max_age_seconds=reader.get("BROKER_JWKS_MAX_AGE_SECONDS", 600.0, _int_between(10, 86400)),
            introspection=reader.get("BROKER_TOKEN_INTROSPECTION", False, _bool),
            introspection_cache_seconds=reader.get("BROKER_INTROSPECTION_CACHE_SECONDS", 10.0, _positive_float),
            redis_url=reader.get("REDIS_URL", None, _redis_url),
            refresh_coalescing=reader.get("BROKER_REFRESH_COALESCING", True, _bool),
            refresh_grace_seconds=reader.get("BROKER_REFRESH_GRACE_SECONDS", 5.0, _positive_float),
            token_transport=reader.get("BROKER_TOKEN_TRANSPORT", "body", _one_of("body", "cookie")),
            cookie_name=reader.get("BROKER_COOKIE_NAME", "__Secure-refresh_token", _cookie_name),
            cookie_secure=reader.get("BROKER_COOKIE_SECURE", True, _bool),
            csrf_header=reader.get("BROKER_CSRF_HEADER", "X-Requested-With", _header_name),
            cors_origins=reader.get("BROKER_CORS_ORIGINS", frozenset(), _origins),
            rate_limits_enabled=reader.get("BROKER_RATE_LIMITS_ENABLED", True, _bool),
            rate_limit_login=reader.get("BROKER_RATE_LIMIT_LOGIN", "10 per minute", _rate_limit),
            rate_limit_login_ip=reader.get("BROKER_RATE_LIMIT_LOGIN_IP", "60 per minute", _rate_limit),
            rate_limit_refresh=reader.get("BROKER_RATE_LIMIT_REFRESH", "120 per minute", _rate_limit),
            trusted_proxy_hops=reader.get("BROKER_TRUSTED_PROXY_HOPS", 0, _int_between(0, 10)),
            bind=reader.get("BROKER_BIND", "127.0.0.1:8000", _bind),
            workers=reader.get("BROKER_WORKERS", 1, _int_between(1, 64)),
            worker_connections=reader.get("BROKER_WORKER_CONNECTIONS", 1000, _int_between(10, 100000)),
            worker_timeout=reader.get("BROKER_WORKER_TIMEOUT", 30, _int_between(5, 600)),
            graceful_timeout=reader.get("BROKER_GRACEFUL_TIMEOUT", 25, _int_between(1, 600)),
            refresh_answer_limit=reader.get("BROKER_REFRESH_ANSWER_LIMIT", 20.0, _positive_float),
            upstream_concurrency=reader.get("BROKER_UPSTREAM_CONCURRENCY", 32, _int_between(1, 10000)),
            redis_timeout=reader.get("BROKER_REDIS_TIMEOUT", 0.25, _seconds_between(0.01, 10)),
            redis_retry_seconds=reader.get("BROKER_REDIS_RETRY_SECONDS", 5.0, _seconds_between(0.1, 300)),
            single_instance=reader.get("BROKER_SINGLE_INSTANCE", False, _bool),
            state_dir=reader.get("BROKER_STATE_DIR", None, _writable_dir),
        )
        reader.problems.extend(_promise_problems(settings, env))
        if not settings.cookie_secure and settings.cookie_name.startswith(("__Secure-", "__Host-")):
            reader.problems.append(
                "BROKER_COOKIE_NAME: a __Secure- or __Host- cookie needs BROKER_COOKIE_SECURE=true "
                "(browsers drop such cookies without Secure); pick another name for plain-HTTP local runs"
            )
        if reader.problems:
            raise ConfigError(reader.problems)
        return settings


def _promise_problems(settings: Settings, env: Mapping[str, str]) -> list[str]:
    """Combinations of settings that would break a promise of docs/reliability.md, each naming its variables."""
    problems = []
    if env.get("BROKER_THREADS", "").strip():
        problems.append(
            "BROKER_THREADS no longer applies: the broker serves with gevent (one process holds up to "
            "BROKER_WORKER_CONNECTIONS connections); unset it"
        )
    if settings.workers > 1 and settings.refresh_coalescing and not settings.redis_url:
        problems.append(
            f"BROKER_WORKERS={settings.workers} needs REDIS_URL: without a shared store, identical refreshes "
            "that land on different worker processes each reach Keycloak, and Keycloak ends the session on the "
            "second; keep BROKER_WORKERS=1 (one gevent process serves many connections) or set REDIS_URL"
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
            f"KEYCLOAK_CONNECT_TIMEOUT + BROKER_REFRESH_ANSWER_LIMIT ({lease:g}s) with REDIS_URL: a refresh's "
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


def _header_name(raw: str) -> str:
    if not all(c.isalnum() or c == "-" for c in raw):
        raise ValueError(f"must be an HTTP header name, got {raw!r}")
    return raw


def _origins(raw: str) -> frozenset[str]:
    origins = set()
    for origin in (o.strip() for o in raw.split(",") if o.strip()):
        parts = urlsplit(origin)
        if origin == "*":
            raise ValueError("'*' is not allowed: list the frontends' origins (credentials need explicit origins)")
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
            raise ValueError(f"{origin!r} is not an origin like https://app.example.com")
        origins.add(origin)
    return frozenset(origins)


def _rate_limit(raw: str) -> str:
    from limits import parse_many

    try:
        parse_many(raw)
    except ValueError:
        raise ValueError(f"must be a rate limit such as '10 per minute' or '5/second', got {raw!r}") from None
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


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"must be a number of seconds, got {raw!r}") from None
    if not 0 < value <= 300:
        raise ValueError(f"must be between 0 and 300 seconds, got {raw!r}")
    return value


def _seconds_between(low: float, high: float) -> Callable[[str], float]:
    def convert(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"must be a number of seconds, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low:g} and {high:g} seconds, got {raw!r}")
        return value

    return convert


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def convert(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"must be a whole number, got {raw!r}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return convert


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
