"""Benchmark: the broker's GET /api/auth/verify against Keycloak's own token introspection, in one run.

A gateway that authenticates every request either asks the broker (`/verify`: the access token is
validated locally against the realm's signing keys) or asks Keycloak (`.../token/introspect`: a round
trip to the identity provider). This script measures both on the same machine, one after the other, with
the same load generator at the same concurrency, and prints throughput, latency percentiles and the
ratios. It is a benchmark, not a test: it asserts nothing about speed, it reports figures.

Usage (after `make install`, from anywhere):

    .venv/bin/python bench/verify_vs_introspection.py [--concurrency 16] [--duration 10] [--warmup 30]
        [--rounds 1] [--order broker-first|keycloak-first] [--workers N]
        [--procs N] [--client raw|http.client] [--max-requests N] [--with-health] [--json]

It takes about a minute to start Keycloak, then (warm-up + duration) per target and round.

What it does, step by step:

1. Starts its own clean Keycloak with `scripts/keycloak.sh start` (KC_HTTP_PORT=28080,
   KC_MANAGEMENT_PORT=29000: a fresh server with keycloak-realm.json imported; state in
   .run/keycloak-28080) and the broker with `.venv/bin/python -m gunicorn --config gunicorn.conf.py`
   on 127.0.0.1:28000 (KEYCLOAK_URL=http://127.0.0.1:28080, the shipped realm's local secret; the
   broker's own BROKER_WORKERS default (one gevent worker) unless --workers says otherwise; every
   other KEYCLOAK_*/BROKER_* variable of the caller's environment is dropped). The broker's log goes to
   .run/bench/broker-28000.log. Both are stopped at the end, also on Ctrl-C, SIGTERM or failure.
   It refuses to start when one of the three ports is already taken.
2. Logs alice in through the broker (POST /api/auth/login) for a real access token, and checks that
   /verify answers 204 and that Keycloak's introspection answers 200 with "active": true.
3. For each target: opens `--concurrency` keep-alive connections (spread over `--procs` processes, each
   running one thread per connection, so the generator does not queue on one GIL), warms up for
   `--warmup` seconds, then measures for `--duration` seconds (at most 60) with no gap in between:
   (a) GET /api/auth/verify with `Authorization: Bearer <token>`, success = 204;
   (b) POST /realms/demo/protocol/openid-connect/token/introspect with the form
       client_id, client_secret, token; success = 200 with "active":true in the body.
   Anything else (other status, inactive answer, connection error, timeout) is counted as an error, by kind.
   With `--with-health`, also (c) the broker's GET /health, success = 200: the same server, hooks and
   logging with no token work, i.e. the floor of what any broker route costs.
   Each phase is also bounded to `--max-requests` measured requests. With `--rounds N` (at most 5) both
   targets are measured N times, the order alternating (A B, B A, ...), later rounds with a 1 s warm-up;
   this spreads drifting background load over both targets.
4. Prints a table (requests, req/s, p50/p90/p99 ms, errors, CPU time per request of the server's process
   group and of the load generator, the server's CPU cores, and the cores everything else on the machine
   used meanwhile), the ratios broker/Keycloak, the parameters and the machine; with several rounds, per
   round and pooled. `--json` prints the same as one JSON document on stdout instead.

Everything listens on and targets 127.0.0.1 only. Progress goes to stderr.

Reading the figures: the machine is shared, so absolute numbers move from run to run; the ratios within
one run are the result. The load generator runs on the same cores as the servers; `--client raw` (the
default) is a minimal HTTP/1.1 client on plain sockets that costs far less CPU per request than
`http.client`, so that it takes as little as possible away from the server under test.
"""

from __future__ import annotations

import argparse
import array
import http.client
import json
import math
import multiprocessing as mp
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parents[1]
KEYCLOAK_SCRIPT = REPO / "scripts" / "keycloak.sh"
HOST = "127.0.0.1"
REALM = "demo"
CLIENT_ID = "token-broker"
CLIENT_SECRET = "token-broker-local-secret"
USERNAME, PASSWORD = "alice", "alice-password"
VERIFY_PATH = "/api/auth/verify"
INTROSPECT_PATH = f"/realms/{REALM}/protocol/openid-connect/token/introspect"

MAX_DURATION = 60.0  # hard cap, seconds of measurement per target
MAX_WARMUP = 30.0
MAX_CONCURRENCY = 256
MAX_REQUESTS = 2_000_000
REQUEST_TIMEOUT = 10.0  # seconds, per request of the load generator
CLK_TCK = os.sysconf("SC_CLK_TCK")
LATER_WARMUP = 1.0  # seconds of warm-up in rounds after the first (connections only; the JIT is warm)
NAMES = {"broker": "broker GET /verify", "keycloak": "keycloak POST introspect", "health": "broker GET /health"}


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# HTTP clients of the load generator: one connection per thread, kept alive, reopened after an error.
# --------------------------------------------------------------------------------------------------

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)")
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked")
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close")


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client on a plain socket: sends prebuilt bytes, parses the answer.

    Enough for the two targets: status line, headers, a body by Content-Length or chunked encoding,
    no body for 1xx/204/304, otherwise read to close. Much cheaper per request than http.client.
    """

    def __init__(self, port: int, request: bytes):
        self.port = port
        self.payload = request
        self.sock: socket.socket | None = None
        self.buf = b""

    def connect(self) -> None:
        self.close()
        sock = socket.create_connection((HOST, self.port), timeout=REQUEST_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buf = sock, b""

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        self.buf += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line, self.buf = self.buf[:end], self.buf[end + 2:]
        return line

    def request(self) -> tuple[int, bytes]:
        if self.sock is None:
            self.connect()
        self.sock.sendall(self.payload)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        head, self.buf = self.buf[:end + 2].lower(), self.buf[end + 4:]
        if not head.startswith(b"http/1.") or len(head) < 12:
            raise ValueError("not an HTTP/1.x response")
        status = int(head[9:12])
        if 100 <= status < 200 or status in (204, 304):
            body = b""
        elif match := _CONTENT_LENGTH.search(head):
            body = self._take(int(match.group(1)))
        elif _CHUNKED.search(head):
            parts = []
            while size := int(self._line().split(b";")[0], 16):
                parts.append(self._take(size))
                self._take(2)
            while self._line():  # trailers, up to the empty line
                pass
            body = b"".join(parts)
        else:  # delimited by the end of the connection
            try:
                while True:
                    self._fill()
            except ConnectionError:
                pass
            body, self.buf = self.buf, b""
            self.close()
        if _CLOSE.search(head):
            self.close()
        return status, body


class StdlibConnection:
    """The same job done by http.client (heavier per request; kept for comparison with --client)."""

    def __init__(self, port: int, method: str, path: str, headers: dict[str, str], body: bytes | None):
        self.conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT)
        self.args = (method, path, body, headers)

    def connect(self) -> None:
        self.conn.close()
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.conn.close()

    def request(self) -> tuple[int, bytes]:
        method, path, body, headers = self.args
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        return response.status, response.read()


def _make_connection(target: dict[str, Any], client: str):
    if client == "raw":
        return RawConnection(target["port"], target["raw"])
    return StdlibConnection(target["port"], target["method"], target["path"], target["headers"], target["body"])


def _run_thread(target, client, go, start_at, measure_ns, end_ns, cap, out, ready_barrier) -> None:
    """One connection, one request at a time, from start to end; latencies of measured successes in ns."""
    conn = _make_connection(target, client)
    latencies = array.array("q")
    errors: dict[str, int] = {}
    warm = warm_errors = 0
    last_done = 0
    try:
        conn.connect()
    except OSError as exc:
        errors[f"connect: {type(exc).__name__}"] = 1
    ready_barrier.wait()
    go.wait()
    delay = start_at.value - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    expected, must_contain = target["expected_status"], target["must_contain"]
    measured = 0
    while True:
        t0 = time.monotonic_ns()
        if t0 >= end_ns.value or measured >= cap:
            break
        try:
            status, body = conn.request()
            fault = None
            if status != expected:
                fault = f"HTTP {status}"
            elif must_contain is not None and must_contain not in body.replace(b" ", b""):
                fault = "unexpected body"
        except Exception as exc:  # noqa: BLE001 - every failure is counted, none ends the thread
            fault = type(exc).__name__
            conn.close()
        t1 = time.monotonic_ns()
        if t0 < measure_ns.value:
            warm += 1
            if fault is not None:
                warm_errors += 1
                if not fault.startswith("HTTP") and fault != "unexpected body":
                    time.sleep(0.01)
            continue
        measured += 1
        last_done = t1
        if fault is None:
            latencies.append(t1 - t0)
        else:
            errors[fault] = errors.get(fault, 0) + 1
            if fault.startswith("HTTP") or fault == "unexpected body":
                continue
            time.sleep(0.01)  # a broken connection: do not spin
    conn.close()
    out.append((latencies, errors, warm, warm_errors, last_done))


def _load_process(target, client, threads, go, start_at, measure_ns, end_ns, cap, ready_queue, result_queue):
    """A generator process: `threads` threads, each with its own connection; sends results back as bytes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends us
    out: list = []
    barrier = threading.Barrier(threads + 1)
    workers = [
        threading.Thread(
            target=_run_thread,
            args=(target, client, go, start_at, measure_ns, end_ns, cap, out, barrier),
            daemon=True,
        )
        for _ in range(threads)
    ]
    for worker in workers:
        worker.start()
    barrier.wait()
    ready_queue.put(os.getpid())
    for worker in workers:
        worker.join()
    latencies = array.array("q")
    errors: dict[str, int] = {}
    warm = warm_errors = last_done = 0
    for lat, errs, w, we, last in out:
        latencies.extend(lat)
        for key, count in errs.items():
            errors[key] = errors.get(key, 0) + count
        warm += w
        warm_errors += we
        last_done = max(last_done, last)
    result_queue.put({"latencies": latencies.tobytes(), "errors": errors, "warm": warm,
                      "warm_errors": warm_errors, "last_done": last_done})


# --------------------------------------------------------------------------------------------------
# CPU accounting from /proc: per process group (a server), per pid (generator), and the whole machine.
# --------------------------------------------------------------------------------------------------

def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode()
    except OSError:
        return None
    return data[data.rfind(")") + 2:].split()  # fields from "state" on; comm may hold spaces


def group_cpu_seconds(pgid: int) -> float:
    """user+system CPU seconds of every live process in process group `pgid`."""
    total = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(entry)
            if fields and int(fields[2]) == pgid:  # field 5 of stat is pgrp; fields[0] is field 3
                total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def pids_cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def machine_ticks() -> tuple[int, int, int]:
    """(total, idle incl. iowait, steal) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    steal = values[7] if len(values) > 7 else 0
    return sum(values[:8]), idle, steal


# --------------------------------------------------------------------------------------------------
# One measurement: a target under load from the generator, with CPU accounting around the window.
# --------------------------------------------------------------------------------------------------

def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of sorted nanosecond values, in milliseconds."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1] / 1e6


def measure(target: dict[str, Any], args: argparse.Namespace, server_pgid: int, warmup: float) -> dict[str, Any]:
    """One phase: warm up, then measure; the raw figures of the window (see `summarize`)."""
    ctx = mp.get_context("spawn")
    procs = min(args.procs, args.concurrency)
    per_proc = [args.concurrency // procs + (1 if i < args.concurrency % procs else 0) for i in range(procs)]
    cap = math.ceil(args.max_requests / args.concurrency)
    go, start_at = ctx.Event(), ctx.Value("d", 0.0)
    measure_ns, end_ns = ctx.Value("q", 0), ctx.Value("q", 0)
    ready_queue, result_queue = ctx.Queue(), ctx.Queue()
    processes = [
        ctx.Process(
            target=_load_process,
            args=(target, args.client, n, go, start_at, measure_ns, end_ns, cap, ready_queue, result_queue),
            daemon=True,
        )
        for n in per_proc
    ]
    try:
        for process in processes:
            process.start()
        for _ in processes:
            ready_queue.get(timeout=60)
        begin = time.monotonic() + 0.2
        measure_start = begin + warmup
        start_at.value = begin
        measure_ns.value = int(measure_start * 1e9)
        end_ns.value = int((measure_start + args.duration) * 1e9)
        go.set()
        log(f"{target['name']}: {warmup:g} s warm-up, then {args.duration:g} s measured "
            f"({args.concurrency} connections in {procs} processes)")
        time.sleep(max(0.0, measure_start - time.monotonic()))
        pids = [p.pid for p in processes]
        cpu0 = (group_cpu_seconds(server_pgid), pids_cpu_seconds(pids), machine_ticks(), time.monotonic())
        time.sleep(max(0.0, measure_start + args.duration - time.monotonic()))
        cpu1 = (group_cpu_seconds(server_pgid), pids_cpu_seconds(pids), machine_ticks(), time.monotonic())
        results = [result_queue.get(timeout=REQUEST_TIMEOUT + 30) for _ in processes]
        for process in processes:
            process.join(timeout=10)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)

    latencies = array.array("q")
    errors: dict[str, int] = {}
    warm = warm_errors = last_done = 0
    for result in results:
        latencies.frombytes(result["latencies"])
        for key, count in result["errors"].items():
            errors[key] = errors.get(key, 0) + count
        warm += result["warm"]
        warm_errors += result["warm_errors"]
        last_done = max(last_done, result["last_done"])
    (server0, gen0, (total0, idle0, steal0), t0), (server1, gen1, (total1, idle1, steal1), t1) = cpu0, cpu1
    ticks = max(1, total1 - total0)
    window = t1 - t0
    return {
        "latencies": latencies,
        "errors": errors,
        "warm": warm,
        "warm_errors": warm_errors,
        # the window runs from the first measured request's start to the last measured answer
        "seconds": max(args.duration, (last_done / 1e9 - measure_start) if last_done else 0.0),
        "cpu_window": window,
        "server_cpu": server1 - server0,
        "generator_cpu": gen1 - gen0,
        "busy_cpu": window * (os.cpu_count() or 1) * (1 - (idle1 - idle0) / ticks),
        "steal_cpu": window * (os.cpu_count() or 1) * (steal1 - steal0) / ticks,
    }


def summarize(name: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of one target over one or more measured phases (pooled: counts add up, percentiles of all)."""
    latencies = sorted(v for part in parts for v in part["latencies"])
    errors: dict[str, int] = {}
    for part in parts:
        for key, count in part["errors"].items():
            errors[key] = errors.get(key, 0) + count
    ok, failed = len(latencies), sum(errors.values())
    done = max(1, ok + failed)
    seconds = sum(p["seconds"] for p in parts)
    window = sum(p["cpu_window"] for p in parts)
    server, generator = sum(p["server_cpu"] for p in parts), sum(p["generator_cpu"] for p in parts)
    busy, steal = sum(p["busy_cpu"] for p in parts), sum(p["steal_cpu"] for p in parts)
    return {
        "target": name,
        "phases": len(parts),
        "requests": ok + failed,
        "ok": ok,
        "errors": failed,
        "error_kinds": errors,
        "warmup_requests": sum(p["warm"] for p in parts),
        "warmup_errors": sum(p["warm_errors"] for p in parts),
        "seconds": round(seconds, 3),
        "throughput_rps": ok / seconds,
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "mean_ms": (sum(latencies) / ok / 1e6) if ok else float("nan"),
        # CPU during the measured windows, from /proc (10 ms resolution); cores = CPU seconds per second.
        "server_cpu_ms_per_request": server * 1000 / done,
        "server_cpu_cores": server / window,
        "generator_cpu_ms_per_request": generator * 1000 / done,
        "generator_cpu_cores": generator / window,
        "machine_busy_cores": busy / window,
        # whatever else ran on the machine meanwhile (other people's work, the kernel, this script's parent)
        "others_cpu_cores": max(0.0, (busy - server - generator) / window),
        "machine_steal_cores": steal / window,
    }


def ratios(broker: dict[str, Any], keycloak: dict[str, Any], health: dict[str, Any] | None = None) -> dict[str, float]:
    def div(a: float, b: float) -> float:
        return a / b if b else float("nan")

    extra = {} if health is None else {
        "throughput_health_over_verify": div(health["throughput_rps"], broker["throughput_rps"]),
        "server_cpu_per_request_verify_over_health":
            div(broker["server_cpu_ms_per_request"], health["server_cpu_ms_per_request"]),
    }
    return extra | {
        "throughput_broker_over_keycloak": div(broker["throughput_rps"], keycloak["throughput_rps"]),
        "p50_keycloak_over_broker": div(keycloak["p50_ms"], broker["p50_ms"]),
        "server_cpu_per_request_keycloak_over_broker":
            div(keycloak["server_cpu_ms_per_request"], broker["server_cpu_ms_per_request"]),
    }


# --------------------------------------------------------------------------------------------------
# The servers: a clean Keycloak through scripts/keycloak.sh, and the broker under gunicorn.
# --------------------------------------------------------------------------------------------------

def port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((HOST, port)) == 0


def call(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """One plain request (no proxies, no redirects): status, headers, body."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


class Servers:
    """Starts Keycloak and the broker, and stops whatever it started, whatever happens."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.kc_env = {**os.environ, "KC_HTTP_PORT": str(args.keycloak_port),
                       "KC_MANAGEMENT_PORT": str(args.management_port)}
        state_dir = os.environ.get("KC_STATE_DIR") or str(REPO / ".run" / f"keycloak-{args.keycloak_port}")
        self.kc_pid_file = Path(state_dir) / "keycloak.pid"
        self.kc_started = False
        self.broker: subprocess.Popen | None = None
        self.broker_log = REPO / ".run" / "bench" / f"broker-{args.broker_port}.log"

    def start_keycloak(self) -> int:
        log(f"starting a clean Keycloak on {HOST}:{self.args.keycloak_port} (scripts/keycloak.sh start; "
            "this takes a minute)")
        self.kc_started = True  # from here on, always stop: the script may fail after launching the server
        started = subprocess.run([str(KEYCLOAK_SCRIPT), "start"], env=self.kc_env, stdin=subprocess.DEVNULL,
                                 capture_output=True, text=True, timeout=900)
        if started.returncode != 0:
            raise RuntimeError(f"Keycloak did not start:\n{started.stderr[-3000:]}")
        return int(self.kc_pid_file.read_text().strip())

    def start_broker(self) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYCLOAK_", "BROKER_"))}
        env.update(
            KEYCLOAK_URL=f"http://{HOST}:{self.args.keycloak_port}",
            KEYCLOAK_CLIENT_SECRET=CLIENT_SECRET,
            BROKER_BIND=f"{HOST}:{self.args.broker_port}",
        )
        if self.args.workers is not None:
            env["BROKER_WORKERS"] = str(self.args.workers)
        self.broker_log.parent.mkdir(parents=True, exist_ok=True)
        python = REPO / ".venv" / "bin" / "python"
        log(f"starting the broker on {HOST}:{self.args.broker_port} (gunicorn, log in {self.broker_log})")
        with open(self.broker_log, "wb") as out:
            self.broker = subprocess.Popen(
                [str(python), "-m", "gunicorn", "--config", "gunicorn.conf.py"],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.broker.poll() is not None:
                raise RuntimeError(f"the broker exited with {self.broker.returncode}:\n{self._broker_log_tail()}")
            try:
                if call(self.args.broker_port, "GET", "/ready", timeout=2)[0] == 200:
                    return self.broker.pid
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the broker was not ready within 60 s:\n{self._broker_log_tail()}")

    def _broker_log_tail(self) -> str:
        try:
            return "\n".join(self.broker_log.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.broker is not None and self.broker.poll() is None:
            log("stopping the broker")
            try:
                os.killpg(self.broker.pid, signal.SIGTERM)
                self.broker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.broker.pid, signal.SIGKILL)
                self.broker.wait(timeout=10)
            except ProcessLookupError:
                pass
        if self.kc_started:
            log("stopping Keycloak (scripts/keycloak.sh stop)")
            subprocess.run([str(KEYCLOAK_SCRIPT), "stop"], env=self.kc_env, stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=120)
            self.kc_started = False


def login(broker_port: int) -> str:
    body = json.dumps({"username": USERNAME, "password": PASSWORD}).encode()
    status, _, answer = call(broker_port, "POST", "/api/auth/login", body, {"Content-Type": "application/json"})
    if status != 200:
        raise RuntimeError(f"login through the broker answered {status}: {answer[:300]!r}")
    return json.loads(answer)["token"]["access_token"]


def targets(args: argparse.Namespace, token: str) -> dict[str, dict[str, Any]]:
    verify_headers = {"Authorization": f"Bearer {token}", "Accept": "*/*"}
    form = urlencode({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "token": token}).encode()
    introspect_headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}

    def raw(method: str, path: str, port: int, headers: dict[str, str], body: bytes | None) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}", "User-Agent: token-broker-bench"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")

    return {
        "broker": {
            "name": NAMES["broker"], "port": args.broker_port, "method": "GET", "path": VERIFY_PATH,
            "headers": verify_headers, "body": None, "expected_status": 204, "must_contain": None,
            "raw": raw("GET", VERIFY_PATH, args.broker_port, verify_headers, None),
        },
        "keycloak": {
            "name": NAMES["keycloak"], "port": args.keycloak_port, "method": "POST",
            "path": INTROSPECT_PATH, "headers": introspect_headers, "body": form, "expected_status": 200,
            "must_contain": b'"active":true',
            "raw": raw("POST", INTROSPECT_PATH, args.keycloak_port, introspect_headers, form),
        },
        # The framework floor: the same server and hooks (request id, access log, metrics, rate limiter),
        # no token work. What /verify could at best cost in this stack.
        "health": {
            "name": NAMES["health"], "port": args.broker_port, "method": "GET", "path": "/health",
            "headers": {"Accept": "*/*"}, "body": None, "expected_status": 200, "must_contain": None,
            "raw": raw("GET", "/health", args.broker_port, {"Accept": "*/*"}, None),
        },
    }


def preflight(target: dict[str, Any]) -> None:
    """One request through each client kind; it must be a success, or the run stops here."""
    status, headers, body = call(target["port"], target["method"], target["path"], target["body"], target["headers"])
    if target["name"] == NAMES["health"]:
        if status != 200:
            raise RuntimeError(f"/health answered {status}: {body[:300]!r}")
    elif target["name"] == NAMES["keycloak"]:
        active = json.loads(body).get("active") if status == 200 else None
        if active is not True:
            raise RuntimeError(f"introspection answered {status} active={active!r}: {body[:300]!r}")
        log(f"introspection sample: 200, \"active\": true, username={json.loads(body).get('username')!r}")
    else:
        if status != 204:
            raise RuntimeError(f"/verify answered {status}: {body[:300]!r}")
        log(f"/verify sample: 204, X-Auth-Username={headers.get('X-Auth-Username')!r}")
    raw = RawConnection(target["port"], target["raw"])
    try:
        raw_status, _ = raw.request()
    finally:
        raw.close()
    if raw_status != target["expected_status"]:
        raise RuntimeError(f"{target['name']}: the raw client got {raw_status}")


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    def first(command: list[str]) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=REPO)
            return (done.stdout + done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    cpu_model = "?"
    try:
        cpu_model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, cwd=REPO).stdout.strip().splitlines()
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "java": first(["java", "-version"]),
        "keycloak": (REPO / "keycloak.version").read_text().strip(),
        "kernel": platform.release(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "commit": first(["git", "rev-parse", "--short", "HEAD"]),
        "tracked_files_modified": len(dirty),
    }


def broker_settings(args: argparse.Namespace) -> int | str:
    """The gevent worker processes the broker runs with (its own default unless --workers sets it)."""
    try:
        sys.path.insert(0, str(REPO))
        from app.config import Settings

        workers = Settings.workers
    except Exception:  # noqa: BLE001 - only for the report
        workers = "default"
    return args.workers if args.workers is not None else workers


def _table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'target':<26}{'requests':>9}{'req/s':>8}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}{'errors':>7}"
              f"{'srv CPU ms/req':>15}{'gen CPU ms/req':>15}{'srv cores':>10}{'others':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['target']:<26}{r['requests']:>9}{r['throughput_rps']:>8.0f}{r['p50_ms']:>8.2f}{r['p90_ms']:>8.2f}"
              f"{r['p99_ms']:>8.2f}{r['errors']:>7}{r['server_cpu_ms_per_request']:>15.3f}"
              f"{r['generator_cpu_ms_per_request']:>15.3f}{r['server_cpu_cores']:>10.2f}{r['others_cpu_cores']:>8.2f}")
    for r in rows:
        if r["error_kinds"]:
            print(f"  errors of {r['target']}: {r['error_kinds']}")


def _ratio_lines(r: dict[str, float], indent: str = "") -> None:
    print(f"{indent}throughput broker/keycloak:           {r['throughput_broker_over_keycloak']:.2f}x")
    print(f"{indent}p50 latency keycloak/broker:          {r['p50_keycloak_over_broker']:.2f}x")
    print(f"{indent}server CPU per request keycloak/broker: {r['server_cpu_per_request_keycloak_over_broker']:.2f}x")
    if "throughput_health_over_verify" in r:
        print(f"{indent}framework floor: /health throughput / /verify: {r['throughput_health_over_verify']:.2f}x, "
              f"/verify CPU per request / /health: {r['server_cpu_per_request_verify_over_health']:.2f}x")


def print_report(report: dict[str, Any]) -> None:
    p, m = report["parameters"], report["machine"]
    print()
    print(f"machine: nproc={m['nproc']} (usable {m['usable_cpus']}), {m['cpu_model']}, kernel {m['kernel']}, "
          f"load average at start {m['load_average_at_start']}")
    print(f"software: Python {m['python']}, {m['java']}, Keycloak {m['keycloak']} (start-dev), "
          f"code {m['commit']} ({m['tracked_files_modified']} tracked files modified)")
    print(f"parameters: concurrency {p['concurrency']} keep-alive connections, warm-up {p['warmup_s']:g} s "
          f"(later rounds {p['later_warmup_s']:g} s), measured {p['duration_s']:g} s per target and round, "
          f"{p['rounds']} round(s), order {p['order']} (alternating), generator {p['generator_processes']} "
          f"processes ({p['client']} client), broker {p['broker_workers']} gevent worker(s)")
    print("columns: srv/gen CPU = CPU time per request of the server's processes / of the load generator; "
          "srv cores = the server's CPU use; others = CPU cores used by everything else on the machine meanwhile")
    if len(report["rounds"]) > 1:
        for i, rnd in enumerate(report["rounds"], 1):
            print()
            print(f"round {i} (order: {', '.join(rnd['order'])})")
            _table(rnd["results"])
            _ratio_lines(rnd["ratios"], "  ")
        print()
        print(f"all {len(report['rounds'])} rounds pooled")
    else:
        print()
    _table(report["results"])
    print()
    _ratio_lines(report["ratios"])
    if len(report["rounds"]) > 1:
        per_round = [f"{r['ratios']['throughput_broker_over_keycloak']:.2f}" for r in report["rounds"]]
        print(f"throughput ratio per round: {', '.join(per_round)}")
    if p["warmup_s"] < 30:
        print(f"note: Keycloak's JVM keeps getting faster for about 30 s of load; after {p['warmup_s']:g} s of warm-up "
              "its figures are low and the ratios flatter the broker (see docs/benchmarks.md); "
              "--warmup 30 or --rounds 3 give steady-state figures")
    reached = report["ratios"]["throughput_broker_over_keycloak"] >= 10
    print(f"goal: throughput ratio >= 10x -> {'reached' if reached else 'NOT reached'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure the broker's /verify against Keycloak's introspection at equal concurrency.")
    parser.add_argument("--concurrency", type=int, default=16, help="keep-alive connections per target (16)")
    parser.add_argument("--duration", type=float, default=10.0, help=f"measured seconds per target (10, max {MAX_DURATION:g})")
    parser.add_argument("--warmup", type=float, default=30.0,
                        help=f"warm-up seconds per target (30: the JVM keeps speeding up that long; max {MAX_WARMUP:g})")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="measured requests per target at most")
    parser.add_argument("--procs", type=int, default=max(2, os.cpu_count() or 2),
                        help="load generator processes (default: nproc, at least 2)")
    parser.add_argument("--client", choices=["raw", "http.client"], default="raw", help="generator's HTTP client")
    parser.add_argument("--order", choices=["broker-first", "keycloak-first"], default="broker-first",
                        help="which target goes first in round 1; later rounds alternate")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each target this many times, alternating the order (1, max 5)")
    parser.add_argument("--with-health", action="store_true",
                        help="also measure the broker's GET /health: the framework's floor, no token work")
    parser.add_argument("--workers", type=int, default=None,
                        help="BROKER_WORKERS (default: the broker's own; more than 1 needs BROKER_REDIS_URL)")
    parser.add_argument("--keycloak-port", type=int, default=28080)
    parser.add_argument("--management-port", type=int, default=29000)
    parser.add_argument("--broker-port", type=int, default=28000)
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--duration must be in (0, {MAX_DURATION:g}] seconds")
    if not 0 <= args.warmup <= MAX_WARMUP:
        parser.error(f"--warmup must be in [0, {MAX_WARMUP:g}] seconds")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        parser.error(f"--concurrency must be in [1, {MAX_CONCURRENCY}]")
    if not 1 <= args.max_requests <= MAX_REQUESTS:
        parser.error(f"--max-requests must be in [1, {MAX_REQUESTS}]")
    if not 1 <= args.rounds <= 5:
        parser.error("--rounds must be in [1, 5]")
    if not 1 <= args.procs <= 16:
        parser.error("--procs must be in [1, 16]")
    return args


def _terminate(signum, frame) -> None:  # noqa: ANN001
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    taken = [p for p in (args.keycloak_port, args.management_port, args.broker_port) if port_taken(p)]
    if taken:
        log(f"port(s) {taken} on {HOST} are already in use; stop what runs there or choose other ports")
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    machine = machine_info()
    workers = broker_settings(args)
    servers = Servers(args)
    shown = ["broker", "keycloak", "health"] if args.with_health else ["broker", "keycloak"]
    parts: dict[str, list[dict[str, Any]]] = {name: [] for name in shown}
    rounds: list[dict[str, Any]] = []
    try:
        kc_pgid = servers.start_keycloak()
        broker_pgid = servers.start_broker()
        broker_side = ["broker", "health"] if args.with_health else ["broker"]
        first = broker_side + ["keycloak"] if args.order == "broker-first" else ["keycloak"] + broker_side
        for number in range(args.rounds):
            order = first if number % 2 == 0 else first[::-1]
            for name in order:
                # A fresh token for each phase: tokens live 300 s, a phase at most 90 s.
                target = targets(args, login(args.broker_port))[name]
                preflight(target)
                warmup = args.warmup if not parts[name] else min(args.warmup, LATER_WARMUP)
                parts[name].append(measure(target, args, kc_pgid if name == "keycloak" else broker_pgid, warmup))
                r = summarize(target["name"], parts[name][-1:])
                log(f"{target['name']}: {r['throughput_rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, "
                    f"{r['errors']} errors")
            results = [summarize(NAMES[n], [parts[n][-1]]) for n in shown]
            rounds.append({"order": order, "results": results, "ratios": ratios(*results)})
    except KeyboardInterrupt:
        log("interrupted; stopping the servers")
        return 130
    except Exception as exc:  # noqa: BLE001 - report and clean up
        log(f"failed: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the clean-up finish
        servers.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    pooled = [summarize(NAMES[n], parts[n]) for n in shown]
    report = {
        "machine": machine,
        "parameters": {
            "concurrency": args.concurrency, "warmup_s": args.warmup, "later_warmup_s": min(args.warmup, LATER_WARMUP),
            "duration_s": args.duration, "rounds": args.rounds, "max_requests": args.max_requests,
            "generator_processes": min(args.procs, args.concurrency), "client": args.client, "order": args.order,
            "broker_workers": workers, "with_health": args.with_health,
            "command": " ".join([".venv/bin/python", "bench/verify_vs_introspection.py",
                                 *(sys.argv[1:] if argv is None else argv)]),
        },
        "rounds": rounds,
        "results": pooled,
        "ratios": ratios(*pooled),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
