"""Benchmark: N concurrent identical refreshes → how many refresh grants Keycloak performed.

Starts its own clean Keycloak (scripts/keycloak.sh on ports 28180/29100), a real redis-server, and
three brokers under gunicorn: one worker with coalescing, three workers coalescing through Redis, and one
worker with coalescing switched off. For each, it logs a fresh user in, fires N refreshes of the same
refresh token at the same moment (each on its own connection), and prints the answers the clients got,
the refresh grants Keycloak recorded (from its event store) and whether the session survived.

Usage: .venv/bin/python bench/coalescing.py [--parallel 20] [--rounds 3]   (after `make install`)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from keycloak import KeycloakAdmin

REPO = Path(__file__).resolve().parents[1]
KC_PORT, KC_MGMT, REDIS_PORT, FIRST_BROKER_PORT = 28180, 29100, 28379, 28101


def wait_for(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


def start_broker(port: int, logs: Path, **env: str) -> subprocess.Popen:
    environment = {**os.environ, "KEYCLOAK_URL": f"http://127.0.0.1:{KC_PORT}",
                   "KEYCLOAK_CLIENT_SECRET": "token-broker-local-secret", "BROKER_BIND": f"127.0.0.1:{port}",
                   "BROKER_RATE_LIMITS_ENABLED": "false", **env}
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py"], cwd=REPO,
                               env=environment, stdout=open(logs / f"broker-{port}.log", "wb"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(f"http://127.0.0.1:{port}/health")
    return process


def refresh_events(admin: KeycloakAdmin, since_ms: int) -> Counter:
    events = admin.get_events(query={"type": ["REFRESH_TOKEN", "REFRESH_TOKEN_ERROR"], "max": 100000})
    return Counter(e["type"] for e in events if e["time"] >= since_ms)


def one_round(url: str, admin: KeycloakAdmin, parallel: int) -> dict:
    username, password = f"bench-{uuid.uuid4().hex[:8]}", "bench-password"
    user_id = admin.create_user({"username": username, "enabled": True, "email": f"{username}@example.com",
                                 "emailVerified": True, "firstName": "Bench", "lastName": "User",
                                 "credentials": [{"type": "password", "value": password, "temporary": False}]})
    try:
        login = requests.post(f"{url}/api/auth/login", json={"username": username, "password": password}, timeout=30)
        refresh_token = login.json()["token"]["refresh_token"]
        barrier = threading.Barrier(parallel)

        def one(_):
            with requests.Session() as http:
                barrier.wait()
                return http.post(f"{url}/api/auth/refresh-token", json={"refresh_token": refresh_token}, timeout=60)

        started_ms = int(time.time() * 1000)
        began = time.perf_counter()
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            answers = list(pool.map(one, range(parallel)))
        elapsed = time.perf_counter() - began
        time.sleep(0.3)
        events = refresh_events(admin, started_ms)
        newest = [a.json()["token"]["refresh_token"] for a in answers if a.status_code == 200]
        survived = bool(newest) and requests.post(f"{url}/api/auth/refresh-token",
                                                  json={"refresh_token": newest[0]}, timeout=30).status_code == 200
        return {"statuses": Counter(a.status_code for a in answers), "grants": events["REFRESH_TOKEN"],
                "refused": events["REFRESH_TOKEN_ERROR"], "distinct": len({a.text for a in answers}),
                "survived": survived, "seconds": elapsed}
    finally:
        admin.delete_user(user_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    kc_env = {**os.environ, "KC_HTTP_PORT": str(KC_PORT), "KC_MANAGEMENT_PORT": str(KC_MGMT)}
    logs = Path(tempfile.mkdtemp(prefix="coalescing-bench-"))
    processes: list[subprocess.Popen] = []
    try:
        subprocess.run([str(REPO / "scripts" / "keycloak.sh"), "start"], env=kc_env, check=True)
        redis_server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(REDIS_PORT),
                                         "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                                        stdout=subprocess.DEVNULL, start_new_session=True)
        processes.append(redis_server)
        admin = KeycloakAdmin(server_url=f"http://127.0.0.1:{KC_PORT}/", username="admin", password="admin",
                              realm_name="demo", user_realm_name="master")
        setups = [
            ("1 worker, coalescing", dict(BROKER_WORKERS="1")),
            ("3 workers, coalescing via Redis", dict(BROKER_WORKERS="3",
                                                     BROKER_REDIS_URL=f"redis://127.0.0.1:{REDIS_PORT}/0")),
            ("1 worker, coalescing off", dict(BROKER_WORKERS="1",
                                              BROKER_REFRESH_COALESCING="false")),
        ]
        print(f"{args.parallel} concurrent refreshes of one refresh token, {args.rounds} rounds per setup; "
              f"Keycloak {(REPO / 'keycloak.version').read_text().strip()}, rotation on (refreshTokenMaxReuse 0), "
              f"{os.cpu_count()} CPUs")
        print(f"{'setup':34s} {'round':>5s} {'200s':>5s} {'400s':>5s} {'distinct':>8s} {'KC grants':>9s} "
              f"{'KC refused':>10s} {'session':>8s} {'seconds':>7s}")
        for index, (name, env) in enumerate(setups):
            broker = start_broker(FIRST_BROKER_PORT + index, logs, **env)
            processes.append(broker)
            for round_ in range(1, args.rounds + 1):
                r = one_round(f"http://127.0.0.1:{FIRST_BROKER_PORT + index}", admin, args.parallel)
                print(f"{name:34s} {round_:5d} {r['statuses'][200]:5d} {r['statuses'][400]:5d} {r['distinct']:8d} "
                      f"{r['grants']:9d} {r['refused']:10d} {'alive' if r['survived'] else 'ENDED':>8s} "
                      f"{r['seconds']:7.2f}")
    finally:
        for process in processes:  # each runs in a process group of its own
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        subprocess.run([str(REPO / "scripts" / "keycloak.sh"), "stop"], env=kc_env)


if __name__ == "__main__":
    main()
