"""The only door to Keycloak: every HTTP call to the realm goes through `KeycloakClient`.

Callers get a `TokenSet` or a `BrokerError`; nothing else in the app knows Keycloak's wire format,
and nothing here knows Flask. One pooled keep-alive `Wire` (app/keycloak_http.py) is shared by all threads of a
worker: no per-call state is ever stored on it (python-keycloak's KeycloakOpenID writes per-call
headers into a shared dict, which is why it is not used here), and it never retries, because a
replayed refresh-token POST is a reuse and Keycloak ends the session on reuse.

Isolation: at most BROKER_UPSTREAM_CONCURRENCY calls are in flight at once; beyond that a call fails at
once with 503, so a hung Keycloak holds a bounded number of requests. A refresh is read for up to
BROKER_REFRESH_ANSWER_LIMIT seconds (its caller may stop waiting earlier; see app.refresh_coalescing), every other
call for KEYCLOAK_READ_TIMEOUT. A connection that breaks after the request may have reached Keycloak is
told apart from one that never connected: the first answers 503 with a message that says so.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from app.config import Settings
from app.errors import (
    AnswerLost,
    BrokerError,
    ClientRejected,
    InvalidPassword,
    InvalidRequest,
    UserExists,
    UpstreamBusy,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.keycloak_http import Answer, AnswerBroken, AnswerTooLarge, NoAnswer, NotConnected, Wire
from app.metrics import KEYCLOAK_CONNECTIONS, KEYCLOAK_LATENCY, keycloak_outcome
from app.keycloak_errors import ADMIN, CODE, DISCOVERY, INTROSPECT, KEYS, LOGIN, LOGOUT, REFRESH, SERVICE, translate

log = logging.getLogger(__name__)

USER_AGENT = "token-broker"
ACCESS_HINT = "access_token"  # RFC 7662 token_type_hint: the name of a kind of token


@dataclass(frozen=True, repr=False)
class TokenSet:
    """The tokens Keycloak issued, reduced to the fields the contract passes on."""

    access_token: str
    token_type: str
    expires_in: int | None = None
    refresh_token: str | None = None
    refresh_expires_in: int | None = None
    scope: str | None = None
    id_token: str | None = None

    def __repr__(self) -> str:  # tokens never reach a log line through a repr
        return f"TokenSet(token_type={self.token_type!r}, expires_in={self.expires_in}, scope={self.scope!r})"

    @classmethod
    def from_response(cls, body: Any) -> "TokenSet":
        """Build a TokenSet from a token-endpoint JSON body; raise UpstreamError when it is unusable."""
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str) or not body["access_token"]:
            raise UpstreamError()
        strings = ("token_type", "refresh_token", "scope", "id_token")
        numbers = ("expires_in", "refresh_expires_in")
        for name in strings:
            if body.get(name) is not None and not isinstance(body[name], str):
                raise UpstreamError()
        for name in numbers:
            value = body.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise UpstreamError()
        return cls(
            access_token=body["access_token"],
            token_type=body.get("token_type") or "Bearer",
            expires_in=body.get("expires_in"),
            refresh_token=body.get("refresh_token"),
            refresh_expires_in=body.get("refresh_expires_in"),
            scope=body.get("scope"),
            id_token=body.get("id_token"),
        )


class KeycloakClient:
    """Password login, refresh and logout against one realm, safe to share between threads."""

    def __init__(self, settings: Settings, wire: Wire | None = None):
        self.settings = settings
        self.wire = wire or Wire(verify=settings.tls_verify, pool_size=settings.upstream_concurrency,
                                 user_agent=USER_AGENT, on_connect=KEYCLOAK_CONNECTIONS.inc)
        self._timeout = (settings.connect_timeout, settings.read_timeout)
        self._refresh_timeout = (settings.connect_timeout, settings.refresh_answer_limit)
        self._slots = threading.BoundedSemaphore(settings.upstream_concurrency)
        self._discovery: dict[str, Any] | None = None
        self._discovery_lock = threading.Lock()
        self._service_token: tuple[str, float] | None = None  # (access token, monotonic time to renew it)
        self._service_lock = threading.Lock()

    @property
    def discovery_url(self) -> str:
        return f"{self.settings.realm_url}/.well-known/openid-configuration"

    def discovery(self) -> dict[str, Any]:
        """The realm's discovery document, fetched once and kept; raise BrokerError if it cannot be had."""
        if self._discovery is not None:
            return self._discovery
        with self._discovery_lock:
            if self._discovery is None:
                self._discovery = self._fetch_discovery()
        return self._discovery

    def _fetch_discovery(self) -> dict[str, Any]:
        response = self._send(DISCOVERY, "GET", self.discovery_url)
        document = _json(response)
        required = ("issuer", "token_endpoint", "end_session_endpoint", "jwks_uri")
        if response.status_code != 200 or not isinstance(document, dict) or not all(
            isinstance(document.get(k), str) for k in required
        ):
            log.error(
                "Keycloak discovery document unusable: GET %s answered %s (%s); check KEYCLOAK_URL and KEYCLOAK_REALM",
                self.discovery_url,
                response.status_code,
                response.headers.get("Content-Type", "no content type"),
            )
            raise UpstreamError()
        return document

    def login(self, username: str, password: str, scope: str | None = None) -> TokenSet:
        """Run the password grant; return the TokenSet or raise the BrokerError for Keycloak's refusal."""
        form = {"grant_type": "password", "username": username, "password": password}
        if scope is not None:
            form["scope"] = scope
        return TokenSet.from_response(self._token_call(LOGIN, self.discovery()["token_endpoint"], form))

    def exchange_code(self, code: str, verifier: str, redirect_uri: str) -> TokenSet:
        """Redeem an authorization code with its PKCE verifier (never retried: a code is single use)."""
        form = {"grant_type": "authorization_code", "code": code, "code_verifier": verifier,
                "redirect_uri": redirect_uri}
        return TokenSet.from_response(self._token_call(CODE, self.discovery()["token_endpoint"], form))

    def refresh(self, refresh_token: str, scope: str | None = None) -> TokenSet:
        """Run the refresh grant exactly once (never retried); return the TokenSet or raise BrokerError."""
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if scope is not None:
            form["scope"] = scope
        url = self.discovery()["token_endpoint"]
        return TokenSet.from_response(self._token_call(REFRESH, url, form, timeout=self._refresh_timeout))

    def logout(self, refresh_token: str) -> None:
        """End the Keycloak session the refresh token belongs to; raise BrokerError if Keycloak refuses."""
        self._token_call(LOGOUT, self.discovery()["end_session_endpoint"], {"refresh_token": refresh_token})

    def jwks(self) -> Any:
        """The realm's JSON Web Key Set as Keycloak serves it; raise BrokerError if it cannot be had."""
        url = self.discovery()["jwks_uri"]
        response = self._send(KEYS, "GET", url)
        document = _json(response)
        if response.status_code != 200 or not isinstance(document, dict):
            log.error("Keycloak's JWKS is unusable: GET %s answered %s", url, response.status_code)
            raise UpstreamError()
        return document

    def introspect(self, token: str) -> bool:
        """Ask Keycloak whether an access token is still active (RFC 7662); raise BrokerError on failure."""
        url = self.discovery().get("introspection_endpoint")
        if not isinstance(url, str):
            log.error("Keycloak's discovery document names no introspection_endpoint")
            raise UpstreamError()
        body = self._token_call(INTROSPECT, url, {"token": token, "token_type_hint": ACCESS_HINT})
        if not isinstance(body, dict) or not isinstance(body.get("active"), bool):
            raise UpstreamError()
        return body["active"]

    # --- the admin API, as the broker client's own service account (POST /api/auth/register) -------------------

    def create_user(self, *, username: str, email: str, first_name: str | None, last_name: str | None,
                    email_verified: bool) -> str:
        """Create an enabled user without credentials; return its id. Raise UserExists (409) or BrokerError."""
        representation = {"username": username, "email": email, "enabled": True, "emailVerified": email_verified,
                          "requiredActions": []}
        if first_name:
            representation["firstName"] = first_name
        if last_name:
            representation["lastName"] = last_name
        response = self._admin("POST", "/users", document=representation)
        if response.status_code == 201 and response.headers.get("Location", "").rstrip("/").rpartition("/")[2]:
            return response.headers["Location"].rstrip("/").rpartition("/")[2]
        body = _json(response)
        text = body.get("errorMessage", "") if isinstance(body, dict) else ""
        if response.status_code == 409:
            which = "email address" if "email" in str(text).lower() else "username"
            raise UserExists(f"An account with this {which} already exists")
        if response.status_code == 400 and isinstance(text, str) and text:
            raise InvalidRequest(_PROFILE_RULES.get(text.lower(), _admin_sentence(text)))
        raise self._admin_failure("create a user", response)

    def set_password(self, user_id: str, password: str) -> None:
        """Set a user's password (not temporary); raise InvalidPassword with the policy's reason, or BrokerError."""
        response = self._admin("PUT", f"/users/{user_id}/reset-password",
                               document={"type": "password", "value": password, "temporary": False})
        if response.status_code in (200, 204):
            return
        body = _json(response)
        if response.status_code == 400 and isinstance(body, dict):
            raise InvalidPassword(_password_sentence(body))
        raise self._admin_failure("set a password", response)

    def delete_user(self, user_id: str) -> None:
        """Delete a user (a registration that did not finish); raise BrokerError if Keycloak would not."""
        response = self._admin("DELETE", f"/users/{user_id}")
        if response.status_code not in (204, 404):
            raise self._admin_failure("delete a user", response)

    def pending_actions(self, username: str) -> list[str]:
        """The required actions Keycloak holds a user back for (empty when it cannot say); never raises."""
        try:
            field = "email" if "@" in username else "username"  # the realm lets users log in by email
            response = self._admin("GET", "/users", params={field: username, "exact": "true"})
        except BrokerError:
            return []
        users = _json(response)
        if response.status_code != 200 or not isinstance(users, list) or len(users) != 1 or \
                not isinstance(users[0], dict):
            return []
        actions = users[0].get("requiredActions")
        return [a for a in actions if isinstance(a, str)] if isinstance(actions, list) else []

    def _admin(self, method: str, path: str, **kwargs: Any) -> Answer:
        """One admin API call with the service account's token (in this call's headers, never on the session)."""
        url = f"{self.settings.keycloak_url}/admin/realms/{self.settings.keycloak_realm}{path}"
        headers = {"Authorization": f"Bearer {self._service_access()}"}
        response = self._send(ADMIN, method, url, headers=headers, **kwargs)
        if response.status_code == 401:  # the cached token was revoked or expired early: once more, fresh
            with self._service_lock:
                self._service_token = None
            headers = {"Authorization": f"Bearer {self._service_access()}"}
            response = self._send(ADMIN, method, url, headers=headers, **kwargs)
        return response

    def _service_access(self) -> str:
        """The service account's access token (client credentials), kept until 30 s before it expires."""
        with self._service_lock:
            cached = self._service_token
            if cached is not None and cached[1] > time.monotonic():
                return cached[0]
            body = self._token_call(SERVICE, self.discovery()["token_endpoint"], {"grant_type": "client_credentials"})
            tokens = TokenSet.from_response(body)
            self._service_token = (tokens.access_token, time.monotonic() + max(0, (tokens.expires_in or 60) - 30))
            return tokens.access_token

    def _admin_failure(self, action: str, response: Answer) -> BrokerError:
        if response.status_code in (401, 403):
            log.error("Keycloak refused the broker's service account the right to %s (%s); give the client %r a "
                      "service account with realm-management's manage-users role", action, response.status_code,
                      self.settings.client_id)
            return ClientRejected()
        log.warning("Keycloak's admin API answered %s when asked to %s", response.status_code, action)
        return UpstreamError()

    def _token_call(
        self, operation: str, url: str, form: dict[str, str], timeout: tuple[float, float] | None = None
    ) -> Any:
        """POST a client-authenticated form; return the JSON body of a success or raise the mapped error."""
        form = {"client_id": self.settings.client_id, "client_secret": self.settings.client_secret, **form}
        response = self._send(operation, "POST", url, data=form, timeout=timeout or self._timeout)
        if operation == LOGOUT and response.status_code in (200, 204) and not response.content:
            return None  # Keycloak answers 204; an empty 200 means the same
        body = _json(response)
        if operation != LOGOUT and response.status_code == 200:
            return body
        # Anything else, including a 200 HTML page from the logout endpoint, is a refusal or unusable.
        raise self._refusal(operation, response, body)

    def _refusal(self, operation: str, response: Answer, body: Any) -> BrokerError:
        """Translate a non-success answer into a BrokerError, logging what an operator needs to act."""
        error = body.get("error") if isinstance(body, dict) else None
        description = body.get("error_description") if isinstance(body, dict) else None
        if response.status_code >= 500 or not isinstance(error, str):
            log.warning(
                "Keycloak %s answered %s with an unusable body (%s, error=%s)",
                operation,
                response.status_code,
                response.headers.get("Content-Type", "no content type"),
                _short(error),
            )
            return UpstreamError()
        outcome = translate(operation, error, description if isinstance(description, str) else "")
        if isinstance(outcome, ClientRejected):
            log.error(
                "Keycloak rejected the broker's own client %r during %s: %s (%s); check KEYCLOAK_CLIENT_ID, "
                "KEYCLOAK_CLIENT_SECRET and that the client is confidential with %s enabled",
                self.settings.client_id,
                operation,
                _short(error),
                _short(description),
                {SERVICE: "service accounts (for registration; its service account needs realm-management's "
                          "manage-users)", CODE: "the standard flow and this redirect URI (BROKER_CALLBACK_URL)"}
                .get(operation, "direct access grants"),
            )
        elif isinstance(outcome, UpstreamError):
            log.warning(
                "Keycloak %s answered %s with an error the broker does not know: %s (%s)",
                operation,
                response.status_code,
                _short(error),
                _short(description),
            )
        return outcome

    def _send(self, operation: str, method: str, url: str, *, timeout: tuple[float, float] | None = None,
              headers: dict[str, str] | None = None, data: dict[str, str] | None = None, document: Any = None,
              params: dict[str, str] | None = None) -> Answer:
        """One HTTP exchange with our timeouts; network failures become 503/504 BrokerErrors.

        `data` is sent as a form, `document` as JSON, `params` as the query string.
        """
        if not self._slots.acquire(blocking=False):
            log.warning("%d calls to Keycloak are already in flight (BROKER_UPSTREAM_CONCURRENCY); refusing %s",
                        self.settings.upstream_concurrency, operation)
            KEYCLOAK_LATENCY.labels(operation, "busy").observe(0.0)
            raise UpstreamBusy()
        timeout = timeout or self._timeout
        fields = list((headers or {}).items())
        body = b""
        if data is not None:
            body = urlencode(data).encode()
            fields.append(("Content-Type", "application/x-www-form-urlencoded"))
        elif document is not None:
            body = json.dumps(document).encode()
            fields.append(("Content-Type", "application/json"))
        if params:
            url = f"{url}?{urlencode(params)}"
        started = time.perf_counter()
        failure: str | None = None
        status: int | None = None
        try:
            response = self.wire.request(method, url, headers=fields, body=body, timeout=timeout)
            status = response.status_code
            return response
        except NotConnected as exc:
            failure = "unreachable"
            if exc.tls:
                log.error("TLS failure talking to Keycloak during %s: %s; check KEYCLOAK_CA_BUNDLE", operation, exc)
            else:
                log.warning("Keycloak unreachable during %s: %s", operation, exc)
            raise UpstreamUnavailable() from None
        except NoAnswer:
            failure = "timeout"
            log.warning("Keycloak did not answer %s within %.1fs", operation, timeout[1])
            raise UpstreamTimeout() from None
        except AnswerBroken as exc:
            failure = "lost"
            log.warning("the connection to Keycloak broke during %s before its answer arrived (%s)", operation, exc)
            raise AnswerLost() from None
        except AnswerTooLarge as exc:
            failure = "error"
            log.warning("Keycloak %s failed: %s", operation, exc)
            raise UpstreamError() from None
        finally:
            self._slots.release()
            KEYCLOAK_LATENCY.labels(operation, keycloak_outcome(status, failure)).observe(time.perf_counter() - started)


def _json(response: Answer) -> Any:
    """The body as JSON, or None when it is not JSON (an HTML page from a proxy, say)."""
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return None


# Keycloak's password-policy error keys and the sentence each becomes ({0} is the policy's number, if any).
_PASSWORD_RULES = {
    "invalidPasswordMinLengthMessage": "The password must be at least {0} characters long",
    "invalidPasswordMaxLengthMessage": "The password must be at most {0} characters long",
    "invalidPasswordMinDigitsMessage": "The password must contain at least {0} digits",
    "invalidPasswordMinLowerCaseCharsMessage": "The password must contain at least {0} lower-case letters",
    "invalidPasswordMinUpperCaseCharsMessage": "The password must contain at least {0} upper-case letters",
    "invalidPasswordMinSpecialCharsMessage": "The password must contain at least {0} special characters",
    "invalidPasswordNotUsernameMessage": "The password must not be the username",
    "invalidPasswordNotEmailMessage": "The password must not be the email address",
    "invalidPasswordHistoryMessage": "The password must not be one of the last {0} passwords",
    "invalidPasswordBlacklistedMessage": "The password is too common",
    "invalidPasswordRegexPatternMessage": "The password does not match the required pattern",
}


# Keycloak's user-profile error keys (a registration's username, email or names) and their sentences.
_PROFILE_RULES = {
    "error-invalid-length": "username must be 3 to 255 characters long, and names at most 255",
    "error-username-invalid-character": "username contains a character that is not allowed",
    "error-invalid-email": "email must be an email address",
    "error-person-name-invalid-character": "given_name and family_name must not contain characters like < > & \"",
    "error-user-attribute-required": "A field the realm requires is missing",
}


def _password_sentence(body: dict) -> str:
    """Keycloak's password-policy refusal in plain words (its key, or its own description as a fallback)."""
    key, description = body.get("error"), body.get("error_description")
    description = description if isinstance(description, str) else ""
    number = next((word.rstrip(".") for word in description.split() if word.rstrip(".").isdigit()), "")
    if isinstance(key, str) and key in _PASSWORD_RULES:
        return _PASSWORD_RULES[key].format(number)
    return _admin_sentence(description) if description else InvalidPassword.message


def _admin_sentence(text: str) -> str:
    """An admin API message as one sentence: "Invalid password: minimum length 10." → that, tidied."""
    text = text.strip().rstrip(".")
    return (text[:1].upper() + text[1:])[:200] if text else "The request was refused"


def _short(text: Any, limit: int = 200) -> str:
    """Keycloak's own words for a log line, bounded in length."""
    return str(text)[:limit] if text is not None else "-"
