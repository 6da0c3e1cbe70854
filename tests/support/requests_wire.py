"""A `Wire` (app/keycloak_http.py) over `requests`, so the API tests can fake Keycloak's HTTP with `responses`.

Test plumbing only: the broker itself talks to Keycloak through app.keycloak_http.Wire, which the component
tests (real sockets) and the integration tests (a real Keycloak, the fault proxy) cover. This maps what
`responses` can raise onto the wire's failures, the way the real wire meets them on a socket:

- a read timeout: NoAnswer;
- a ConnectionError whose reason is urllib3's ProtocolError or ReadTimeoutError (the connection broke after the
  request was on its way), or a broken chunked body: AnswerBroken;
- any other ConnectionError or a connect timeout: NotConnected (an SSLError: NotConnected with tls).
"""

from __future__ import annotations

from typing import Iterable

import requests
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from app.keycloak_http import Answer, AnswerBroken, Headers, NoAnswer, NotConnected


class RequestsWire:
    """Sends every request through one `requests.Session` (which `responses` intercepts)."""

    def __init__(self, **_: object):
        self.session = requests.Session()
        self.session.trust_env = False

    def request(self, method: str, url: str, *, headers: Iterable[tuple[str, str]] = (), body: bytes = b"",
                timeout: tuple[float, float]) -> Answer:
        try:
            response = self.session.request(method, url, headers=dict(headers), data=body.decode() or None,
                                            timeout=timeout, allow_redirects=False)
        except requests.exceptions.SSLError as exc:
            raise NotConnected(str(exc), tls=True) from None
        except requests.ConnectTimeout as exc:
            raise NotConnected(str(exc)) from None
        except requests.ReadTimeout as exc:
            raise NoAnswer(str(exc)) from None
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as exc:
            raise AnswerBroken(str(exc)) from None
        except requests.ConnectionError as exc:
            reason = exc.args[0] if exc.args else None
            if isinstance(reason, (ProtocolError, ReadTimeoutError)):
                raise AnswerBroken(str(exc)) from None
            raise NotConnected(str(exc)) from None
        return Answer(response.status_code, Headers(response.headers.items()), response.content)

    def close(self) -> None:
        self.session.close()
