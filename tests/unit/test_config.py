"""Settings from the environment: defaults, secrets, and every problem reported at once."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from app.config import ConfigError, Settings

BASE = {"KEYCLOAK_CLIENT_SECRET": "s3cr3t-value"}


def test_defaults_point_at_the_local_keycloak_and_shipped_realm():
    """With only a secret, the broker talks to the local dev Keycloak's demo realm."""
    settings = Settings.from_env(BASE)
    assert (settings.keycloak_url, settings.keycloak_realm, settings.client_id) == (
        "http://127.0.0.1:8080",
        "demo",
        "token-broker",
    )
    assert (settings.connect_timeout, settings.read_timeout, settings.max_body_bytes) == (2.0, 10.0, 16384)
    assert (settings.bind, settings.workers, settings.worker_connections) == ("127.0.0.1:8000", 1, 1000)
    assert (settings.worker_timeout, settings.graceful_timeout, settings.refresh_answer_limit) == (30, 25, 20.0)
    assert (settings.upstream_concurrency, settings.redis_timeout, settings.redis_retry_seconds) == (32, 0.25, 5.0)
    assert settings.tls_verify is True
    assert settings.realm_url == "http://127.0.0.1:8080/realms/demo"


def test_the_client_secret_has_no_default():
    """Without KEYCLOAK_CLIENT_SECRET or its _FILE the broker refuses to start, naming the variable."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({})
    assert caught.value.problems == [
        "KEYCLOAK_CLIENT_SECRET (or KEYCLOAK_CLIENT_SECRET_FILE) must be set: the broker's client secret has no default"
    ]


def test_the_secret_can_come_from_a_file(tmp_path):
    """KEYCLOAK_CLIENT_SECRET_FILE is read and stripped of its trailing newline."""
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")
    assert Settings.from_env({"KEYCLOAK_CLIENT_SECRET_FILE": str(secret_file)}).client_secret == "from-a-file"


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"KEYCLOAK_CLIENT_SECRET_FILE": "/nonexistent/secret"},
         "KEYCLOAK_CLIENT_SECRET_FILE: cannot read '/nonexistent/secret' (No such file or directory)"),
        ({"KEYCLOAK_CLIENT_SECRET": "a", "KEYCLOAK_CLIENT_SECRET_FILE": "/etc/hostname"},
         "KEYCLOAK_CLIENT_SECRET and KEYCLOAK_CLIENT_SECRET_FILE are both set; set only one"),
    ],
)
def test_secret_problems_are_named(env, problem):
    """A missing secret file, or both sources at once, is reported with the variable's name."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert caught.value.problems == [problem]


def test_every_bad_variable_is_reported_at_once():
    """All problems come in one error, each naming its variable."""
    env = {
        **BASE,
        "KEYCLOAK_URL": "ftp://kc",
        "KEYCLOAK_REALM": "de mo",
        "KEYCLOAK_CONNECT_TIMEOUT": "soon",
        "KEYCLOAK_READ_TIMEOUT": "0",
        "KEYCLOAK_CA_BUNDLE": "/nonexistent/ca.pem",
        "BROKER_MAX_BODY_BYTES": "10",
        "BROKER_WORKERS": "many",
        "BROKER_BIND": "8000",
        "BROKER_LOG_LEVEL": "loud",
    }
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert caught.value.problems == [
        "KEYCLOAK_URL: must be an http:// or https:// URL, got 'ftp://kc'",
        "KEYCLOAK_REALM: must not contain '/' or spaces, got 'de mo'",
        "KEYCLOAK_CONNECT_TIMEOUT: must be a number of seconds, got 'soon'",
        "KEYCLOAK_READ_TIMEOUT: must be between 0 and 300 seconds, got '0'",
        "KEYCLOAK_CA_BUNDLE: '/nonexistent/ca.pem' is not a readable file",
        "BROKER_MAX_BODY_BYTES: must be between 256 and 1048576, got 10",
        "BROKER_LOG_LEVEL: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'loud'",
        "BROKER_BIND: must be HOST:PORT or unix:PATH, got '8000'",
        "BROKER_WORKERS: must be a whole number, got 'many'",
    ]
    assert "KEYCLOAK_URL" in str(caught.value)


def test_a_ca_bundle_replaces_default_verification(tmp_path):
    """KEYCLOAK_CA_BUNDLE becomes what TLS verification trusts."""
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    assert Settings.from_env({**BASE, "KEYCLOAK_CA_BUNDLE": str(bundle)}).tls_verify == str(bundle)


def test_trailing_slash_of_the_url_is_dropped():
    """KEYCLOAK_URL may end in a slash."""
    assert Settings.from_env({**BASE, "KEYCLOAK_URL": "https://sso.example.com/"}).keycloak_url == (
        "https://sso.example.com"
    )


def test_neither_the_secret_nor_the_redis_url_appears_in_repr():
    """The repr (what a log line or traceback would show) names every setting but the secret and the Redis URL."""
    settings = Settings.from_env({**BASE, "BROKER_REDIS_URL": "redis://:redis-pass-9@r:6379/0"})
    shown = repr(settings)
    assert ("s3cr3t-value" in shown, "redis-pass-9" in shown) == (False, False)
    assert "keycloak_url='http://127.0.0.1:8080'" in shown and "state_dir=None" in shown


def test_each_default_is_written_once():
    """Settings built from an environment naming only the secret equal the dataclass's own defaults."""
    assert Settings.from_env(BASE) == Settings(client_secret="s3cr3t-value")


def test_the_old_redis_url_name_is_still_read():
    """REDIS_URL, the variable's earlier name, sets the same setting as BROKER_REDIS_URL."""
    assert Settings.from_env({**BASE, "REDIS_URL": "redis://r:6379/0"}).redis_url == "redis://r:6379/0"
    same = {**BASE, "REDIS_URL": "redis://r:6379/0", "BROKER_REDIS_URL": "redis://r:6379/0"}
    assert Settings.from_env(same).redis_url == "redis://r:6379/0"


def test_both_redis_url_names_with_different_values_are_refused():
    """Two different Redis URLs under the old and the new name: the broker cannot know which one is meant."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "REDIS_URL": "redis://a:6379/0", "BROKER_REDIS_URL": "redis://b:6379/0"})
    assert caught.value.problems == [
        "BROKER_REDIS_URL and REDIS_URL (its old name) are both set and differ; set only BROKER_REDIS_URL"
    ]


def test_several_workers_without_a_shared_store_are_refused():
    """BROKER_WORKERS above 1 without BROKER_REDIS_URL would let duplicates reach Keycloak twice: refused, naming both."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "BROKER_WORKERS": "2"})
    assert caught.value.problems == [
        "BROKER_WORKERS=2 needs BROKER_REDIS_URL: without a shared store, identical refreshes that land on different "
        "worker processes each reach Keycloak, and Keycloak ends the session on the second (and a back-channel "
        "logout, an IP binding or a code-flow login would reach one worker only); keep BROKER_WORKERS=1 (one gevent "
        "process serves many connections) or set BROKER_REDIS_URL"
    ]


def test_several_workers_are_accepted_with_redis():
    """With a shared store several workers start."""
    assert Settings.from_env({**BASE, "BROKER_WORKERS": "3", "BROKER_REDIS_URL": "redis://127.0.0.1:6379/0"}).workers == 3


def test_several_workers_without_redis_are_refused_even_without_coalescing():
    """Coalescing off is no way around it: back-channel logouts and IP bindings would reach one worker only."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "BROKER_WORKERS": "2", "BROKER_REFRESH_COALESCING": "false"})
    assert [p.split(":")[0] for p in caught.value.problems] == ["BROKER_WORKERS=2 needs BROKER_REDIS_URL"]


def test_threads_are_refused_because_the_worker_is_gevent():
    """BROKER_THREADS from the gthread days is refused rather than silently ignored."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "BROKER_THREADS": "8"})
    assert caught.value.problems == [
        "BROKER_THREADS no longer applies: the broker serves with gevent (one process holds up to "
        "BROKER_WORKER_CONNECTIONS connections); unset it"
    ]


def test_timeouts_that_could_cut_a_refresh_short_are_refused():
    """Worker and graceful timeouts must outlast connect + answer limit; the answer limit covers the read timeout."""
    env = {**BASE, "KEYCLOAK_READ_TIMEOUT": "15", "BROKER_REFRESH_ANSWER_LIMIT": "12",
           "BROKER_WORKER_TIMEOUT": "14", "BROKER_GRACEFUL_TIMEOUT": "10"}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert caught.value.problems == [
        "BROKER_REFRESH_ANSWER_LIMIT (12s) must be at least KEYCLOAK_READ_TIMEOUT (15s): the broker keeps "
        "reading a refresh's answer after its caller stopped waiting",
        "BROKER_WORKER_TIMEOUT (14s) must be longer than the longest refresh, KEYCLOAK_CONNECT_TIMEOUT + "
        "BROKER_REFRESH_ANSWER_LIMIT (14s): otherwise a worker can be stopped while Keycloak is answering a "
        "refresh, and that answer is lost",
        "BROKER_GRACEFUL_TIMEOUT (10s) must be longer than the longest refresh, KEYCLOAK_CONNECT_TIMEOUT + "
        "BROKER_REFRESH_ANSWER_LIMIT (14s): otherwise a worker can be stopped while Keycloak is answering a "
        "refresh, and that answer is lost",
    ]


@pytest.mark.parametrize(
    ("name", "raw", "problem"),
    [
        ("BROKER_REDIS_TIMEOUT", "0", "must be between 0.01 and 10 seconds, got '0'"),
        ("BROKER_REDIS_RETRY_SECONDS", "soon", "must be a number of seconds, got 'soon'"),
        ("BROKER_UPSTREAM_CONCURRENCY", "0", "must be between 1 and 10000, got 0"),
        ("BROKER_WORKER_CONNECTIONS", "5", "must be between 10 and 100000, got 5"),
        ("BROKER_STATE_DIR", "/nonexistent/state", "'/nonexistent/state' is not a writable directory"),
    ],
)
def test_isolation_settings_are_validated(name, raw, problem):
    """The isolation settings reject values that make no sense, naming the variable."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, name: raw})
    assert caught.value.problems == [f"{name}: {problem}"]


def test_single_instance_is_refused_with_several_workers():
    """BROKER_SINGLE_INSTANCE lets refreshes go on without Redis: only sound for one process."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "BROKER_WORKERS": "2", "BROKER_REDIS_URL": "redis://r:6379/0",
                           "BROKER_SINGLE_INSTANCE": "true"})
    assert caught.value.problems == [
        "BROKER_SINGLE_INSTANCE=true needs BROKER_WORKERS=1 (got 2): it lets a refresh go on without Redis while "
        "Redis is out, which is safe only when one process is the broker's only one"
    ]


def test_a_grace_window_longer_than_the_redis_lock_is_refused():
    """With Redis, the lock must outlast the grace window during which an outcome is still being shared."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "BROKER_REDIS_URL": "redis://r:6379/0", "BROKER_REFRESH_GRACE_SECONDS": "30"})
    assert caught.value.problems == [
        "BROKER_REFRESH_GRACE_SECONDS (30s) must be shorter than KEYCLOAK_CONNECT_TIMEOUT + "
        "BROKER_REFRESH_ANSWER_LIMIT (22s) with BROKER_REDIS_URL: a refresh's Redis lock must outlast the time the "
        "broker keeps trying to share its outcome"
    ]


def test_every_variable_is_in_the_operations_guide():
    """docs/operations.md has a row for each variable a Settings field reads, so an operator finds it in seconds."""
    guide = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    missing = [f.metadata["env"] for f in fields(Settings) if f"| `{f.metadata['env']}` |" not in guide]
    assert missing == []


@pytest.mark.parametrize("header", ["Content-Type", "accept", "Origin", "Cookie", "User-Agent", "Sec-Fetch-Mode",
                                    "X-Forwarded-For", "X-Forwarded-Prefix", "Proxy-Authorization", "Authorization",
                                    "Upgrade-Insecure-Requests", "Priority", "True-Client-IP", "Traceparent"])
def test_unsafe_csrf_headers_are_refused(header):
    """A header a cross-site form, the browser or a proxy sends proves nothing: refused, naming the variable."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "BROKER_CSRF_HEADER": header})
    assert caught.value.problems == [
        f"BROKER_CSRF_HEADER: {header!r} cannot prove a request is not cross-site (a form, the browser or a proxy "
        "sends it); pick a custom header such as X-Requested-With"
    ]


def test_a_custom_csrf_header_is_accepted():
    """The default and any custom header name are fine."""
    assert Settings.from_env({**BASE, "BROKER_CSRF_HEADER": "X-CSRF-Proof"}).csrf_header == "X-CSRF-Proof"


@pytest.mark.parametrize("origin", ["https://*.example.com", "https://app.example.com.*", "https://(a|b).example.com",
                                    "https://app.example.com$", "https://app.exa^mple.com"])
def test_pattern_origins_are_refused(origin):
    """flask-cors reads pattern characters as an unanchored regex: each origin must be exact."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "BROKER_CORS_ORIGINS": origin})
    assert caught.value.problems == [
        f"BROKER_CORS_ORIGINS: {origin!r} is not an exact origin (no wildcards or patterns): list each frontend"
    ]


def test_exact_origins_are_accepted():
    """Host names, ports and IP literals (IPv6 in brackets) are exact origins."""
    raw = "https://App.Example.com, http://127.0.0.1:5173, http://[::1]:3000"
    assert Settings.from_env({**BASE, "BROKER_CORS_ORIGINS": raw}).cors_origins == {
        "https://app.example.com", "http://127.0.0.1:5173", "http://[::1]:3000"}


PLAIN_HTTP = (
    "KEYCLOAK_URL: plain http:// to a host other than this machine sends the client secret and users' passwords "
    "in clear; use https://, or set KEYCLOAK_ALLOW_HTTP=true for a private network you trust (compose's)"
)


@pytest.mark.parametrize(("url", "extra", "problems"), [
    ("http://keycloak.internal:8080", {}, [PLAIN_HTTP]),
    ("HTTP://keycloak.internal:8080", {}, [PLAIN_HTTP]),
    ("http://10.0.0.5", {}, [PLAIN_HTTP]),
    ("http://keycloak.internal:8080", {"KEYCLOAK_ALLOW_HTTP": "true"}, []),
    ("https://keycloak.internal", {}, []),
    ("http://127.0.0.1:8080", {}, []),
    ("http://localhost:8080", {}, []),
    ("http://[::1]:8080", {}, []),
])
def test_plain_http_to_another_host_needs_the_opt_in(url, extra, problems):
    """Loopback and https:// need nothing; plain http:// elsewhere is refused unless KEYCLOAK_ALLOW_HTTP=true."""
    try:
        Settings.from_env({**BASE, "KEYCLOAK_URL": url, **extra})
        found = []
    except ConfigError as exc:
        found = exc.problems
    assert found == problems


def test_tokens_must_be_for_the_brokers_own_client_by_default():
    """The default audience and authorized party are KEYCLOAK_CLIENT_ID; '*' accepts any, explicitly."""
    default = Settings.from_env({**BASE, "KEYCLOAK_CLIENT_ID": "my-broker"})
    assert (default.accepted_audiences, default.accepted_authorized_parties) == ({"my-broker"}, {"my-broker"})
    opened = Settings.from_env({**BASE, "BROKER_TOKEN_AUDIENCES": "*", "BROKER_TOKEN_AUTHORIZED_PARTIES": "a,b"})
    assert (opened.accepted_audiences, opened.accepted_authorized_parties) == (frozenset(), {"a", "b"})
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "BROKER_TOKEN_AUDIENCES": "*,account"})
    assert caught.value.problems == ["BROKER_TOKEN_AUDIENCES: '*' accepts any value and cannot be combined with names"]


def test_reading_the_settings_imports_no_network_module():
    """gunicorn's master reads the settings before gevent patches ssl and socket: reading them must not import those."""
    program = (
        "import sys; from app.config import Settings; "
        "Settings.from_env({'KEYCLOAK_CLIENT_SECRET': 's', 'BROKER_RATE_LIMIT_LOGIN': '5 per minute'}); "
        "print(sorted(m for m in ('ssl', 'socket', 'limits', 'flask') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert (run.returncode, run.stdout, run.stderr) == (0, "[]\n", "")
