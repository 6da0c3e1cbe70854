"""The core (app/*.py outside app/web/) is plain Python: it imports, builds and refreshes with Flask absent."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import app

ROOT = Path(__file__).resolve().parents[2]
CORE = sorted(f"app.{m.name}" for m in pkgutil.iter_modules(app.__path__) if not m.ispkg)
WEB_ONLY = ("flask", "werkzeug", "flask_cors", "flask_limiter", "marshmallow", "apispec")

PROGRAM = f"""
import sys
for name in {WEB_ONLY!r}:
    sys.modules[name] = None  # any import of these now raises ImportError
import importlib
for module in {CORE!r}:
    importlib.import_module(module)
from app.broker import Broker
from app.config import Settings
from app.errors import RefreshRejected
from app.keycloak_client import TokenSet

class Keycloak:
    def refresh(self, token, scope=None):
        if token == "spent":
            raise RefreshRejected("Session has ended")
        return TokenSet(access_token="at", token_type="Bearer", refresh_token="rt2")

broker = Broker.build(Settings(client_secret="s"))
refresher = type(broker.refresher)(Keycloak().refresh, grace=5, wait=2)
print(refresher.refresh("rt").refresh_token)
try:
    refresher.refresh("spent")
except RefreshRejected as exc:
    print(exc.status, exc.error, exc.message)
"""


def test_the_core_modules_are_found():
    """The list the next test imports holds the core modules (so a new one is covered without listing it)."""
    assert {"app.config", "app.errors", "app.keycloak_client", "app.refresh_coalescing", "app.broker"} <= set(CORE)
    assert not [m for m in CORE if m.startswith("app.web")]


def test_the_core_runs_without_flask():
    """With Flask, werkzeug, marshmallow and the Flask extensions unimportable, the core still builds and refreshes."""
    run = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout, run.stderr) == (0, "rt2\n400 invalid_grant Session has ended\n", "")


def test_a_broker_without_redis_or_audit_sinks_loads_neither_redis_py_nor_requests():
    """redis-py and requests (with urllib3) are imported only by the parts that use them: about 13 MiB of every
    worker's memory that the default configuration does not need (docs/benchmarks.md, P6)."""
    program = (
        "import sys\n"
        "from app import create_app\n"
        "from app.config import Settings\n"
        "create_app(Settings(client_secret='s'))\n"
        "print(sorted(m for m in ('redis', 'requests', 'urllib3') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout, run.stderr) == (0, "[]\n", "")
