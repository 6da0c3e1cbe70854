"""token-broker: a thin, hardened broker between browser frontends and a Keycloak realm.

The package itself imports nothing, so gunicorn's master can read `app.config` (the standard library
only) before a worker patches the standard library for gevent and builds the app with `create_app`
(app/web/factory.py).
"""

from __future__ import annotations

from typing import Any


def create_app(*args: Any, **kwargs: Any) -> Any:
    """Build a broker app (see app.web.factory.create_app); raise ConfigError when the settings are bad."""
    from app.web.factory import create_app as build

    return build(*args, **kwargs)
