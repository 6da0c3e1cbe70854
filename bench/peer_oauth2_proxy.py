"""Optional benchmark peer: oauth2-proxy validating Keycloak access tokens locally (`make bench PEER=oauth2-proxy`).

oauth2-proxy is what many gateways put in front of their services instead of a broker: nginx
`auth_request` or Traefik forward-auth ask its `GET /oauth2/auth` whether a request may pass. With
`--skip-jwt-bearer-tokens` it accepts `Authorization: Bearer <JWT>` and checks the token itself (signature
against the realm's JWKS, issuer, expiry, audience), with no call to Keycloak per request, and answers 202
(with `X-Auth-Request-*` identity headers) or 401. That is the same job as the broker's
`GET /api/auth/verify`, done by a compiled Go server, which makes it a useful yardstick.

This module is imported by bench/run.py and offers:

- `build(cache_dir)`: builds oauth2-proxy from source with the machine's Go toolchain (`go install`
  through the Go module proxy configured for the toolchain), once; later calls reuse the binary.
- `start(binary, port=..., ...)`: starts it on 127.0.0.1:<port> in its own process group (so its CPU
  time can be read from /proc/<pid>/stat), `wait_ready(port, timeout)` and `stop(proc)`.
- `check(port, token)`: one accepted request for a real token, and refusals for a garbage token and for
  the real token with a broken signature.

Run it directly for a self-test (needs Go, Java 17+ and the cached Keycloak distribution):

    python3 bench/peer_oauth2_proxy.py

It builds oauth2-proxy (into ~/.cache/token-broker unless XDG_CACHE_HOME says otherwise), starts a clean
Keycloak with scripts/keycloak.sh on 127.0.0.1:26080 (management 26090), logs alice in with the password
grant, starts oauth2-proxy on 127.0.0.1:26001, runs `check`, and stops both, also on failure or Ctrl-C.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from urllib.parse import urlencode

#: The oauth2-proxy release built and benchmarked; the only place the version is written.
VERSION = "v7.15.6"
MODULE = "github.com/oauth2-proxy/oauth2-proxy/v7"
BINARY_NAME = "oauth2-proxy"

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
LOG_DIR = REPO / ".run" / "bench"

#: Seconds `stop` waits after SIGTERM before it sends SIGKILL.
STOP_GRACE_SECONDS = 10.0


class PeerError(RuntimeError):
    """oauth2-proxy could not be built, started, or did not answer as expected."""


class OAuth2ProxyProcess(subprocess.Popen[bytes]):
    """A running oauth2-proxy: a `subprocess.Popen` that also knows where its output goes."""

    log_path: Path


def binary_path(cache_dir: Path) -> Path:
    """Where `build` puts (and finds) the oauth2-proxy binary of `VERSION` under `cache_dir`."""
    return cache_dir / f"oauth2-proxy-{VERSION}" / BINARY_NAME


def build(cache_dir: Path) -> Path:
    """Build oauth2-proxy `VERSION` from source into `cache_dir` and return the binary's path.

    Runs `GOBIN=<cache_dir>/oauth2-proxy-<VERSION> go install <MODULE>@<VERSION>` with the machine's Go
    toolchain and its own module proxy settings. Does nothing when the binary is already there. The first
    build downloads the module's dependencies and compiles for about a minute on 2 cores.
    """
    binary = binary_path(cache_dir)
    if binary.is_file() and os.access(binary, os.X_OK):
        _progress(f"using the cached oauth2-proxy {VERSION}: {binary}")
        return binary
    go = shutil.which("go")
    if go is None:
        raise PeerError(
            "the Go toolchain is not installed (no `go` on PATH): PEER=oauth2-proxy builds oauth2-proxy "
            f"{VERSION} from source with `go install`; install Go or run the benchmark without PEER"
        )
    gobin = binary.parent.resolve()
    gobin.mkdir(parents=True, exist_ok=True)
    _progress(f"building oauth2-proxy {VERSION} with {go} into {gobin} (about a minute, once)")
    env = dict(os.environ, GOBIN=str(gobin))
    # The working directory is the cache, so no go.mod of the caller's can take part in the build.
    result = subprocess.run(
        [go, "install", f"{MODULE}@{VERSION}"], cwd=gobin, env=env, check=False
    )
    if result.returncode != 0:
        raise PeerError(f"`go install {MODULE}@{VERSION}` failed with exit status {result.returncode} (output above)")
    if not binary.is_file():
        raise PeerError(f"`go install` succeeded but {binary} is missing")
    _progress(f"built {binary}")
    return binary


def command(
    binary: Path, *, port: int, keycloak_url: str, realm: str, client_id: str, audience: str
) -> list[str]:
    """The oauth2-proxy command line for `start` (secrets are passed in the environment, not here).

    Audience: oauth2-proxy accepts a token whose `aud` claim holds its own `--client-id`, plus any
    `--oidc-extra-audience`. A Keycloak access token issued to the realm's `token-broker` client carries
    `aud: ["token-broker", "account"]` (the client's audience mapper) and `azp: "token-broker"`, so with
    `client_id == audience == "token-broker"` no extra audience is needed; a different `audience` is
    added as one.
    """
    issuer = f"{keycloak_url.rstrip('/')}/realms/{realm}"
    args = [
        str(binary),
        f"--http-address={HOST}:{port}",
        # Keycloak's OIDC provider: discovery and JWKS from the realm's issuer; the verifier checks the
        # signature, `iss` and `exp`, and realm and client roles go into the session's groups.
        "--provider=keycloak-oidc",
        f"--oidc-issuer-url={issuer}",
        f"--client-id={client_id}",
        # Accept `Authorization: Bearer <JWT>` verified locally against the issuer above.
        "--skip-jwt-bearer-tokens",
        # Never ask Keycloak's userinfo endpoint for a claim the token lacks: validation stays local.
        "--skip-claims-from-profile-url",
        # Any authenticated user: no e-mail domain restriction.
        "--email-domain=*",
        # Nothing is proxied in the benchmark; oauth2-proxy wants an upstream all the same.
        "--upstream=static://202",
        # /oauth2/auth answers with X-Auth-Request-User/-Email/-Groups/-Preferred-Username, the
        # counterpart of the broker's X-Auth-* headers on /verify.
        "--set-xauthrequest",
        # One log line per request would be a good part of what is measured: off. Start-up messages
        # and errors (standard logging) stay on and go to the log file.
        "--request-logging=false",
        "--auth-logging=false",
    ]
    if audience != client_id:
        args.append(f"--oidc-extra-audience={audience}")
    return args


def start(
    binary: Path,
    *,
    port: int,
    keycloak_url: str,
    realm: str,
    client_id: str,
    client_secret: str,
    audience: str,
    log_path: Path | None = None,
) -> OAuth2ProxyProcess:
    """Start oauth2-proxy on 127.0.0.1:`port`, in a process group of its own, and return the process.

    Keycloak must be up: oauth2-proxy reads the realm's discovery document at start-up and exits if it
    cannot. Call `wait_ready` next. The client secret and a fresh random cookie secret reach the process
    through its environment (`OAUTH2_PROXY_*`), so they do not show in `ps`; every other `OAUTH2_PROXY_*`
    variable of the caller's environment is dropped. Output goes to `log_path` (default
    .run/bench/oauth2-proxy-<port>.log).
    """
    if log_path is None:
        log_path = LOG_DIR / f"oauth2-proxy-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("OAUTH2_PROXY_")}
    env["OAUTH2_PROXY_CLIENT_SECRET"] = client_secret
    # 32 hex characters = 32 bytes, an AES-256 key for the (unused) session cookies.
    env["OAUTH2_PROXY_COOKIE_SECRET"] = secrets.token_hex(16)
    args = command(
        binary, port=port, keycloak_url=keycloak_url, realm=realm, client_id=client_id, audience=audience
    )
    _progress(f"starting oauth2-proxy on http://{HOST}:{port} (log in {log_path})")
    with log_path.open("wb") as log:
        proc = OAuth2ProxyProcess(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own session and process group: pgid == pid
        )
    proc.log_path = log_path
    return proc


def wait_ready(port: int, timeout: float, proc: OAuth2ProxyProcess | None = None) -> None:
    """Wait until oauth2-proxy on `port` answers `GET /ping` with 200, at most `timeout` seconds.

    With `proc`, fail at once (with the end of its log) if the process exits meanwhile.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise PeerError(
                f"oauth2-proxy exited with status {proc.returncode} during start-up; "
                f"end of {proc.log_path}:\n{_tail(proc.log_path)}"
            )
        try:
            status, _, _ = _get(port, "/ping", {}, timeout=1.0)
            if status == 200:
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            where = f"; end of {proc.log_path}:\n{_tail(proc.log_path)}" if proc is not None else ""
            raise PeerError(f"oauth2-proxy on {HOST}:{port} was not ready after {timeout:g}s{where}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop oauth2-proxy: SIGTERM to its process group, SIGKILL if it is still there after a grace period."""
    if proc.poll() is not None:
        return
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        _progress(f"oauth2-proxy (pid {proc.pid}) did not stop within {STOP_GRACE_SECONDS:g}s; killing it")
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def check(port: int, token: str) -> None:
    """Check that oauth2-proxy on `port` accepts `token` and refuses bad ones; raise `PeerError` if not.

    Three requests to `GET /oauth2/auth`: `Bearer <token>` must get 202 with `X-Auth-Request-User` equal
    to the token's `sub`; a garbage bearer value, and the token with its signature altered, must get 401.
    """
    status, headers, body = _get(port, "/oauth2/auth", {"Authorization": f"Bearer {token}"})
    if status != 202:
        raise PeerError(
            f"oauth2-proxy answered {status} instead of 202 to a valid access token: {body[:200]!r} "
            "(oauth2-proxy's log says why)"
        )
    subject = _claims(token).get("sub")
    if headers.get("x-auth-request-user") != subject:
        raise PeerError(
            f"oauth2-proxy accepted the token but named the user {headers.get('x-auth-request-user')!r}, "
            f"not the token's sub {subject!r}"
        )
    header, payload, signature = token.split(".")
    forged = f"{header}.{payload}.{'B' if signature[0] == 'A' else 'A'}{signature[1:]}"
    for label, value in (("a garbage token", "not-a-token"), ("the token with a broken signature", forged)):
        status, _, body = _get(port, "/oauth2/auth", {"Authorization": f"Bearer {value}"})
        if status != 401:
            raise PeerError(f"oauth2-proxy answered {status} instead of 401 to {label}: {body[:200]!r}")


def _get(port: int, path: str, headers: dict[str, str], timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One GET to 127.0.0.1:`port`; returns the status, the headers (lower-case names) and the body."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        return response.status, {name.lower(): value for name, value in response.getheaders()}, body
    finally:
        conn.close()


def _claims(token: str) -> dict[str, object]:
    """The payload of a JWT, decoded without any verification (for display and comparison only)."""
    payload = token.split(".")[1]
    claims: dict[str, object] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Send `sig` to the process group `start` created (its id is the process's pid)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file, or a note that it cannot be read."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


def _progress(message: str) -> None:
    print(f"peer_oauth2_proxy: {message}", file=sys.stderr, flush=True)


# --- self-test --------------------------------------------------------------------------------------

SELFTEST_KC_HTTP_PORT = 26080
SELFTEST_KC_MANAGEMENT_PORT = 26090
SELFTEST_PEER_PORT = 26001
SELFTEST_REALM = "demo"
SELFTEST_CLIENT_ID = "token-broker"
SELFTEST_CLIENT_SECRET = "token-broker-local-secret"  # the shipped realm's local-only secret


def default_cache_dir() -> Path:
    """~/.cache/token-broker (or $XDG_CACHE_HOME/token-broker), as scripts/keycloak.sh uses."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "token-broker"


def _keycloak(action: str) -> None:
    """Run `scripts/keycloak.sh <action>` on the self-test's ports."""
    env = dict(
        os.environ,
        KC_HTTP_PORT=str(SELFTEST_KC_HTTP_PORT),
        KC_MANAGEMENT_PORT=str(SELFTEST_KC_MANAGEMENT_PORT),
    )
    result = subprocess.run([str(REPO / "scripts" / "keycloak.sh"), action], env=env, check=False)
    if result.returncode != 0:
        raise PeerError(f"scripts/keycloak.sh {action} failed with exit status {result.returncode}")


def _password_grant(keycloak_url: str) -> str:
    """Log alice in with the password grant at Keycloak and return her access token."""
    form = urlencode(
        {
            "grant_type": "password",
            "client_id": SELFTEST_CLIENT_ID,
            "client_secret": SELFTEST_CLIENT_SECRET,
            "username": "alice",
            "password": "alice-password",
        }
    )
    conn = http.client.HTTPConnection(HOST, SELFTEST_KC_HTTP_PORT, timeout=10)
    try:
        conn.request(
            "POST",
            f"/realms/{SELFTEST_REALM}/protocol/openid-connect/token",
            body=form,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise PeerError(f"Keycloak refused alice's password grant: {response.status} {body[:200]!r}")
    token: str = json.loads(body)["access_token"]
    return token


def _port_taken(port: int) -> bool:
    """Whether something already listens on 127.0.0.1:`port`."""
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def selftest() -> None:
    """Build, start Keycloak and oauth2-proxy, `check`, and stop both whatever happens."""
    for port in (SELFTEST_KC_HTTP_PORT, SELFTEST_KC_MANAGEMENT_PORT, SELFTEST_PEER_PORT):
        if _port_taken(port):
            raise PeerError(f"port {port} on {HOST} is already taken; the self-test needs it")
    binary = build(default_cache_dir())
    keycloak_url = f"http://{HOST}:{SELFTEST_KC_HTTP_PORT}"
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    proc: OAuth2ProxyProcess | None = None
    try:
        _keycloak("start")  # inside the try: a half-started Keycloak is stopped too
        token = _password_grant(keycloak_url)
        claims = _claims(token)
        _progress(
            f"access token: iss={claims.get('iss')} aud={claims.get('aud')} azp={claims.get('azp')} "
            f"typ={claims.get('typ')}"
        )
        proc = start(
            binary,
            port=SELFTEST_PEER_PORT,
            keycloak_url=keycloak_url,
            realm=SELFTEST_REALM,
            client_id=SELFTEST_CLIENT_ID,
            client_secret=SELFTEST_CLIENT_SECRET,
            audience=SELFTEST_CLIENT_ID,
        )
        wait_ready(SELFTEST_PEER_PORT, 30.0, proc)
        _progress(f"oauth2-proxy ready (pid {proc.pid}, process group {os.getpgid(proc.pid)})")
        check(SELFTEST_PEER_PORT, token)
        _progress("check passed: 202 for alice's access token, 401 for a garbage token and a forged signature")
    finally:
        if proc is not None:
            stop(proc)
            _progress(f"oauth2-proxy stopped (exit status {proc.returncode})")
        _keycloak("stop")  # stops only the server this self-test started (by its PID file)
    print(f"self-test passed: oauth2-proxy {VERSION}")


if __name__ == "__main__":
    try:
        selftest()
    except PeerError as exc:
        print(f"self-test FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
