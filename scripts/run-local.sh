#!/usr/bin/env bash
# Bring up a local Keycloak with the shipped realm and the broker under gunicorn; Ctrl-C stops both.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"

export KEYCLOAK_URL="${KEYCLOAK_URL:-http://127.0.0.1:8080}"
export KEYCLOAK_REALM="${KEYCLOAK_REALM:-demo}"
export KEYCLOAK_CLIENT_ID="${KEYCLOAK_CLIENT_ID:-token-broker}"
# The shipped realm's secret is for local runs only; production reads KEYCLOAK_CLIENT_SECRET(_FILE).
if [[ -z "${KEYCLOAK_CLIENT_SECRET:-}" && -z "${KEYCLOAK_CLIENT_SECRET_FILE:-}" ]]; then
  export KEYCLOAK_CLIENT_SECRET="token-broker-local-secret"
fi
export BROKER_BIND="${BROKER_BIND:-127.0.0.1:8000}"
# The local setup lets people sign up (POST /api/auth/register); the broker's default is off.
export BROKER_REGISTRATION="${BROKER_REGISTRATION:-true}"

if scripts/keycloak.sh status; then
  echo "run-local.sh: a Keycloak is already running on $KEYCLOAK_URL; using it (and leaving it running)" >&2
else
  scripts/keycloak.sh start
  trap 'scripts/keycloak.sh stop' EXIT
fi

B="http://$BROKER_BIND"
cat <<MSG

Keycloak: $KEYCLOAK_URL (admin console: $KEYCLOAK_URL/admin, admin / admin)
Broker:   $B  (Ctrl-C stops the broker, and Keycloak if this script started it)

Try it (README.md has more):
  curl -s $B/api/auth/login -H 'Content-Type: application/json' -d '{"username":"alice","password":"alice-password"}'
  curl -s $B/api/auth/refresh-token -d refresh_token=PASTE_THE_REFRESH_TOKEN
  curl -s $B/api/auth/logout -d refresh_token=PASTE_THE_REFRESH_TOKEN

MSG
"$PYTHON" -m gunicorn --config gunicorn.conf.py
