"""Settings from the environment: defaults, secrets, and every problem reported at once."""

from __future__ import annotations

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
    assert (settings.bind, settings.workers, settings.threads) == ("127.0.0.1:8000", 2, 8)
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


def test_the_secret_never_appears_in_repr():
    """A logged or printed Settings shows *** for the secret."""
    assert "s3cr3t-value" not in repr(Settings.from_env(BASE))
    assert "s3cr3t-value" not in str(Settings.from_env(BASE))
