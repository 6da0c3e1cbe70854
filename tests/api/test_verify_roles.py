"""GET /api/auth/verify?role=...&client_role=<client>:<role>: role requirements for gateways, all of which must hold."""

from __future__ import annotations

import time

import pytest

from app.web.routes.tokens import GATEWAY_METHODS
from tests.support.keycloak_stub import body_of

ORDERS = {"orders-api": {"roles": ["orders:read", "orders:write"]}, "account": {"roles": ["view-profile"]}}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def verify(client, token: str | None, query: list[tuple[str, str]], method: str = "GET", **kwargs):
    headers = bearer(token) if token is not None else {}
    return client.open("/api/auth/verify", method=method, headers=headers, query_string=query, **kwargs)


def lacks(message: str) -> tuple[int, dict]:
    return 403, {"error": "insufficient_role", "message": message}


def bad(message: str) -> tuple[int, dict]:
    return 400, {"error": "invalid_request", "message": message}


def outcome(response) -> tuple[int, dict | bytes]:
    data = response.get_data()
    return response.status_code, (body_of(response) if data else data)


@pytest.fixture
def token(keycloak) -> str:
    """bob's token: realm roles user, admin, default-roles-demo; client roles of orders-api and account."""
    return keycloak.realm_keys.token(resource_access=ORDERS)


@pytest.mark.parametrize("method", GATEWAY_METHODS)
def test_held_roles_pass_with_the_identity_headers(client, token, method):
    """Every realm and client role the query asks for is held: 204 with the usual X-Auth-* headers, any method."""
    query = [("role", "admin"), ("role", "user"), ("client_role", "orders-api:orders:read"),
             ("client_role", "account:view-profile")]
    response = verify(client, token, query, method=method)
    assert outcome(response) == (204, b"")
    assert {k: v for k, v in response.headers.items() if k.startswith("X-Auth-")} == {
        "X-Auth-Subject": "0b2f0d3e-bob",
        "X-Auth-Username": "bob",
        "X-Auth-Email": "bob@example.com",
        "X-Auth-Roles": "admin,default-roles-demo,user",
    }


@pytest.mark.parametrize("method", GATEWAY_METHODS)
def test_a_lacking_realm_role_is_403_insufficient_role(client, token, method):
    """A valid token without a required realm role: 403 insufficient_role naming it, no X-Auth-* headers, any method."""
    response = verify(client, token, [("role", "admin"), ("role", "auditor")], method=method)
    expected = lacks("The access token lacks the realm role 'auditor'")
    assert outcome(response) == (expected if method != "HEAD" else (403, b""))
    assert not [k for k in response.headers.keys() if k.startswith("X-Auth-")]
    assert "WWW-Authenticate" not in response.headers
    assert (response.headers["Cache-Control"], response.headers["Pragma"]) == ("no-store", "no-cache")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ([("client_role", "orders-api:orders:delete")], "The access token lacks the role 'orders:delete' of the client 'orders-api'"),
        ([("client_role", "billing:read")], "The access token lacks the role 'read' of the client 'billing'"),
        ([("client_role", "account:orders:read")], "The access token lacks the role 'orders:read' of the client 'account'"),
        ([("client_role", "orders-api:admin")], "The access token lacks the role 'admin' of the client 'orders-api'"),
        ([("role", "orders:read")], "The access token lacks the realm role 'orders:read'"),
        ([("role", "Admin")], "The access token lacks the realm role 'Admin'"),
        ([("role", "admin ")], "The access token lacks the realm role 'admin '"),
    ],
    ids=["other-role-of-the-client", "client-not-in-token", "role-of-another-client", "realm-role-is-not-a-client-role",
         "client-role-is-not-a-realm-role", "case-matters", "spaces-matter"],
)
def test_roles_match_exactly_in_their_own_place(client, token, query, message):
    """A requirement holds only for exactly that name, in realm_access or in that client's resource_access."""
    assert outcome(verify(client, token, query)) == lacks(message)


def test_the_message_names_the_first_lacking_realm_role_before_any_client_role(client, token):
    """Several requirements lacking: the first realm role in query order is named, whatever the parameters' order."""
    query = [("client_role", "billing:read"), ("role", "admin"), ("role", "ops"), ("role", "auditor")]
    assert outcome(verify(client, token, query)) == lacks("The access token lacks the realm role 'ops'")


def test_then_the_first_lacking_client_role_in_query_order(client, token):
    """Realm roles all held: the first lacking client role in query order is named."""
    query = [("client_role", "orders-api:orders:read"), ("client_role", "billing:pay"), ("client_role", "hr:read")]
    assert outcome(verify(client, token, query)) == lacks("The access token lacks the role 'pay' of the client 'billing'")


@pytest.mark.parametrize(
    "claims",
    [
        {"realm_access": None, "resource_access": None},
        {"realm_access": {"roles": "admin"}, "resource_access": {"orders-api": {"roles": "orders:read"}}},
        {"realm_access": ["admin"], "resource_access": ["orders-api"]},
        {"realm_access": {"roles": [["admin"], {"admin": True}]}, "resource_access": {"orders-api": ["orders:read"]}},
    ],
    ids=["absent", "roles-a-string", "access-a-list", "roles-not-strings"],
)
def test_missing_or_odd_role_claims_hold_no_role(client, keycloak, claims):
    """A token whose role claims are absent or not Keycloak-shaped holds no role: 403, never a 500 or a pass."""
    token = keycloak.realm_keys.token(**claims)
    assert outcome(verify(client, token, [("role", "admin")])) == lacks("The access token lacks the realm role 'admin'")
    assert outcome(verify(client, token, [("client_role", "orders-api:orders:read")])) == lacks(
        "The access token lacks the role 'orders:read' of the client 'orders-api'")


def test_non_ascii_roles_are_matched_after_percent_decoding(client, keycloak):
    """A role outside ASCII, percent-encoded in the query as UTF-8, matches the token's role of that name."""
    token = keycloak.realm_keys.token(realm_access={"roles": ["prüfer"]}, resource_access={"käse": {"roles": ["éditeur"]}})
    response = client.get("/api/auth/verify?role=pr%C3%BCfer&client_role=k%C3%A4se:%C3%A9diteur", headers=bearer(token))
    assert outcome(response) == (204, b"")
    response = client.get("/api/auth/verify?role=pr%C3%BCfer&role=%E7%AE%A1%E7%90%86", headers=bearer(token))
    assert outcome(response) == lacks("The access token lacks the realm role '管理'")


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ([("client_role", "orders-api")], "client_role must be <client>:<role>, with neither part empty"),
        ([("client_role", ":orders:read")], "client_role must be <client>:<role>, with neither part empty"),
        ([("client_role", "orders-api:")], "client_role must be <client>:<role>, with neither part empty"),
        ([("client_role", ":")], "client_role must be <client>:<role>, with neither part empty"),
        ([("client_role", "")], "client_role must be <client>:<role>, with neither part empty"),
        ([("role", "")], "role must not be empty"),
        ([("role", "x" * 256)], "role must be at most 255 characters"),
        ([("client_role", "c" * 256 + ":read")], "client_role's client and role must be at most 255 characters each"),
        ([("client_role", "orders-api:" + "r" * 256)],
         "client_role's client and role must be at most 255 characters each"),
        ([("role", "admin")] * 11 + [("client_role", "orders-api:orders:read")] * 10,
         "At most 20 role and client_role parameters are accepted"),
        ([("role", "admin"), ("client_role", "no-colon")], "client_role must be <client>:<role>, with neither part empty"),
    ],
    ids=["no-colon", "empty-client", "empty-role", "colon-only", "empty", "empty-realm-role", "role-too-long",
         "client-too-long", "client-role-too-long", "21-requirements", "held-role-then-a-malformed-one"],
)
def test_malformed_requirements_are_400_invalid_request(client, token, query, message):
    """A requirement the broker cannot read, or too many or too long ones: 400 invalid_request, never a pass."""
    assert outcome(verify(client, token, query)) == bad(message)


def test_a_malformed_requirement_is_400_even_after_a_lacking_role(client, token):
    """Every requirement is read before any is checked: a malformed one is 400 even when an earlier role is lacking."""
    query = [("role", "auditor"), ("client_role", "no-colon")]
    assert outcome(verify(client, token, query)) == bad("client_role must be <client>:<role>, with neither part empty")


def test_the_limits_themselves_are_accepted(client, keycloak):
    """20 requirements, and names of 255 characters, are read and checked."""
    long_role, long_client = "r" * 255, "c" * 255
    token = keycloak.realm_keys.token(realm_access={"roles": ["admin", long_role]},
                                      resource_access={long_client: {"roles": [long_role]}})
    query = [("role", "admin")] * 18 + [("role", long_role), ("client_role", f"{long_client}:{long_role}")]
    assert outcome(verify(client, token, query)) == (204, b"")


@pytest.mark.parametrize(
    ("authorization", "expected"),
    [
        (None, (401, {"error": "access_token_required", "message": "An access token is required"})),
        ("Bearer not-a-token", (401, {"error": "invalid_token", "message": "Access token is malformed"})),
    ],
    ids=["no-token", "malformed-token"],
)
@pytest.mark.parametrize(
    "query", [[("role", "admin")], [("role", "auditor")], [("client_role", "no-colon")]],
    ids=["held", "lacking", "malformed"],
)
def test_the_token_is_checked_first(client, keycloak, authorization, expected, query):
    """Without a valid token the answer is the 401 of today, whatever the requirements say."""
    headers = {} if authorization is None else {"Authorization": authorization}
    response = client.get("/api/auth/verify", headers=headers, query_string=query)
    assert outcome(response) == expected
    assert "WWW-Authenticate" in response.headers


def test_an_expired_token_is_401_expired_not_403(client, keycloak):
    """An expired token lacking the role: 401 invalid_token with X-Token-Expired, so the client refreshes."""
    token = keycloak.realm_keys.token(exp=int(time.time()) - 60, realm_access={"roles": []})
    response = verify(client, token, [("role", "admin")])
    assert outcome(response) == (401, {"error": "invalid_token", "message": "Access token expired"})
    assert response.headers["X-Token-Expired"] == "true"


@pytest.mark.parametrize(
    "body",
    [{"data": {"role": "auditor", "client_role": "no-colon"}},
     {"json": {"role": "auditor", "client_role": "no-colon"}}],
    ids=["form", "json"],
)
def test_requirements_come_only_from_the_query(client, token, body):
    """role and client_role in a form or JSON body are no requirements: only the query string counts."""
    assert outcome(verify(client, token, [], method="POST", **body)) == (204, b"")
    assert outcome(verify(client, token, [("role", "auditor")], method="POST", **body)) == lacks(
        "The access token lacks the realm role 'auditor'")


def test_other_query_parameters_are_ignored_as_before(client, token):
    """Parameters other than role and client_role change nothing (a misspelt `roles=` is no requirement at all)."""
    assert outcome(verify(client, token, [("roles", "auditor"), ("rd", "/x")])) == (204, b"")


def test_without_requirements_verify_answers_as_before(client, keycloak):
    """No role parameters: a valid token without any role passes, as it always did."""
    token = keycloak.realm_keys.token(realm_access=None, resource_access=None)
    response = verify(client, token, [])
    assert outcome(response) == (204, b"")
    assert response.headers["X-Auth-Roles"] == ""
