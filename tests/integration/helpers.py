"""Small helpers shared by the integration tests: reading JWT claims and throw-away Keycloak clients."""

from __future__ import annotations

import base64
import json
import uuid
from contextlib import contextmanager
from typing import Iterator


def claims(jwt: str) -> dict:
    """The payload of a JWT, decoded without checking anything (tests only read who it was issued for)."""
    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@contextmanager
def temp_client(kc_admin, **representation) -> Iterator[str]:
    """A confidential client with direct access grants, created for the duration of the block; yields its clientId."""
    client_id = f"probe-{uuid.uuid4().hex[:8]}"
    internal_id = kc_admin.create_client(
        {
            "clientId": client_id,
            "protocol": "openid-connect",
            "publicClient": False,
            "standardFlowEnabled": False,
            "directAccessGrantsEnabled": True,
            **representation,
        }
    )
    try:
        yield client_id
    finally:
        kc_admin.delete_client(internal_id)
