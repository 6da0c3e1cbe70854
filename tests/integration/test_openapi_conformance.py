"""schemathesis against the served OpenAPI document, with the real broker and real Keycloak behind it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import requests

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance," \
         "response_headers_conformance"


def test_the_broker_keeps_its_documented_contract(broker_url, make_user, tmp_path):
    """Generated requests to every documented operation find no server error and nothing the document denies.

    schemathesis reuses values it sees in responses (the username from /me, say) to generate logins, so the
    bearer token is a throw-away user's: its brute-force lockout then harms no other test.
    """
    user = make_user()
    login = requests.post(f"{broker_url}/api/auth/login", json={"username": user.username, "password": user.password},
                          timeout=30)
    access_token = login.json()["token"]["access_token"]
    schemathesis = Path(sys.executable).with_name("schemathesis")
    run = subprocess.run(
        [str(schemathesis), "run", f"{broker_url}/api/openapi.json", "--checks", CHECKS, "--max-examples", "25",
         "--seed", "1", "--header", f"Authorization: Bearer {access_token}", "--request-timeout", "30"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"},
    )
    summary = run.stdout[-3000:]
    assert run.returncode == 0, summary
    assert " passed" in summary and "failed" not in summary.split("Test cases:")[-1], summary
