"""The one way a view or hook reaches the broker's parts: `broker()` returns the app's typed `Broker`."""

from __future__ import annotations

from flask import Flask, current_app

from app.broker import Broker

_EXTENSION = "token-broker"


def attach(app: Flask, parts: Broker) -> None:
    """Make `parts` the broker that `broker()` returns inside this app's requests."""
    app.extensions[_EXTENSION] = parts


def broker() -> Broker:
    """The Broker of the app handling the current request."""
    return current_app.extensions[_EXTENSION]


def broker_of(app: object) -> Broker | None:
    """The Broker of `app` outside a request (gunicorn's worker_exit hook), or None if it is no broker app."""
    extensions = getattr(app, "extensions", None)
    return extensions.get(_EXTENSION) if isinstance(extensions, dict) else None
