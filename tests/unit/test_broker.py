"""The Broker's own parts: the /ready verdict (Readiness)."""

from __future__ import annotations

import threading
import time

import pytest

from app.broker import Readiness
from app.errors import UpstreamError, UpstreamUnavailable


class Keycloak:
    """A discovery fetch that waits until released, or fails, and counts how often it is asked."""

    def __init__(self, fails: bool = False):
        self.release = threading.Event()
        self.asked = 0
        self.fails = fails

    def discovery(self) -> dict:
        self.asked += 1
        self.release.wait(5)
        if self.fails:
            raise UpstreamError()
        return {}


class Keys:
    def ready(self) -> bool:
        return True


def test_probes_arriving_during_a_check_answer_at_once_without_asking_keycloak():
    """While one probe waits on Keycloak, the next one is a prompt 503; Keycloak was asked once."""
    keycloak = Keycloak()
    readiness = Readiness(keycloak, Keys())
    first = threading.Thread(target=readiness.check)
    first.start()
    while not keycloak.asked:
        time.sleep(0.01)
    with pytest.raises(UpstreamUnavailable) as waiting:
        readiness.check()
    keycloak.release.set()
    first.join(5)
    assert (keycloak.asked, waiting.value.message) == (1, "The broker is still checking Keycloak; try again shortly")


def test_a_negative_verdict_is_kept_for_its_hold():
    """Keycloak down: the first probe asks it, later probes within `hold` get the same 503 without asking."""
    keycloak = Keycloak(fails=True)
    keycloak.release.set()
    now = [100.0]
    readiness = Readiness(keycloak, Keys(), hold=2.0, clock=lambda: now[0])
    messages = []
    for moment in (100.0, 101.0, 101.9, 102.1):
        now[0] = moment
        with pytest.raises(UpstreamUnavailable) as refused:
            readiness.check()
        messages.append(refused.value.message)
    assert (keycloak.asked, set(messages)) == (2, {"Keycloak's discovery document is not available yet"})
