"""The pure parts of accounts: the account-setup sentence, the networks IP binding compares, unverified claims."""

from __future__ import annotations

import base64
import json

import pytest

from app.accounts import SessionAddresses, network_of, setup_message, unverified_claims


@pytest.mark.parametrize(("actions", "message"), [
    ([], "Account is not fully set up; finish setting it up in the account console"),
    (["VERIFY_EMAIL"], "Account is not fully set up: verify the email address in the account console, then log in "
                       "again"),
    (["VERIFY_EMAIL", "UPDATE_PASSWORD", "CONFIGURE_TOTP"],
     "Account is not fully set up: choose a new password, verify the email address and set up one-time codes in "
     "the account console, then log in again"),
    (["some-custom-action"], "Account is not fully set up: finish a pending step in the account console, then log "
                             "in again"),
])
def test_the_setup_sentence_names_what_is_pending_in_a_fixed_order(actions, message):
    """Keycloak lists actions in any order; the sentence always reads the same."""
    assert setup_message(actions) == message


@pytest.mark.parametrize(("address", "mode", "network"), [
    ("203.0.113.7", "address", "203.0.113.7"),
    ("203.0.113.7", "prefix", "203.0.113.0/24"),
    ("2001:db8:1:2::/64", "prefix", "2001:db8:1::/48"),
    ("unknown", "prefix", "unknown"),
])
def test_ip_binding_compares_the_address_or_its_network(address, mode, network):
    assert network_of(address, mode) == network


def test_a_session_is_bound_where_it_logged_in_until_its_lifetime_ends():
    """Known sessions refresh only from their network; unknown or expired ones are let through."""
    now = [0.0]
    addresses = SessionAddresses(None, clock=lambda: now[0])
    addresses.remember("sid-1", "203.0.113.0/24", ttl=60)
    assert (addresses.allows("sid-1", "203.0.113.0/24"), addresses.allows("sid-1", "198.51.100.0/24"),
            addresses.allows("sid-2", "198.51.100.0/24")) == (True, False, True)
    now[0] = 61
    assert addresses.allows("sid-1", "198.51.100.0/24")


def test_unverified_claims_read_a_payload_and_never_raise():
    payload = base64.urlsafe_b64encode(json.dumps({"sid": "s", "sub": "u"}).encode()).decode().rstrip("=")
    assert [unverified_claims(f"h.{payload}.sig"), unverified_claims("garbage"), unverified_claims(None),
            unverified_claims("a.!!!.c")] == [{"sid": "s", "sub": "u"}, {}, {}, {}]
