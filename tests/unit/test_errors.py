"""The error tree and the Keycloak error table, called directly: which class, status, code and message."""

from __future__ import annotations

import pytest

from app.errors import (
    AccountSetupRequired,
    AnswerKept,
    AnswerLost,
    BrokerError,
    ClientRejected,
    CoordinationUnavailable,
    HttpError,
    InternalError,
    InvalidClient,
    InvalidRequest,
    InvalidScope,
    InvalidToken,
    KeycloakRefused,
    LoginRejected,
    RefreshRejected,
    RefreshTokenRequired,
    RequestRefused,
    UpstreamBusy,
    UpstreamError,
    UpstreamFailure,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.keycloak_errors import CODE, LOGIN, LOGOUT, REFRESH, RULES, translate

# (operation, Keycloak's error, its description) -> (class, status, error, message)
TABLE = [
    ((LOGIN, "invalid_client", "Invalid client credentials"), (InvalidClient, 502, "invalid_client",
                                                                "The broker is misconfigured; try again later")),
    ((REFRESH, "unauthorized_client", "Client not allowed"), (ClientRejected, 502, "unauthorized_client",
                                                              "The broker is misconfigured; try again later")),
    ((LOGIN, "invalid_grant", "Invalid user credentials"), (LoginRejected, 401, "invalid_grant",
                                                            "Invalid username or password")),
    ((LOGIN, "invalid_grant", "Account disabled"), (LoginRejected, 401, "invalid_grant", "Account is disabled")),
    ((LOGIN, "invalid_grant", "Account temporarily disabled"), (LoginRejected, 401, "invalid_grant",
                                                                "Account is temporarily locked")),
    ((LOGIN, "invalid_grant", "Account is not fully set up"), (
        AccountSetupRequired, 401, "account_setup_required",
        "Account is not fully set up; finish setting it up in the account console")),
    ((LOGIN, "invalid_grant", "Something new"), (LoginRejected, 401, "invalid_grant", "Login was refused")),
    ((REFRESH, "invalid_scope", "Invalid scopes: admin"), (
        InvalidScope, 400, "invalid_scope", "The requested scope is not allowed for this client")),
    ((REFRESH, "invalid_grant", "Token is not active"), (RefreshRejected, 400, "invalid_grant", "Refresh token expired")),
    ((REFRESH, "invalid_grant", "Maximum allowed refresh token reuse exceeded"), (
        RefreshRejected, 400, "invalid_grant", "Refresh token was already used; the session has been ended")),
    ((REFRESH, "invalid_grant", "Session not active"), (RefreshRejected, 400, "invalid_grant", "Session has ended")),
    ((REFRESH, "invalid_grant", "Session doesn't have required client"), (
        RefreshRejected, 400, "invalid_grant", "Session has ended")),
    ((REFRESH, "invalid_grant", "Stale token"), (RefreshRejected, 400, "invalid_grant", "Session has ended")),
    ((REFRESH, "invalid_grant", "User disabled"), (RefreshRejected, 400, "invalid_grant", "Account is disabled")),
    ((LOGOUT, "invalid_grant", "Invalid refresh token. Token client and authorized client don't match"), (
        RefreshRejected, 400, "invalid_grant", "Refresh token was issued to another client")),
    ((LOGOUT, "invalid_grant", "Invalid refresh token"), (RefreshRejected, 400, "invalid_grant", "Invalid refresh token")),
    ((REFRESH, "invalid_request", "No refresh token"), (
        RefreshTokenRequired, 400, "refresh_token_required", "Refresh token is required")),
    ((CODE, "invalid_grant", "Code not valid"), (
        LoginRejected, 401, "invalid_grant", "The login could not be completed; start it again")),
    ((LOGIN, "unsupported_grant_type", "Unsupported grant_type"), (
        UpstreamError, 502, "upstream_error", "The identity provider returned an unusable answer")),
    ((LOGOUT, "invalid_scope", "Invalid scopes"), (
        UpstreamError, 502, "upstream_error", "The identity provider returned an unusable answer")),
]


@pytest.mark.parametrize(("answer", "expected"), TABLE)
def test_keycloak_answers_translate_to_the_documented_error(answer, expected):
    """Each Keycloak refusal becomes one leaf of the error tree with the contract's status, code and message."""
    error = translate(*answer)
    assert (type(error), error.status, error.error, error.message) == expected


def test_every_rule_of_the_table_is_reached_by_an_answer_above():
    """No rule is shadowed by an earlier one: each is the first match for some answer in TABLE."""
    first_matches = {next(rule for rule in RULES if rule.matches(*answer)) for answer, _ in TABLE
                     if any(rule.matches(*answer) for rule in RULES)}
    assert [rule for rule in RULES if rule not in first_matches] == []


@pytest.mark.parametrize(
    ("error", "branch"),
    [
        (InvalidRequest(), RequestRefused), (RefreshTokenRequired(), RequestRefused), (HttpError(), RequestRefused),
        (RefreshRejected(), KeycloakRefused), (LoginRejected(), KeycloakRefused), (InvalidClient(), KeycloakRefused),
        (AnswerKept(), UpstreamFailure), (AnswerLost(), UpstreamFailure), (UpstreamBusy(), UpstreamFailure),
        (CoordinationUnavailable(), UpstreamFailure), (UpstreamError(), UpstreamFailure),
    ],
)
def test_each_error_sits_on_its_branch_of_the_tree(error, branch):
    """Callers can catch a whole branch: a refusal by Keycloak, a request the broker refused, upstream trouble."""
    assert isinstance(error, branch)


@pytest.mark.parametrize(
    ("error", "restored_as"),
    [
        (RefreshRejected("Session has ended"), RefreshRejected),
        (LoginRejected(), LoginRejected),
        (InvalidClient(), InvalidClient),
        (AnswerLost(), UpstreamUnavailable),  # same status and code: restored as the most general leaf
        (AnswerKept(), UpstreamTimeout),
        (InternalError(), InternalError),
    ],
)
def test_an_error_rebuilt_from_its_parts_keeps_its_kind_and_answer(error, restored_as):
    """restore(parts()) gives the leaf class for the status and code, and the very same answer."""
    restored = BrokerError.restore(**error.parts())
    assert (type(restored), restored.parts()) == (restored_as, error.parts())


def test_an_unknown_status_and_code_is_rebuilt_as_a_plain_broker_error():
    """A stored outcome of a newer release, say, still renders its own status, code and message."""
    restored = BrokerError.restore(status=418, error="teapot", message="Short and stout", headers={})
    assert (type(restored), restored.status, restored.body()) == (
        BrokerError, 418, {"error": "teapot", "message": "Short and stout"})


def test_an_expired_token_says_so_in_its_headers():
    """InvalidToken carries the RFC 6750 challenge, and X-Token-Expired only when expiry is the only fault."""
    assert InvalidToken("Access token expired", expired=True).headers == {
        "WWW-Authenticate": 'Bearer realm="token-broker", error="invalid_token", '
                            'error_description="Access token expired"',
        "X-Token-Expired": "true",
    }
    assert "X-Token-Expired" not in InvalidToken("Access token is malformed").headers
