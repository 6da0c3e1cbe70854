"""Benchmark: do slow clients and hung dependencies starve the broker's other routes? gevent vs gthread.

Two isolation goals, measured for each worker model in one run:

- Goal A, slow clients: 200 slowloris connections are held open against the broker. Half send a request
  head one byte per second and never finish it; half send a complete `POST /api/auth/login` head with
  `Content-Length: 1000` and then trickle the body one byte per second. A connection the broker closes is
  reopened at once, so 200 stay open. Meanwhile GET /health is probed: up to 300 sequential requests (or
  `--duration` seconds, whichever ends first), each on a new connection, 10 s timeout, ~20 ms apart.
  Goal: p99 < 100 ms and no failures.
- Goal B, hung dependencies: Keycloak is reached through a FaultProxy (tests/support/fault_proxy.py) and
  Redis through another; the broker logs alice in (so the discovery document and the realm's signing keys
  are in hand in every worker), then both proxies are switched to BLACKHOLE (connections are accepted,
  nothing is ever answered). 50 client threads keep POST /api/auth/refresh-token requests with distinct
  made-up refresh tokens open, each re-issued as soon as it is answered (after a 0.5 s pause when the answer
  came quicker than that, so a quick refusal does not turn into a hot loop). For `--duration` seconds
  GET /health, GET /ready, GET /metrics and GET /api/auth/verify (alice's bearer token) are probed, each
  route by a sequential prober of its own (the four run side by side, so a route that hangs cannot keep the
  others from being measured), each probe on a new connection, 10 s timeout, ~20 ms apart. Goal: p99 <
  100 ms per route and no failures. The broker runs with its defaults, so it lets at most
  BROKER_UPSTREAM_CONCURRENCY (32) calls wait on Keycloak per process and answers further refreshes 503 at
  once; a caller gives up after ~12 s (504) while its call goes on for up to 20 s. Fewer than 50 refreshes
  are then actually waiting; the load line under the table says how many were, on average.

Worker models, each `.venv/bin/python -m gunicorn --config gunicorn.conf.py` plus command-line overrides:

- `gevent`: the project default (no overrides: one gevent worker);
- `gthread`: the old model's 16 threads, `--worker-class gthread --workers 1 --threads 16` (one process,
  so that it runs with the same settings as gevent; BROKER_WORKERS is never set in the environment).

Both run with BROKER_REDIS_URL and BROKER_SINGLE_INSTANCE=true, as compose runs the broker: while Redis is out a
refresh goes on to Keycloak (coalesced in the process) instead of answering 503 at once, so in goal B the
refreshes really wait on the hung Keycloak.

The run starts its own clean Keycloak (scripts/keycloak.sh, 127.0.0.1:28380, management 29300, state in
.run/keycloak-isolation), its own redis-server, the two fault proxies and each broker on free loopback ports
in 28400-28499, and stops all of them at the end (also on Ctrl-C). Everything else in the broker's
environment is the default: KEYCLOAK_*/BROKER_* variables of the caller's environment are dropped, and
rate limits are off (all traffic comes from one address).

Usage (after `make install`; under 2 minutes once Keycloak is up):

    .venv/bin/python bench/isolation.py [--models gevent,gthread] [--duration 15] [--json]

What the figures mean: latencies are measured by this client, from before connecting to the last byte of
the answer, in milliseconds; p50/p99 are nearest-rank percentiles over every probe of the route, failures
included at the time they took (a timed-out probe counts as ~10000 ms). A failure is a probe that got no
answer within 10 s (refused, reset, timed out) or an unexpected status (200 for /health, /ready and
/metrics, 204 for /verify). "n" is how many probes of the route were made: a model whose probes hang makes
fewer. The goal holds when p99 < 100 ms and there was no failure. The ratio line divides gthread's p99 by
gevent's. Under each table, a line per model says what the load was (slow connections reopened, refresh
answers by status and how many refreshes were actually waiting on average). The benchmark client runs on
the same machine as the broker: on a busy machine every figure includes that noise.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.fault_proxy import FaultProxy  # noqa: E402

KC_PORT, KC_MGMT_PORT = 28380, 29300
PORT_RANGE = range(28400, 28500)
KC_STATE_DIR = REPO / ".run" / "keycloak-isolation"
CLIENT_SECRET = "token-broker-local-secret"

GOAL_MS = 100.0
PROBE_TIMEOUT = 10.0  # seconds, per probe
PROBE_GAP = 0.02  # seconds between two probes
GOAL_A_MAX_PROBES = 300
SLOW_CONNECTIONS = 200
HELD_REFRESHES = 50
HOLD_MIN_CYCLE = 0.5  # seconds: a holder whose refresh was answered quicker waits this long before the next
HOLD_TIMEOUT = 30.0  # seconds a holder waits for a refresh answer (the broker answers 504 after ~12 s)
RAMP_SECONDS = 2.0  # slow connections / held refreshes settle this long before probing starts

MODELS = {
    "gevent": {"overrides": [], "workers": 1},
    "gthread": {"overrides": ["--worker-class", "gthread", "--workers", "1", "--threads", "16"], "workers": 1},
}
HEALTH = ("GET /health", "/health", 200)
GOAL_B_ROUTES = [HEALTH, ("GET /ready", "/ready", 200), ("GET /metrics", "/metrics", 200),
                 ("GET /api/auth/verify", "/api/auth/verify", 204)]

# The slowloris request heads. "head": never finished (no blank line ever comes); "body": a complete head
# announcing 1000 bytes of body, which then arrives one byte per second.
SLOW_HEAD = b"GET /api/auth/me HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: isolation-bench-slowloris\r\nX-Slow: "
SLOW_BODY_HEAD = (b"POST /api/auth/login HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: isolation-bench-slowloris\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
SLOW_BODY = (b'{"username": "alice", "password": "' + b"a" * 1000)[:1000]


# ------------------------------------------------------------------------------------------- measuring


def call(port: int, method: str, path: str, *, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = PROBE_TIMEOUT) -> tuple[float, int | None]:
    """One request on a new connection: (milliseconds from before connecting to the answer's last byte, status)."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    status: int | None = None
    try:
        connection.request(method, path, body=body, headers={"Connection": "close", **(headers or {})})
        response = connection.getresponse()
        response.read()
        status = response.status
    except (OSError, http.client.HTTPException):
        status = None
    finally:
        connection.close()
    elapsed = (time.perf_counter() - started) * 1000
    if elapsed > timeout * 1000:
        status = None  # http.client's timeout is per socket operation; the probe's is for the whole exchange
    return elapsed, status


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


@dataclass
class RouteStats:
    route: str
    samples: list[tuple[float, bool]] = field(default_factory=list)  # (ms, answered as expected)

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def failures(self) -> int:
        return sum(1 for _, ok in self.samples if not ok)

    def figure(self, p: float | None) -> float | None:
        if not self.samples:
            return None
        values = sorted(ms for ms, _ in self.samples)
        return values[-1] if p is None else percentile(values, p)

    @property
    def held(self) -> bool:
        p99 = self.figure(99)
        return p99 is not None and p99 < GOAL_MS and self.failures == 0

    def as_dict(self) -> dict:
        return {"n": self.n, "p50_ms": _round(self.figure(50)), "p99_ms": _round(self.figure(99)),
                "max_ms": _round(self.figure(None)), "failures": self.failures, "goal_held": self.held}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def probe(port: int, routes: list[tuple[str, str, int]], duration: float, max_probes: int | None = None,
          headers: dict[str, str] | None = None) -> dict[str, RouteStats]:
    """Probe `routes` in turn, sequentially, each on a new connection, ~PROBE_GAP apart, for `duration` seconds."""
    stats = {label: RouteStats(label) for label, _, _ in routes}
    started = time.monotonic()
    count = 0
    while time.monotonic() - started < duration and (max_probes is None or count < max_probes):
        label, path, expected = routes[count % len(routes)]
        elapsed, status = call(port, "GET", path, headers=headers)
        stats[label].samples.append((elapsed, status == expected))
        count += 1
        time.sleep(PROBE_GAP)
    return stats


def probe_each(port: int, routes: list[tuple[str, str, int]], duration: float,
               headers: dict[str, str] | None = None) -> dict[str, RouteStats]:
    """Probe every route with a sequential prober of its own, all at the same time, for `duration` seconds.

    One prober per route, so a route that hangs does not keep the others from being measured.
    """
    stats: dict[str, RouteStats] = {}

    def one(route: tuple[str, str, int]) -> None:
        stats.update(probe(port, [route], duration, headers=headers))

    threads = [threading.Thread(target=one, args=(route,), name=f"probe {route[0]}", daemon=True) for route in routes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration + PROBE_TIMEOUT + 5)
    return {label: stats.get(label, RouteStats(label)) for label, _, _ in routes}


# ----------------------------------------------------------------------------------------------- load


class Slowloris:
    """`count` slow connections (half unfinished heads, half trickled bodies), one byte per second each."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.kinds = ["head" if i % 2 == 0 else "body" for i in range(count)]
        self.socks: list[socket.socket | None] = [None] * count
        self.sent = [0] * count
        self.reopened = 0  # connections the broker closed (or answered), reopened to keep `count` open
        self.open_failures = 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="slowloris", daemon=True)

    def start(self) -> None:
        for index in range(len(self.socks)):
            self._open(index)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)
        for index, sock in enumerate(self.socks):
            if sock is not None:
                sock.close()
                self.socks[index] = None

    @property
    def open_count(self) -> int:
        return sum(1 for s in self.socks if s is not None)

    def _open(self, index: int) -> None:
        """Connect and send the opening bytes: the whole head of a "body" connection, one byte of a "head" one."""
        self.sent[index] = 0
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        except OSError:
            self.open_failures += 1
            self.socks[index] = None
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(1)
            sock.sendall(SLOW_BODY_HEAD if self.kinds[index] == "body" else self._next_byte(index))
            if self.kinds[index] == "head":
                self.sent[index] = 1
        except OSError:
            sock.close()
            self.open_failures += 1
            self.socks[index] = None
            return
        self.socks[index] = sock

    def _next_byte(self, index: int) -> bytes:
        i = self.sent[index]
        if self.kinds[index] == "head":
            return SLOW_HEAD[i:i + 1] if i < len(SLOW_HEAD) else b"a"
        return SLOW_BODY[i:i + 1] if i < len(SLOW_BODY) - 1 else b""  # never the last byte

    def _trickle(self, index: int) -> None:
        sock, byte = self.socks[index], self._next_byte(index)
        if sock is None or not byte:
            return
        try:
            sock.send(byte)
            self.sent[index] += 1
        except OSError:
            self._reopen(index)

    def _reopen(self, index: int) -> None:
        sock = self.socks[index]
        if sock is not None:
            sock.close()
        self.socks[index] = None
        if not self.stop_event.is_set():
            self.reopened += 1
            self._open(index)

    def _run(self) -> None:
        while not self.stop_event.wait(1.0):
            poller = select.poll()
            for sock in self.socks:
                if sock is not None:
                    poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            # The broker answered (400, 408, ...) or closed: either way the connection is not held any more.
            answered = {fd for fd, _ in poller.poll(0)}
            for index, sock in enumerate(self.socks):
                if self.stop_event.is_set():
                    return
                if sock is None or sock.fileno() in answered:
                    self._reopen(index)
                else:
                    self._trickle(index)


class RefreshHolders:
    """`count` threads, each keeping one refresh with a fresh made-up token open, re-issued when answered."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.measuring = False
        self.statuses: Counter = Counter()  # answers that arrived while measuring
        self.in_flight_samples: list[int] = []
        self.threads = [threading.Thread(target=self._hold, name=f"holder-{i}", daemon=True) for i in range(count)]
        self.sampler = threading.Thread(target=self._sample, name="holder-sampler", daemon=True)

    def start(self) -> None:
        for thread in self.threads:
            thread.start()
        self.sampler.start()

    def stop(self) -> None:
        self.stop_event.set()  # threads waiting on an answer end when the broker goes (they are daemons)

    def measure(self, on: bool) -> None:
        with self.lock:
            self.measuring = on

    def _hold(self) -> None:
        while not self.stop_event.is_set():
            body = json.dumps({"refresh_token": f"isolation-bench-{uuid.uuid4().hex}"}).encode()
            with self.lock:
                self.in_flight += 1
            elapsed, status = call(self.port, "POST", "/api/auth/refresh-token", body=body,
                                   headers={"Content-Type": "application/json"}, timeout=HOLD_TIMEOUT)
            with self.lock:
                self.in_flight -= 1
                if self.measuring:
                    self.statuses["no answer" if status is None else str(status)] += 1
            if elapsed < HOLD_MIN_CYCLE * 1000:
                self.stop_event.wait(HOLD_MIN_CYCLE - elapsed / 1000)

    def _sample(self) -> None:
        while not self.stop_event.wait(0.1):
            with self.lock:
                if self.measuring:
                    self.in_flight_samples.append(self.in_flight)

    def summary(self) -> dict:
        samples = self.in_flight_samples or [0]
        return {"held": len(self.threads), "in_flight_mean": round(sum(samples) / len(samples), 1),
                "in_flight_min": min(samples), "answers": dict(sorted(self.statuses.items()))}


# ------------------------------------------------------------------------------------------- processes


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


class Ports:
    """Hands out free loopback ports from PORT_RANGE, never the same one twice in a run."""

    def __init__(self) -> None:
        self.given: set[int] = set()

    def take(self) -> int:
        for port in PORT_RANGE:
            if port not in self.given and port_free(port):
                self.given.add(port)
                return port
        raise RuntimeError(f"no free port left in {PORT_RANGE.start}-{PORT_RANGE.stop - 1} on 127.0.0.1")


def stop_group(process: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGINT (gunicorn's and redis's quick shutdown) to the process group, then SIGKILL after `grace` seconds."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; make sure no worker of its group lingers
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def start_redis(port: int) -> subprocess.Popen:
    process = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port),
                                "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return process
        except OSError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}")
        time.sleep(0.1)
    stop_group(process)
    raise RuntimeError("redis-server did not answer PING")


def broker_environment(port: int, keycloak_url: str, redis_url: str, metrics_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KEYCLOAK_", "BROKER_")) and k not in ("BROKER_REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")}
    env.update(KEYCLOAK_URL=keycloak_url, KEYCLOAK_CLIENT_SECRET=CLIENT_SECRET, BROKER_BIND=f"127.0.0.1:{port}",
               BROKER_REDIS_URL=redis_url, BROKER_SINGLE_INSTANCE="true", BROKER_RATE_LIMITS_ENABLED="false",
               PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    return env


def start_broker(model: str, port: int, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    python = REPO / ".venv" / "bin" / "python"
    command = [str(python if python.exists() else sys.executable), "-m", "gunicorn", "--config", "gunicorn.conf.py",
               *MODELS[model]["overrides"]]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError(f"the {model} broker exited with {process.returncode}:\n" + "\n".join(tail))
        if call(port, "GET", "/health", timeout=1)[1] == 200:
            return process
        time.sleep(0.2)
    stop_group(process)
    raise RuntimeError(f"the {model} broker did not answer /health within 30s (log: {log_path})")


def metric_total(port: int, pattern: str) -> float:
    """The sum of the samples of /metrics whose line matches `pattern` (a regex for name and labels)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/metrics", headers={"Connection": "close"})
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    regex = re.compile(rf"^{pattern}\s+([0-9.eE+-]+)$", re.M)
    return sum(float(value) for value in regex.findall(text))


def login_and_warm(port: int, workers: int) -> str:
    """Log alice in; then make every worker fetch discovery and signing keys (via /ready); return her access token."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/api/auth/login", body=json.dumps({"username": "alice",
                                                                        "password": "alice-password"}),
                           headers={"Content-Type": "application/json", "Connection": "close"})
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"login answered {response.status}: {body[:200]!r}")
    token = json.loads(body)["token"]["access_token"]
    bearer = {"Authorization": f"Bearer {token}"}
    # Connections land on whichever worker accepts first: repeat until every worker has its keys.
    for _ in range(200):
        call(port, "GET", "/ready")
        call(port, "GET", "/api/auth/verify", headers=bearer)
        if metric_total(port, r'broker_jwks_fetches_total\{outcome="ok"\}') >= workers:
            break
    else:
        raise RuntimeError(f"not every one of the {workers} workers fetched the signing keys")
    for _ in range(10 * workers):  # /verify also builds each worker's token policy; make sure it answers
        if call(port, "GET", "/api/auth/verify", headers=bearer)[1] != 204:
            raise RuntimeError("GET /api/auth/verify with alice's token did not answer 204 before the faults")
    return token


# ------------------------------------------------------------------------------------------------- run


def run_model(model: str, ports: Ports, kc_proxy: FaultProxy, redis_proxy: FaultProxy, logs: Path,
              duration: float, processes: list[subprocess.Popen]) -> dict:
    port = ports.take()
    metrics_dir = logs / f"metrics-{model}"
    metrics_dir.mkdir()
    env = broker_environment(port, kc_proxy.url, f"redis://127.0.0.1:{redis_proxy.port}/0", metrics_dir)
    broker = start_broker(model, port, env, logs / f"broker-{model}.log")
    processes.append(broker)
    result: dict = {"port": port}
    try:
        # Goal A: slow clients, dependencies healthy.
        print(f"[{model}] goal A: {SLOW_CONNECTIONS} slow connections, probing GET /health", file=sys.stderr,
              flush=True)
        slow = Slowloris(port, SLOW_CONNECTIONS)
        try:
            slow.start()
            time.sleep(RAMP_SECONDS)
            held_at_start = slow.open_count
            stats = probe(port, [HEALTH], duration, max_probes=GOAL_A_MAX_PROBES)
            result["goal_a"] = {"routes": {k: v for k, v in stats.items()},
                                "load": {"slow_open_at_start": held_at_start, "slow_open_at_end": slow.open_count,
                                         "reopened": slow.reopened, "open_failures": slow.open_failures}}
        finally:
            slow.stop()
        time.sleep(1.0)

        # Goal B: Keycloak and Redis hung, 50 refreshes held open.
        token = login_and_warm(port, MODELS[model]["workers"])
        print(f"[{model}] goal B: Keycloak and Redis blackholed, {HELD_REFRESHES} refreshes held, probing "
              f"{len(GOAL_B_ROUTES)} routes", file=sys.stderr, flush=True)
        kc_proxy.set_mode(FaultProxy.BLACKHOLE)
        redis_proxy.set_mode(FaultProxy.BLACKHOLE)
        holders = RefreshHolders(port, HELD_REFRESHES)
        try:
            holders.start()
            time.sleep(RAMP_SECONDS)
            holders.measure(True)
            stats = probe_each(port, GOAL_B_ROUTES, duration, headers={"Authorization": f"Bearer {token}"})
            holders.measure(False)
            result["goal_b"] = {"routes": stats, "load": holders.summary()}
        finally:
            holders.stop()
    finally:
        stop_group(broker)
        processes.remove(broker)
        for proxy in (kc_proxy, redis_proxy):
            proxy.set_mode(FaultProxy.PASS)
            proxy.reset_all()
    return result


def p99_ratio(results: dict[str, dict], goal: str, route: str) -> float | None:
    """gthread's p99 divided by gevent's, for one goal and route (None when either has no figure)."""
    gevent_p99 = results["gevent"][goal]["routes"][route].figure(99)
    gthread_p99 = results["gthread"][goal]["routes"][route].figure(99)
    if not gevent_p99 or gthread_p99 is None:
        return None
    return round(gthread_p99 / gevent_p99, 2)


def render_table(title: str, results: dict[str, dict], goal: str, routes: list[str]) -> str:
    lines = [title]
    header = f"{'worker model':13s} {'route':22s} {'n':>4s} {'p50 ms':>9s} {'p99 ms':>9s} {'max ms':>9s} " \
             f"{'failures':>8s}  goal (p99 < {GOAL_MS:g} ms)"
    lines += [header, "-" * len(header)]

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:9.1f}"

    for model, result in results.items():
        for route in routes:
            s: RouteStats = result[goal]["routes"][route]
            lines.append(f"{model:13s} {route:22s} {s.n:4d} {fmt(s.figure(50)):>9s} {fmt(s.figure(99)):>9s} "
                         f"{fmt(s.figure(None)):>9s} {s.failures:8d}  {'held' if s.held else 'MISSED'}")
    if "gevent" in results and "gthread" in results:
        for route in routes:
            ratio = p99_ratio(results, goal, route)
            if ratio is not None:
                lines.append(f"gthread p99 / gevent p99, {route}: {ratio:.1f}x "
                             f"({results['gthread'][goal]['routes'][route].figure(99):.1f} / "
                             f"{results['gevent'][goal]['routes'][route].figure(99):.1f} ms)")
    for model, result in results.items():
        load = result[goal]["load"]
        if goal == "goal_a":
            lines.append(f"load, {model}: slow connections open {load['slow_open_at_start']} at start / "
                         f"{load['slow_open_at_end']} at end; closed by the broker and reopened: {load['reopened']}; "
                         f"could not open: {load['open_failures']}")
        else:
            answers = ", ".join(f"{k}: {v}" for k, v in load["answers"].items()) or "none"
            lines.append(f"load, {model}: {load['held']} refresh holders, waiting on average {load['in_flight_mean']}"
                         f" (min {load['in_flight_min']}); refresh answers while measuring: {answers}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gevent,gthread",
                        help="comma-separated worker models to compare (default gevent,gthread)")
    parser.add_argument("--duration", type=float, default=15.0,
                        help="seconds of probing per goal and model, 5-60 (default 15)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    if not 5 <= args.duration <= 60:
        parser.error("--duration must be between 5 and 60 seconds")

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    kc_env = {**os.environ, "KC_HTTP_PORT": str(KC_PORT), "KC_MANAGEMENT_PORT": str(KC_MGMT_PORT),
              "KC_STATE_DIR": str(KC_STATE_DIR)}
    logs = Path(tempfile.mkdtemp(prefix="isolation-bench-"))
    processes: list[subprocess.Popen] = []
    proxies: list[FaultProxy] = []
    ports = Ports()
    results: dict[str, dict] = {}
    try:
        subprocess.run([str(REPO / "scripts" / "keycloak.sh"), "start"], env=kc_env, check=True)
        began = time.monotonic()
        redis_port = ports.take()
        processes.append(start_redis(redis_port))
        kc_proxy = FaultProxy("127.0.0.1", KC_PORT, listen_port=ports.take()).start()
        proxies.append(kc_proxy)
        redis_proxy = FaultProxy("127.0.0.1", redis_port, listen_port=ports.take()).start()
        proxies.append(redis_proxy)
        load_before = os.getloadavg()
        for model in models:
            results[model] = run_model(model, ports, kc_proxy, redis_proxy, logs, args.duration, processes)
        load_after = os.getloadavg()
        elapsed = time.monotonic() - began

        print(f"isolation benchmark: Keycloak {(REPO / 'keycloak.version').read_text().strip()}, gunicorn "
              f"{version('gunicorn')}, gevent {version('gevent')}, Python {platform.python_version()}, "
              f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} before / {load_after[0]:.2f} after; "
              f"{args.duration:g} s per phase; {elapsed:.0f} s after Keycloak was up; broker logs in {logs}")
        print("models: " + "; ".join(
            f"{m} = gunicorn --config gunicorn.conf.py {' '.join(MODELS[m]['overrides']) or '(no overrides)'}"
            for m in models))
        print()
        print(render_table(f"Goal A: GET /health with {SLOW_CONNECTIONS} slowloris connections open "
                           f"(up to {GOAL_A_MAX_PROBES} sequential probes, new connection each)",
                           results, "goal_a", [HEALTH[0]]))
        print()
        print(render_table(f"Goal B: Keycloak and Redis blackholed, {HELD_REFRESHES} refreshes held open "
                           "(one sequential prober per route, new connection each)",
                           results, "goal_b", [label for label, _, _ in GOAL_B_ROUTES]))
        if args.json:
            document = {
                "environment": {"cpus": os.cpu_count(), "load_before": round(load_before[0], 2),
                                "load_after": round(load_after[0], 2), "duration_s": args.duration,
                                "gunicorn": version("gunicorn"), "gevent": version("gevent")},
                "goal_ms": GOAL_MS,
                "models": {m: {"overrides": MODELS[m]["overrides"]} for m in models},
            }
            for goal in ("goal_a", "goal_b"):
                document[goal] = {m: {"routes": {route: s.as_dict() for route, s in r[goal]["routes"].items()},
                                      "load": r[goal]["load"]} for m, r in results.items()}
            if "gevent" in results and "gthread" in results:
                document["ratio_p99_gthread_over_gevent"] = {
                    goal: {route: p99_ratio(results, goal, route) for route in results["gevent"][goal]["routes"]}
                    for goal in ("goal_a", "goal_b")}
            print()
            print(json.dumps(document, indent=2))
        return 0
    except KeyboardInterrupt:
        print("isolation: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        for process in reversed(processes):  # brokers first, then redis: each runs in a process group of its own
            stop_group(process)
        for proxy in proxies:
            proxy.stop()
        subprocess.run([str(REPO / "scripts" / "keycloak.sh"), "stop"], env=kc_env)


if __name__ == "__main__":
    sys.exit(main())
