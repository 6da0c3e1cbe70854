"""Soak test: a bounded, steady mix of logins, refreshes, duplicate refreshes and token checks against the broker.

`run_soak()` creates `users` throw-away realm users (complete profiles, so Keycloak 26 lets them log in),
runs one thread per user for `duration` seconds at about `rate` requests per second in total, deletes
the users and returns a `SoakReport`. Each simulated user keeps its own keep-alive `requests.Session`
(plus a second one, a "second tab", for duplicate refreshes) and loops:

    GET /api/auth/me, GET /api/auth/verify, POST /api/auth/refresh-token (keeping the rotated token),
    GET /health; every 10th refresh is sent twice at the same moment on two connections (a duplicate the
    broker must coalesce: both 200 with the same new refresh token); every 15th round logs out and in again.

The run is bounded: it stops after `duration` seconds or `duration * rate * 1.2` requests, whichever
comes first, and every call has a 15 s timeout.

The CLI starts everything itself and tears it down again:

    .venv/bin/python bench/soak.py [--minutes 3] [--rate 30] [--users 8] [--max-rss-growth-mib 50]

- a clean Keycloak via `scripts/keycloak.sh start` on 127.0.0.1:28280 (management 29200, state in
  .run/keycloak-soak);
- the broker exactly as `make run` starts it (`scripts/run-local.sh`, gunicorn with the default process model
  (one gevent worker)) on 127.0.0.1:28200, except that BROKER_RATE_LIMIT_REFRESH and BROKER_RATE_LIMIT_LOGIN_IP
  are raised to 100000 per minute: all soak traffic comes from one address, and the defaults (120
  refreshes and 60 logins per minute per address) would answer 429 within seconds;
- it samples the RSS of the gunicorn master and its workers, prints the report, stops the broker
  (SIGTERM to its process group) and Keycloak, and exits 1 when `SoakReport.failures()` is not empty.
  The broker's log is written to .run/soak-broker.log.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import requests

if TYPE_CHECKING:
    import keycloak

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 15.0  # seconds, on every call to the broker
DUPLICATE_EVERY = 10  # every 10th refresh of a user is sent twice at once
RELOGIN_EVERY = 15  # every 15th round of a user logs out and in again
DEFAULT_MAX_RSS_GROWTH_MIB = 50.0
NO_ANSWER = "no answer"  # the "status" of a request that got no HTTP answer (connection error, timeout)

# Success status per route; anything else is counted as a problem of some kind.
EXPECTED = {"login": 200, "me": 200, "verify": 204, "refresh": 200, "refresh-duplicate": 200, "health": 200,
            "logout": 200}
ROUTE_ORDER = ["login", "me", "verify", "refresh", "refresh-duplicate", "health", "logout"]


# --------------------------------------------------------------------------------------------- report


@dataclass
class SoakReport:
    """What a soak run measured. `failures()` names the problems; `render()` prints the figures."""

    duration_s: float
    target_rate: float
    users: int
    requests_total: int
    by_status: dict[str, int]  # "200", "204", "400", ..., "no answer"
    by_route: dict[str, int]  # requests per route; a duplicate pair is two "refresh-duplicate" requests
    five_xx: int
    rate_limited: int  # 429s: the soak broker's limits were too low for the soak
    refresh_invalid_grant: int  # 400/401 invalid_grant answers to single (non-duplicate) refreshes
    duplicate_pairs: int
    duplicate_pairs_failed: int  # pairs where not both got 200 with the same new refresh token
    lost_answers: int  # refresh requests (single or duplicate) that got no HTTP answer at all
    transport_errors: int  # requests to other routes that got no HTTP answer
    unexpected_answers: int  # any other answer that is not its route's success (e.g. a 401 from /me)
    latency_ms: dict[str, tuple[float, float]]  # route -> (p50, p99), answered requests only
    rss_start_mib: float | None = None
    rss_end_mib: float | None = None
    rss_peak_mib: float | None = None
    max_rss_growth_mib: float = DEFAULT_MAX_RSS_GROWTH_MIB
    problems: list[str] = field(default_factory=list)  # the first few problem descriptions, for diagnosis

    @property
    def unexpected_invalid_grant(self) -> int:
        """Refreshes refused with invalid_grant, plus duplicate pairs that were not both answered 200 alike."""
        return self.refresh_invalid_grant + self.duplicate_pairs_failed

    @property
    def rss_growth_mib(self) -> float | None:
        if self.rss_start_mib is None or self.rss_end_mib is None:
            return None
        return self.rss_end_mib - self.rss_start_mib

    @property
    def achieved_rate(self) -> float:
        return self.requests_total / self.duration_s if self.duration_s > 0 else 0.0

    def failures(self, max_rss_growth_mib: float | None = None) -> list[str]:
        """Human-readable problems: 5xx, unexpected invalid_grant, lost answers, RSS growth over the bound, ..."""
        bound = self.max_rss_growth_mib if max_rss_growth_mib is None else max_rss_growth_mib
        found = []
        if self.requests_total == 0:
            found.append("no requests were made")
        if self.five_xx:
            found.append(f"{self.five_xx} answers were 5xx")
        if self.unexpected_invalid_grant:
            found.append(
                f"{self.unexpected_invalid_grant} unexpected invalid_grant: {self.refresh_invalid_grant} refreshes "
                f"refused, {self.duplicate_pairs_failed} of {self.duplicate_pairs} duplicate pairs not both 200 "
                "with the same new refresh token"
            )
        if self.lost_answers:
            found.append(f"{self.lost_answers} refresh requests got no HTTP answer (connection error or timeout)")
        if self.transport_errors:
            found.append(f"{self.transport_errors} other requests got no HTTP answer")
        if self.rate_limited:
            found.append(f"{self.rate_limited} answers were 429: the broker's rate limits are too low for this soak")
        if self.unexpected_answers:
            found.append(f"{self.unexpected_answers} other answers were not their route's success status")
        growth = self.rss_growth_mib
        if growth is not None and growth > bound:
            found.append(f"broker RSS grew by {growth:.1f} MiB ({self.rss_start_mib:.1f} -> {self.rss_end_mib:.1f}), "
                         f"more than {bound:.0f} MiB")
        return found

    def render(self, file: TextIO | None = None) -> str:
        """Print (to stdout, or `file`) and return a small table of the figures."""
        lines = [
            f"soak: {self.duration_s:.1f} s, {self.users} users, target {self.target_rate:g} req/s, "
            f"achieved {self.achieved_rate:.1f} req/s, {self.requests_total} requests",
            "statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.by_status.items())),
            "",
            f"{'route':18s} {'requests':>8s} {'p50 ms':>8s} {'p99 ms':>8s}",
        ]
        for route in ROUTE_ORDER:
            if route in self.by_route:
                p50, p99 = self.latency_ms.get(route, (float("nan"), float("nan")))
                lines.append(f"{route:18s} {self.by_route[route]:8d} {p50:8.1f} {p99:8.1f}")
        lines += [
            "",
            f"{'5xx':32s} {self.five_xx}",
            f"{'unexpected invalid_grant':32s} {self.unexpected_invalid_grant} "
            f"(refreshes {self.refresh_invalid_grant}, duplicate pairs {self.duplicate_pairs_failed} "
            f"of {self.duplicate_pairs})",
            f"{'lost answers (refresh)':32s} {self.lost_answers}",
            f"{'no answer (other routes)':32s} {self.transport_errors}",
            f"{'429 rate limited':32s} {self.rate_limited}",
            f"{'other unexpected answers':32s} {self.unexpected_answers}",
        ]
        if self.rss_start_mib is None:
            lines.append(f"{'broker RSS':32s} not measured")
        else:
            lines.append(f"{'broker RSS (master + workers)':32s} start {self.rss_start_mib:.1f} MiB, end "
                         f"{self.rss_end_mib:.1f} MiB, peak {self.rss_peak_mib:.1f} MiB, growth "
                         f"{self.rss_growth_mib:+.1f} MiB (bound {self.max_rss_growth_mib:g})")
        if self.problems:
            lines += ["", "first problems seen:"] + [f"  - {p}" for p in self.problems]
        failures = self.failures()
        lines += ["", "result: " + ("PASS" if not failures else "FAIL")] + [f"  - {f}" for f in failures]
        text = "\n".join(lines)
        print(text, file=file or sys.stdout)
        return text


# ------------------------------------------------------------------------------------------ process RSS


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, read from /proc/<pid>/task/*/children (gone processes are skipped)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in children.read_text().split())
            except OSError:
                pass
    return found


def tree_rss_mib(pid: int) -> float:
    """Summed VmRSS of `pid` and its descendants, in MiB."""
    total_kib = 0
    for member in process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
                    break
        except OSError:
            pass
    return total_kib / 1024


# ------------------------------------------------------------------------------------------ load driver


class _Recorder:
    """Thread-safe counters for every request, and the shared request budget."""

    def __init__(self, budget: int):
        self.lock = threading.Lock()
        self.budget = budget
        self.spent = 0
        self.statuses: Counter[str] = Counter()
        self.routes: Counter[str] = Counter()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.counts: Counter[str] = Counter()
        self.problems: list[str] = []

    def take(self, n: int) -> bool:
        """Reserve `n` requests of the budget; False once it is spent."""
        with self.lock:
            if self.spent + n > self.budget:
                return False
            self.spent += n
            return True

    def record(self, route: str, status: int | None, seconds: float) -> None:
        with self.lock:
            self.routes[route] += 1
            self.statuses[NO_ANSWER if status is None else str(status)] += 1
            if status is not None:
                self.latencies[route].append(seconds * 1000)
                if status >= 500:
                    self.counts["five_xx"] += 1
                elif status == 429:
                    self.counts["rate_limited"] += 1

    def count(self, what: str, problem: str | None = None) -> None:
        with self.lock:
            self.counts[what] += 1
            if problem and len(self.problems) < 10:
                self.problems.append(problem)


class _Answer:
    """One request's outcome: the response (None when no HTTP answer came) and what went wrong in transport."""

    def __init__(self, response: requests.Response | None, error: str | None = None):
        self.response = response
        self.error = error

    @property
    def status(self) -> int | None:
        return None if self.response is None else self.response.status_code

    def json(self) -> dict:
        try:
            body = self.response.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    def describe(self) -> str:
        if self.response is None:
            return f"no answer ({self.error})"
        return f"{self.status} {self.json().get('error', '')}".strip()


class _SimulatedUser(threading.Thread):
    def __init__(self, index: int, username: str, password: str, broker_url: str, recorder: _Recorder,
                 interval: float, start_at: float, stop_at: float):
        super().__init__(name=f"soak-user-{index}", daemon=True)
        self.index = index
        self.username, self.password = username, password
        self.url = broker_url.rstrip("/")
        self.recorder = recorder
        self.interval = interval  # seconds between this user's requests
        self.next_at = start_at
        self.stop_at = stop_at
        self.http = requests.Session()
        self.second_tab = requests.Session()  # the duplicate's other connection
        self.access: str | None = None
        self.refresh: str | None = None
        self.refreshes = 0
        self.error: BaseException | None = None

    # --- pacing and requests

    def _pace(self, n: int = 1) -> bool:
        """Wait for this user's next slot and reserve `n` requests; False when the run is over."""
        now = time.monotonic()
        if self.next_at < now - 1.0:  # fell far behind (slow answers): do not burst to catch up
            self.next_at = now
        if self.next_at >= self.stop_at or not self.recorder.take(n):
            return False
        time.sleep(max(0.0, self.next_at - now))
        self.next_at += n * self.interval
        return True

    def _send(self, http: requests.Session, route: str, method: str, path: str, **kwargs) -> _Answer:
        began = time.perf_counter()
        try:
            response = http.request(method, self.url + path, timeout=TIMEOUT, **kwargs)
            response.content  # read the whole body inside the timing
            answer = _Answer(response)
        except requests.RequestException as exc:
            answer = _Answer(None, type(exc).__name__)
        self.recorder.record(route, answer.status, time.perf_counter() - began)
        return answer

    def _bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access}"}

    def _check(self, route: str, answer: _Answer) -> bool:
        """Count a non-success answer of a non-refresh route; True when it was the route's success."""
        status = answer.status
        if status == EXPECTED[route]:
            return True
        if status is None:
            self.recorder.count("transport_errors", f"{route}: {answer.describe()}")
        elif status >= 500 or status == 429:
            self.recorder.count("noted", f"{route}: {answer.describe()}")  # counted by status already
        else:
            self.recorder.count("unexpected_answers", f"{route}: {answer.describe()}")
        return False

    # --- the flows

    def _login(self) -> bool:
        if not self._pace():
            return False
        answer = self._send(self.http, "login", "POST", "/api/auth/login",
                            json={"username": self.username, "password": self.password})
        if self._check("login", answer):
            token = answer.json().get("token", {})
            self.access, self.refresh = token.get("access_token"), token.get("refresh_token")
        else:
            self.access = self.refresh = None
            time.sleep(1.0)  # a refused login: do not hammer (Keycloak's brute-force detection counts them)
        return True

    def _single_refresh(self) -> None:
        answer = self._send(self.http, "refresh", "POST", "/api/auth/refresh-token",
                            json={"refresh_token": self.refresh})
        status = answer.status
        if status == 200:
            token = answer.json().get("token", {})
            self.access, self.refresh = token.get("access_token"), token.get("refresh_token")
            return
        if status is None:
            self.recorder.count("lost_answers", f"refresh: {answer.describe()}")
        elif status in (400, 401) and answer.json().get("error") == "invalid_grant":
            self.recorder.count("refresh_invalid_grant", f"refresh: {answer.describe()}: "
                                                         f"{answer.json().get('message')}")
        elif status < 500 and status != 429:
            self.recorder.count("unexpected_answers", f"refresh: {answer.describe()}")
        else:
            self.recorder.count("noted", f"refresh: {answer.describe()}")  # counted by status already
        self.refresh = None  # the token's fate is unknown: log in again, as a frontend would

    def _duplicate_refresh(self) -> None:
        """The same refresh token twice at the same moment, on two connections; both must get the same 200."""
        barrier = threading.Barrier(2)
        answers: list[_Answer | None] = [None, None]
        body = {"refresh_token": self.refresh}

        def fire(slot: int, http: requests.Session) -> None:
            try:
                barrier.wait(timeout=TIMEOUT)
            except threading.BrokenBarrierError:
                pass
            answers[slot] = self._send(http, "refresh-duplicate", "POST", "/api/auth/refresh-token", json=body)

        other = threading.Thread(target=fire, args=(1, self.second_tab), daemon=True)
        other.start()
        fire(0, self.http)
        other.join(TIMEOUT * 2)
        first, second = answers
        self.recorder.count("duplicate_pairs")
        if first is None or second is None:  # cannot happen unless the helper thread hung past its timeout
            self.recorder.count("duplicate_pairs_failed", "duplicate pair: a request never finished")
            self.refresh = None
            return
        for answer in (first, second):
            if answer.status is None:
                self.recorder.count("lost_answers", f"duplicate refresh: {answer.describe()}")
        tokens = [a.json().get("token", {}).get("refresh_token") if a.status == 200 else None for a in answers]
        if tokens[0] and tokens[0] == tokens[1]:
            token = first.json()["token"]
            self.access, self.refresh = token.get("access_token"), token.get("refresh_token")
            return
        detail = (f"{first.describe()} / {second.describe()}" if not (tokens[0] and tokens[1])
                  else "both 200 but with different refresh tokens")
        messages = [a.json().get("message") for a in answers if a.status not in (None, 200)]
        self.recorder.count("duplicate_pairs_failed", f"duplicate pair: {detail}"
                                                      + (f" ({'; '.join(map(str, messages))})" if messages else ""))
        self.refresh = None  # the session may have been ended by Keycloak's reuse detection: log in again

    def _logout(self) -> None:
        answer = self._send(self.http, "logout", "POST", "/api/auth/logout", json={"refresh_token": self.refresh})
        self._check("logout", answer)
        self.access = self.refresh = None

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug in the driver: reported by run_soak
            self.error = exc
        finally:
            self.http.close()
            self.second_tab.close()

    def _loop(self) -> None:
        round_ = 0
        while True:
            if self.refresh is None:
                if not self._login():
                    return
                continue
            round_ += 1
            if not self._pace():
                return
            self._check("me", self._send(self.http, "me", "GET", "/api/auth/me", headers=self._bearer()))
            if not self._pace():
                return
            self._check("verify", self._send(self.http, "verify", "GET", "/api/auth/verify", headers=self._bearer()))
            self.refreshes += 1
            if (self.refreshes + self.index) % DUPLICATE_EVERY == 0:
                if not self._pace(2):
                    return
                self._duplicate_refresh()
            else:
                if not self._pace():
                    return
                self._single_refresh()
            if not self._pace():
                return
            self._check("health", self._send(self.http, "health", "GET", "/health"))
            if self.refresh is not None and (round_ + 3 * self.index) % RELOGIN_EVERY == 0:
                if not self._pace():
                    return
                self._logout()  # the next round logs in again


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of `values` (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


def run_soak(broker_url: str, keycloak_admin: "keycloak.KeycloakAdmin", *, duration: float, rate: float,
             users: int = 8, broker_pid: int | None = None,
             max_rss_growth_mib: float = DEFAULT_MAX_RSS_GROWTH_MIB) -> SoakReport:
    """Run the soak against `broker_url` for `duration` seconds at about `rate` requests/s; see the module doc.

    `keycloak_admin` is a python-keycloak admin client of the broker's realm: it creates the `users`
    throw-away users and deletes them afterwards. With `broker_pid` (the gunicorn master), the RSS of it
    and its workers is measured at the start and the end.
    """
    if duration <= 0 or rate <= 0 or users < 1:
        raise ValueError("duration and rate must be positive, users at least 1")
    run_id = uuid.uuid4().hex[:8]
    created: list[tuple[str, str, str]] = []  # (id, username, password)
    try:
        for index in range(users):
            username, password = f"soak-{run_id}-{index}", f"pw-{secrets.token_urlsafe(12)}"
            user_id = keycloak_admin.create_user({
                "username": username,
                "enabled": True,
                "email": f"{username}@example.com",
                "emailVerified": True,
                "firstName": "Soak",
                "lastName": f"User {index}",
                "requiredActions": [],
                "credentials": [{"type": "password", "value": password, "temporary": False}],
            })
            created.append((user_id, username, password))

        recorder = _Recorder(budget=int(duration * rate * 1.2))
        interval = users / rate
        rss_samples: list[float] = []
        if broker_pid is not None:
            rss_samples.append(tree_rss_mib(broker_pid))
        began = time.monotonic()
        start_at, stop_at = began + 0.1, began + 0.1 + duration
        threads = [
            _SimulatedUser(index, username, password, broker_url, recorder, interval,
                           start_at + index * interval / users, stop_at)
            for index, (_, username, password) in enumerate(created)
        ]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            for thread in threads:
                thread.join(timeout=2.0)
            if broker_pid is not None:
                rss_samples.append(tree_rss_mib(broker_pid))
        elapsed = time.monotonic() - start_at
        if broker_pid is not None:
            rss_samples.append(tree_rss_mib(broker_pid))
        errors = [t.error for t in threads if t.error is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} simulated users crashed") from errors[0]
    finally:
        for user_id, _, _ in created:
            try:
                keycloak_admin.delete_user(user_id)
            except Exception as exc:  # noqa: BLE001 - cleanup goes on; the leftover is named
                print(f"soak: could not delete user {user_id}: {exc}", file=sys.stderr)

    c = recorder.counts
    return SoakReport(
        duration_s=elapsed,
        target_rate=rate,
        users=users,
        requests_total=sum(recorder.routes.values()),
        by_status=dict(recorder.statuses),
        by_route=dict(recorder.routes),
        five_xx=c["five_xx"],
        rate_limited=c["rate_limited"],
        refresh_invalid_grant=c["refresh_invalid_grant"],
        duplicate_pairs=c["duplicate_pairs"],
        duplicate_pairs_failed=c["duplicate_pairs_failed"],
        lost_answers=c["lost_answers"],
        transport_errors=c["transport_errors"],
        unexpected_answers=c["unexpected_answers"],
        latency_ms={route: (_percentile(v, 50), _percentile(v, 99)) for route, v in recorder.latencies.items()},
        rss_start_mib=rss_samples[0] if rss_samples else None,
        rss_end_mib=rss_samples[-1] if rss_samples else None,
        rss_peak_mib=max(rss_samples) if rss_samples else None,
        max_rss_growth_mib=max_rss_growth_mib,
        problems=list(recorder.problems),
    )


# ------------------------------------------------------------------------------------------------- CLI

KC_PORT, KC_MGMT_PORT, BROKER_PORT = 28280, 29200, 28200
SOAK_RATE_LIMIT = "100000 per minute"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _find_gunicorn(script_pid: int, timeout: float = 60) -> int:
    """The gunicorn master started by run-local.sh (which does not exec it): a gunicorn descendant of
    `script_pid` whose parent is not gunicorn itself (the workers' parent is the master)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in process_tree(script_pid)[1:]:
            if b"gunicorn" in _argv(pid) and b"gunicorn" not in _argv(_parent(pid) or 0):
                return pid
        time.sleep(0.2)
    raise RuntimeError("run-local.sh did not start gunicorn")


def _argv(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _wait_health(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"run-local.sh exited with {process.returncode}; see .run/soak-broker.log")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url}/health did not answer within {timeout:.0f}s")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the broker's process group (run-local.sh and gunicorn); SIGKILL if it lingers."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=40)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long to soak (default 3)")
    parser.add_argument("--rate", type=float, default=30.0, help="requests per second in total (default 30)")
    parser.add_argument("--users", type=int, default=8, help="simulated users, one thread each (default 8)")
    parser.add_argument("--max-rss-growth-mib", type=float, default=DEFAULT_MAX_RSS_GROWTH_MIB,
                        help="fail when the broker's RSS grows by more (default 50)")
    args = parser.parse_args()

    from keycloak import KeycloakAdmin

    state_dir = REPO / ".run" / "keycloak-soak"
    base = f"http://127.0.0.1:{KC_PORT}"
    broker_url = f"http://127.0.0.1:{BROKER_PORT}"
    kc_env = {**os.environ, "KC_HTTP_PORT": str(KC_PORT), "KC_MANAGEMENT_PORT": str(KC_MGMT_PORT),
              "KC_STATE_DIR": str(state_dir)}
    broker_env = {**kc_env, "KEYCLOAK_URL": base, "BROKER_BIND": f"127.0.0.1:{BROKER_PORT}",
                  "PYTHON": str(REPO / ".venv" / "bin" / "python"),
                  # All soak traffic comes from 127.0.0.1: the per-address defaults would answer 429.
                  "BROKER_RATE_LIMIT_REFRESH": SOAK_RATE_LIMIT, "BROKER_RATE_LIMIT_LOGIN_IP": SOAK_RATE_LIMIT}
    if not _port_free(BROKER_PORT):
        print(f"soak: port {BROKER_PORT} is taken; stop whatever listens there", file=sys.stderr)
        return 2
    broker: subprocess.Popen | None = None
    try:
        subprocess.run([str(REPO / "scripts" / "keycloak.sh"), "start"], env=kc_env, check=True)
        state_dir.mkdir(parents=True, exist_ok=True)
        log_path = REPO / ".run" / "soak-broker.log"
        with open(log_path, "wb") as log:
            broker = subprocess.Popen([str(REPO / "scripts" / "run-local.sh")], cwd=REPO, env=broker_env,
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        gunicorn_pid = _find_gunicorn(broker.pid)
        _wait_health(broker_url, broker)
        admin = KeycloakAdmin(server_url=base + "/", username="admin", password="admin", realm_name="demo",
                              user_realm_name="master")
        print(f"soak: broker {broker_url} (gunicorn master pid {gunicorn_pid}), Keycloak {base}; "
              f"{args.minutes:g} min at {args.rate:g} req/s over {args.users} users", flush=True)
        report = run_soak(broker_url, admin, duration=args.minutes * 60, rate=args.rate, users=args.users,
                          broker_pid=gunicorn_pid, max_rss_growth_mib=args.max_rss_growth_mib)
        report.render()
        return 1 if report.failures() else 0
    finally:
        if broker is not None:
            _stop(broker)
        subprocess.run([str(REPO / "scripts" / "keycloak.sh"), "stop"], env=kc_env)


if __name__ == "__main__":
    sys.exit(main())
