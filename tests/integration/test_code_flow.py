"""The code + PKCE login against the real Keycloak: its login form driven by a plain HTTP client with a cookie jar."""

from __future__ import annotations

import html
import re
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

CSRF = {"X-Requested-With": "fetch"}
CALLBACK = "http://127.0.0.1:{port}/api/auth/callback"


@pytest.fixture(scope="module")
def code_broker(start_broker, kc_admin):
    """A cookie-mode broker with the code flow on; the realm client accepts the test brokers' callbacks meanwhile."""
    url = start_broker(BROKER_TOKEN_TRANSPORT="cookie", BROKER_COOKIE_SECURE="false", BROKER_COOKIE_NAME="refresh_token",
                       BROKER_CODE_FLOW="true", BROKER_CALLBACK_URL=CALLBACK, BROKER_RATE_LIMITS_ENABLED="false")
    (client,) = [c for c in kc_admin.get_clients() if c["clientId"] == "token-broker"]
    before = list(client.get("redirectUris", []))
    kc_admin.update_client(client["id"], {**client, "redirectUris": before + [f"{url}/api/auth/callback"]})
    try:
        yield url
    finally:
        kc_admin.update_client(client["id"], {**client, "redirectUris": before})


def like_a_browser(browser: requests.Session) -> None:
    """Browsers treat http://127.0.0.1 as a secure context and send its Secure cookies (Keycloak marks its login
    cookies Secure); requests does not, so the test jar forgets the flag."""
    for cookie in browser.cookies:
        cookie.secure = False


def form_of(page: requests.Response) -> str:
    """The action URL of the (first) form on a Keycloak page."""
    match = re.search(r'<form[^>]*action="([^"]+)"', page.text)
    assert match, " ".join(re.sub(r"<[^>]+>", " ", page.text.split("<body", 1)[-1]).split())[:1500]
    return html.unescape(match.group(1))


def start(url: str, browser: requests.Session, return_to: str = "/app/") -> requests.Response:
    """/authorize, then Keycloak's login page; returns that page."""
    begun = browser.get(f"{url}/api/auth/authorize", params={"return_to": return_to}, allow_redirects=False,
                        timeout=30)
    assert begun.status_code == 302, begun.text
    page = browser.get(begun.headers["Location"], timeout=30)
    like_a_browser(browser)
    return page


def sign_in(page: requests.Response, browser: requests.Session, user) -> requests.Response:
    """Submit Keycloak's login form; returns Keycloak's answer (a redirect to the callback, or another page)."""
    answer = browser.post(form_of(page), data={"username": user.username, "password": user.password},
                          allow_redirects=False, timeout=30)
    like_a_browser(browser)
    return answer


def test_a_login_on_keycloaks_page_ends_with_the_session_cookie(code_broker, make_user):
    """authorize → Keycloak's form → callback: redirect to return_to, refresh cookie set, refresh works."""
    user = make_user()
    with requests.Session() as browser:
        to_callback = sign_in(start(code_broker, browser), browser, user)
        assert to_callback.status_code == 302 and to_callback.headers["Location"].startswith(code_broker)
        done = browser.get(to_callback.headers["Location"], allow_redirects=False, timeout=30)
        assert (done.status_code, done.headers["Location"]) == (302, "/app/")
        assert browser.cookies.get("refresh_token")
        refreshed = browser.post(f"{code_broker}/api/auth/refresh-token", headers=CSRF, timeout=30)
        assert refreshed.status_code == 200, refreshed.text
        me = requests.get(f"{code_broker}/api/auth/me", timeout=30,
                          headers={"Authorization": f"Bearer {refreshed.json()['token']['access_token']}"})
        assert me.json()["username"] == user.username


def test_a_required_action_is_completed_on_keycloaks_page(code_broker, make_user):
    """An account the password grant turns away (UPDATE_PASSWORD) finishes on Keycloak's page and gets a session."""
    user = make_user(required_actions=["UPDATE_PASSWORD"])
    with requests.Session() as browser:
        answer = sign_in(start(code_broker, browser), browser, user)
        assert answer.status_code == 302 and not answer.headers["Location"].startswith(code_broker)
        update = browser.get(answer.headers["Location"], timeout=30)  # Keycloak's own required-action page
        like_a_browser(browser)
        assert update.status_code == 200 and "password-new" in update.text
        to_callback = browser.post(form_of(update), allow_redirects=False, timeout=30,
                                   data={"password-new": "a-new-long-password-9", "password-confirm": "a-new-long-password-9"})
        assert to_callback.status_code == 302, to_callback.text[:500]
        done = browser.get(to_callback.headers["Location"], allow_redirects=False, timeout=30)
        assert done.status_code == 302 and browser.cookies.get("refresh_token")


def test_a_replayed_or_forged_callback_sets_no_cookie(code_broker, make_user):
    """The same callback twice, a state from another login, or no attempt cookie: 400 and no session cookie."""
    user = make_user()
    with requests.Session() as browser:
        callback = sign_in(start(code_broker, browser), browser, user).headers["Location"]
        attempt = dict(browser.cookies)
        assert browser.get(callback, allow_redirects=False, timeout=30).status_code == 302
    state = parse_qs(urlsplit(callback).query)["state"][0]
    replayed = requests.get(callback, cookies=attempt, allow_redirects=False, timeout=30)
    forged = requests.get(callback.replace(state, "forged-state"), cookies=attempt, allow_redirects=False, timeout=30)
    cookieless = requests.get(callback, allow_redirects=False, timeout=30)
    for answer, message in ((replayed, "This login callback was used already; start the login again"),
                            (forged, "The login callback does not belong to a login this browser started"),
                            (cookieless, "The login callback does not belong to a login this browser started")):
        assert (answer.status_code, answer.json()) == (400, {"error": "invalid_request", "message": message})
        assert "refresh_token=" not in answer.headers.get("Set-Cookie", "")


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/", "/\\evil.example", "javascript:alert(1)"])
def test_return_to_is_never_an_open_redirect(code_broker, target):
    """Only paths on this site (or an allowlisted origin) are accepted as return_to."""
    response = requests.get(f"{code_broker}/api/auth/authorize", params={"return_to": target}, allow_redirects=False,
                            timeout=30)
    assert (response.status_code, response.json()) == (400, {
        "error": "invalid_request", "message": "return_to must be a path on this site or a URL on an allowed origin"})


def test_the_code_flow_is_off_by_default(broker_url):
    """The default broker has no code flow: 404."""
    response = requests.get(f"{broker_url}/api/auth/authorize", allow_redirects=False, timeout=30)
    assert (response.status_code, response.json()) == (404, {"error": "not_found", "message": "No such route"})
