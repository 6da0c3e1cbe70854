"""Reading a request body as a flat dict from JSON or form encoding, refusing everything else."""

from __future__ import annotations

import json
from typing import Any

from flask import request

from app.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from app.web.context import broker

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"


def body_limit() -> int:
    """The largest body accepted, in bytes (BROKER_MAX_BODY_BYTES)."""
    return broker().settings.max_body_bytes


def check_body_size() -> None:
    """Refuse a declared body over the limit before anything reads it (413)."""
    if request.content_length is not None and request.content_length > body_limit():
        raise PayloadTooLarge()


def read_body() -> dict[str, Any]:
    """The body as a dict: JSON object or form fields; empty body → {}; raise 400/413/415 otherwise."""
    # MAX_CONTENT_LENGTH is one byte over the limit, so a chunked body (no Content-Length) that werkzeug
    # stops reading there is known to be too large.
    raw = request.get_data(cache=True)
    if len(raw) > body_limit():
        raise PayloadTooLarge()
    mimetype = request.mimetype
    if not raw:
        return {}
    if mimetype == JSON:
        return _json_object(raw)
    if mimetype == FORM:
        return _form_fields()
    raise UnsupportedMediaType()


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidRequest(f"Field '{_printable(key)}' appears more than once")
        result[key] = value
    return result


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not valid UTF-8") from None
    except (ValueError, RecursionError):
        raise InvalidRequest("The request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object")
    try:
        # JSON escapes can spell lone surrogates ("\ud800") that no UTF-8 text can hold.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest("The request body is not valid UTF-8") from None
    return data


def _form_fields() -> dict[str, Any]:
    form = request.form
    fields: dict[str, Any] = {}
    for key in form:
        values = form.getlist(key)
        if len(values) > 1:
            raise InvalidRequest(f"Field '{_printable(key)}' appears more than once")
        fields[key] = values[0]
    return fields


def _printable(key: str) -> str:
    return "".join(c for c in key if c.isprintable())[:40]
