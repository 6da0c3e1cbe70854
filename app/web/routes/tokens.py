"""GET /api/auth/me (who am I) and /api/auth/verify (yes/no for gateways), from a locally validated bearer token."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from flask import Blueprint, Response, jsonify, request
from werkzeug.datastructures import MultiDict

from app.errors import AccessTokenRequired, InsufficientRole, InvalidRequest, InvalidToken
from app.metrics import TOKEN_VALIDATIONS
from app.web.context import broker
from app.web.schemas import me_response

bp = Blueprint("tokens", __name__, url_prefix="/api/auth")

# nginx auth_request sends the original request's method; Traefik forward-auth sends GET.
GATEWAY_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
# /verify's role requirements: at most this many `role` and `client_role` parameters together, and names of at
# most this many characters (Keycloak's own limit for role names and client ids).
MAX_ROLE_REQUIREMENTS = 20
MAX_ROLE_NAME_CHARS = 255


def bearer_token() -> str:
    """The token of `Authorization: Bearer <token>`; raise AccessTokenRequired or InvalidToken."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AccessTokenRequired()
    if token.split() != [token]:  # whitespace inside; split() is ~30x cheaper than a per-character scan
        raise InvalidToken("Access token is malformed")
    return token


def authenticated_claims() -> dict[str, Any]:
    """The claims of the caller's valid access token (and a live session, with BROKER_TOKEN_INTROSPECTION)."""
    token = bearer_token()
    parts = broker()
    try:
        claims = parts.access_tokens.validate(token)
        if parts.ended_sessions.ended(claims):  # back-channel logout: a local lookup, no call to Keycloak
            raise InvalidToken("The session of this access token has ended")
        if parts.introspection is not None and not parts.introspection.active(token):
            raise InvalidToken("The session of this access token has ended")
    except InvalidToken as exc:
        TOKEN_VALIDATIONS.labels("expired" if exc.expired else "invalid").inc()
        raise
    TOKEN_VALIDATIONS.labels("valid").inc()
    return claims


def identity(claims: dict[str, Any]) -> dict[str, Any]:
    """The contract's identity fields from access-token claims."""
    realm_access = claims.get("realm_access")
    resource_access = claims.get("resource_access")
    return {
        "sub": claims.get("sub"),
        "username": claims.get("preferred_username"),
        "email": claims.get("email"),
        "email_verified": claims.get("email_verified"),
        "name": claims.get("name"),
        "given_name": claims.get("given_name"),
        "family_name": claims.get("family_name"),
        "roles": _roles(realm_access),
        "client_roles": {
            client: _roles(access)
            for client, access in (resource_access.items() if isinstance(resource_access, dict) else [])
        },
        "scope": claims.get("scope"),
        "expires_at": claims.get("exp"),
    }


def _roles(access: Any) -> list[str]:
    roles = access.get("roles") if isinstance(access, dict) else None
    return sorted(r for r in roles if isinstance(r, str)) if isinstance(roles, list) else []


def _header_value(value: Any, *, list_item: bool = False) -> str:
    """Printable ASCII as is; anything else (non-ASCII, control characters, '%') percent-encoded as UTF-8.

    Outer spaces are encoded too (a header value loses them), and in an item of a comma-separated list so is
    ',' (the role "admin,superuser" must not read as two roles).
    """
    if value is None:
        return ""
    text = quote(str(value), safe=_HEADER_SAFE.replace(",", "") if list_item else _HEADER_SAFE)
    inner = text.strip(" ")
    if inner == text:
        return text
    if not inner:
        return "%20" * len(text)
    lead = len(text) - len(text.lstrip(" "))
    trail = len(text) - len(text.rstrip(" "))
    return "%20" * lead + inner + "%20" * trail


@bp.get("/me")
def me() -> Response:
    """200 with the caller's identity; 401 access_token_required or invalid_token."""
    return jsonify(me_response.dump(identity(authenticated_claims())))


def role_requirements(args: MultiDict[str, str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The realm roles (`role=`) and client roles (`client_role=<client>:<role>`) a query requires; InvalidRequest
    for an empty or over-long name, a client_role without its colon, or more than MAX_ROLE_REQUIREMENTS of them.

    The client id is what comes before the first ':', the role all that follows (a role may contain ':').
    Other parameters are ignored, as they always were.
    """
    realm = args.getlist("role")
    client = args.getlist("client_role")
    if len(realm) + len(client) > MAX_ROLE_REQUIREMENTS:
        raise InvalidRequest(f"At most {MAX_ROLE_REQUIREMENTS} role and client_role parameters are accepted")
    for role in realm:
        if not role:
            raise InvalidRequest("role must not be empty")
        if len(role) > MAX_ROLE_NAME_CHARS:
            raise InvalidRequest(f"role must be at most {MAX_ROLE_NAME_CHARS} characters")
    pairs = []
    for value in client:
        name, colon, role = value.partition(":")
        if not (name and colon and role):
            raise InvalidRequest("client_role must be <client>:<role>, with neither part empty")
        if len(name) > MAX_ROLE_NAME_CHARS or len(role) > MAX_ROLE_NAME_CHARS:
            raise InvalidRequest(f"client_role's client and role must be at most {MAX_ROLE_NAME_CHARS} characters each")
        pairs.append((name, role))
    return realm, pairs


def lacking_role(claims: dict[str, Any], realm: list[str], client: list[tuple[str, str]]) -> str | None:
    """The sentence naming the first requirement the token lacks (realm roles first, each kind in query order), or
    None when it has them all. Realm roles are `realm_access.roles`, a client's `resource_access.<client>.roles`."""
    if realm:
        held = set(_roles(claims.get("realm_access")))
        for role in realm:
            if role not in held:
                return f"The access token lacks the realm role '{role}'"
    if client:
        resource_access = claims.get("resource_access")
        resource_access = resource_access if isinstance(resource_access, dict) else {}
        for name, role in client:
            if role not in _roles(resource_access.get(name)):
                return f"The access token lacks the role '{role}' of the client '{name}'"
    return None


@bp.route("/verify", methods=GATEWAY_METHODS)
def verify() -> Response:
    """204 with X-Auth-* identity headers for a valid access token that has every role the query requires;
    401 in the fixed shape for a missing or invalid token, then 400 for a malformed requirement, 403 for a lacking role.
    """
    claims = authenticated_claims()
    if request.args:
        missing = lacking_role(claims, *role_requirements(request.args))
        if missing is not None:
            raise InsufficientRole(missing)
    who = identity(claims)
    response = Response(status=204)
    del response.headers["Content-Type"]
    response.headers["X-Auth-Subject"] = _header_value(who["sub"])
    response.headers["X-Auth-Username"] = _header_value(who["username"])
    response.headers["X-Auth-Email"] = _header_value(who["email"])
    response.headers["X-Auth-Roles"] = ",".join(_header_value(role, list_item=True) for role in who["roles"])
    return response
