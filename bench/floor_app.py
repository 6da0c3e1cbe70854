"""The floor of `make bench`: a minimal Flask app, served by the broker's own gunicorn settings.

`bench/run.py` starts it with `gunicorn --config gunicorn.conf.py bench.floor_app:app` (the same worker class,
worker count, keep-alive and logging as the broker) and measures GET /health. Whatever the broker spends per
request beyond this is its own work: hooks, routing, token checks.
"""

from flask import Flask, jsonify

app = Flask(__name__)


@app.get("/health")
def health():  # noqa: ANN201 - Flask's return
    return jsonify(status="ok")
