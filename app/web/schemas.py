"""Marshmallow schemas: they validate request bodies and shape every token response."""

from __future__ import annotations

import re
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_dump, validate

from app.errors import BrokerError, InvalidRequest, RefreshRejected, RefreshTokenRequired

# Keycloak 26 drops a form field longer than 4,000 characters and then answers "No refresh token"; its own
# refresh tokens are under 1,000. A longer one cannot be a refresh token of the realm: invalid_grant.
REFRESH_TOKEN_MAX = 4000


class _Text(fields.String):
    """A string field that knows its too-long message, the one failure that is never "missing", and the error
    a too-long value gets (InvalidRequest with that sentence, unless the field names another)."""

    def __init__(self, *, too_long: str, too_long_error: type[BrokerError] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.too_long = too_long
        self.too_long_error = too_long_error


def _text(name: str, *, required: bool, max_length: int, too_long_error: type[BrokerError] | None = None,
          extra: list | None = None) -> _Text:
    """A string field whose every failure reads as one plain sentence naming the field."""

    def not_blank(value: str) -> None:
        if not value.strip():
            raise ValidationError(f"{name} must not be blank")

    too_long = f"{name} must be at most {max_length} characters"
    return _Text(
        too_long=too_long,
        too_long_error=too_long_error,
        required=required,
        allow_none=False,
        metadata={"pattern": r"\S"},  # documents "not blank" in the OpenAPI document
        validate=[
            not_blank,
            validate.Length(max=max_length, error=too_long),
            *(extra or []),
        ],
        error_messages={
            "required": f"{name} is required",
            "null": f"{name} is required" if required else f"{name} must be a string",
            "invalid": f"{name} must be a string",
        },
    )


class _RequestSchema(Schema):
    """Unknown fields are ignored; a failure becomes the BrokerError named for the first bad field.

    `field_errors` names the error of a field that is missing or unusable (absent, null, blank, not a string);
    a value that is only too long is InvalidRequest with the field's own sentence, or the field's too_long_error.
    """

    class Meta:
        unknown = EXCLUDE

    field_errors: dict[str, type[BrokerError]] = {}

    def load_or_raise(self, data: dict[str, Any]) -> dict[str, Any]:
        """Validate `data`; raise InvalidRequest (or the field's own error) with one readable sentence."""
        try:
            return self.load(data)
        except ValidationError as exc:
            messages = exc.normalized_messages()
            field = next(name for name in self.fields if name in messages)
            message = str(messages[field][0])
            spec = self.fields[field]
            if isinstance(spec, _Text) and message == spec.too_long:
                raise (spec.too_long_error() if spec.too_long_error else InvalidRequest(message)) from None
            error_class = self.field_errors.get(field)
            if error_class is not None:
                raise error_class() from None
            raise InvalidRequest(message) from None


class LoginRequest(_RequestSchema):
    username = _text("username", required=True, max_length=255)
    password = _text("password", required=True, max_length=1024)
    scope = _text("scope", required=False, max_length=1024)


def _email(value: str) -> None:
    if not _EMAIL.fullmatch(value):
        raise ValidationError("email must be an email address")


# One @, something on both sides, a dot in the domain, no spaces: Keycloak checks the rest.
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s.]+")


class RegisterRequest(_RequestSchema):
    username = _text("username", required=True, max_length=255)
    email = _text("email", required=True, max_length=254, extra=[_email])
    password = _text("password", required=True, max_length=1024)
    given_name = _text("given_name", required=False, max_length=255)
    family_name = _text("family_name", required=False, max_length=255)


class RefreshRequest(_RequestSchema):
    refresh_token = _text("refresh_token", required=True, max_length=REFRESH_TOKEN_MAX, too_long_error=RefreshRejected)
    scope = _text("scope", required=False, max_length=1024)
    field_errors = {"refresh_token": RefreshTokenRequired}


class LogoutRequest(_RequestSchema):
    refresh_token = _text("refresh_token", required=True, max_length=REFRESH_TOKEN_MAX, too_long_error=RefreshRejected)
    field_errors = {"refresh_token": RefreshTokenRequired}


class Token(Schema):
    """The token object of the contract; fields Keycloak did not send are left out."""

    access_token = fields.String(required=True)
    refresh_token = fields.String()
    expires_in = fields.Integer()
    refresh_expires_in = fields.Integer()
    token_type = fields.String(required=True)
    scope = fields.String()
    id_token = fields.String()

    @post_dump
    def _drop_missing(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        return {key: value for key, value in data.items() if value is not None}


class TokenResponse(Schema):
    message = fields.String(required=True)
    token = fields.Nested(Token, required=True)


class RegisteredUser(Schema):
    sub = fields.String(required=True)
    username = fields.String(required=True)
    email = fields.String(required=True)


class RegisterResponse(Schema):
    message = fields.String(required=True)
    user = fields.Nested(RegisteredUser, required=True)
    token = fields.Nested(Token, required=True)


class MessageResponse(Schema):
    message = fields.String(required=True)


class MeResponse(Schema):
    """The caller's identity as GET /api/auth/me answers it; claims the token lacks are null."""

    sub = fields.String(allow_none=True)
    username = fields.String(allow_none=True)
    email = fields.String(allow_none=True)
    email_verified = fields.Boolean(allow_none=True)
    name = fields.String(allow_none=True)
    given_name = fields.String(allow_none=True)
    family_name = fields.String(allow_none=True)
    roles = fields.List(fields.String())
    client_roles = fields.Dict(keys=fields.String(), values=fields.List(fields.String()))
    scope = fields.String(allow_none=True)
    expires_at = fields.Integer(allow_none=True)


class ErrorResponse(Schema):
    """The fixed error shape: exactly these two keys."""

    error = fields.String(required=True)
    message = fields.String(required=True)


class HealthResponse(Schema):
    status = fields.String(required=True)
    service = fields.String(required=True)
    version = fields.String(required=True)
    uptime = fields.Float(required=True)
    timestamp = fields.String(required=True)


class ReadyResponse(Schema):
    status = fields.String(required=True)


login_request = LoginRequest()
register_request = RegisterRequest()
register_response = RegisterResponse()
refresh_request = RefreshRequest()
logout_request = LogoutRequest()
token_response = TokenResponse()
message_response = MessageResponse()
me_response = MeResponse()
