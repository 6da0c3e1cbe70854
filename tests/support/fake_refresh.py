"""Fakes for the refresh path: the tokens a grant returns, and a Keycloak refresh that counts its grants."""

from __future__ import annotations

import threading
import time

from app.keycloak_client import TokenSet

TOKENS = TokenSet(access_token="AT-MARKER-new", token_type="Bearer", expires_in=300,
                  refresh_token="RT-MARKER-new", refresh_expires_in=1800, scope="openid")


class Keycloak:
    """A refresh function that counts grants and takes a while, like the real one."""

    def __init__(self, outcome=TOKENS, delay: float = 0.2):
        self.outcome = outcome
        self.delay = delay
        self.grants = 0
        self._lock = threading.Lock()

    def __call__(self, refresh_token: str, scope: str | None) -> TokenSet:
        with self._lock:
            self.grants += 1
        time.sleep(self.delay)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome
