#!/usr/bin/env bash
# Fetch, start, stop and probe a local Keycloak (no containers) with the shipped realm imported.
#
#   scripts/keycloak.sh fetch    download the server distribution with Maven (cached outside git)
#   scripts/keycloak.sh start    unpack a clean server, import keycloak-realm.json, start, wait until ready
#   scripts/keycloak.sh stop     stop the server started by `start` (by its own PID)
#   scripts/keycloak.sh status   exit 0 when the server answers ready, 1 otherwise
#
# Settings (environment):
#   KC_HTTP_PORT (8080)  KC_MANAGEMENT_PORT (9000)  KC_STATE_DIR (<repo>/.run/keycloak-<port>)
#   KC_CACHE_DIR (~/.cache/token-broker)  KC_START_TIMEOUT seconds (240)
# The Keycloak version lives in keycloak.version at the repository root, and nowhere else.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KC_VERSION="$(tr -d '[:space:]' < "$REPO/keycloak.version")"
DEPENDENCY_PLUGIN="org.apache.maven.plugins:maven-dependency-plugin:3.11.0"
KC_HTTP_PORT="${KC_HTTP_PORT:-8080}"
KC_MANAGEMENT_PORT="${KC_MANAGEMENT_PORT:-9000}"
KC_CACHE_DIR="${KC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/token-broker}"
KC_STATE_DIR="${KC_STATE_DIR:-$REPO/.run/keycloak-$KC_HTTP_PORT}"
KC_START_TIMEOUT="${KC_START_TIMEOUT:-240}"
KC_REALM="${KC_REALM:-demo}"

ZIP="$KC_CACHE_DIR/keycloak-quarkus-dist-$KC_VERSION.zip"
HOME_DIR="$KC_STATE_DIR/keycloak-$KC_VERSION"
PID_FILE="$KC_STATE_DIR/keycloak.pid"
LOG_FILE="$KC_STATE_DIR/keycloak.log"
BASE_URL="http://127.0.0.1:$KC_HTTP_PORT"

log() { printf 'keycloak.sh: %s\n' "$*" >&2; }

fetch() {
  if [[ -s "$ZIP" ]]; then
    return 0
  fi
  mkdir -p "$KC_CACHE_DIR"
  log "fetching org.keycloak:keycloak-quarkus-dist:$KC_VERSION:zip with Maven into $KC_CACHE_DIR"
  mvn -B -q "$DEPENDENCY_PLUGIN:copy" \
    "-Dartifact=org.keycloak:keycloak-quarkus-dist:$KC_VERSION:zip" \
    "-DoutputDirectory=$KC_CACHE_DIR"
  [[ -s "$ZIP" ]] || { log "Maven finished but $ZIP is missing"; exit 1; }
}

running_pid() {
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(cat "$PID_FILE")"
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

ready() {
  curl -fs -o /dev/null --max-time 2 "http://127.0.0.1:$KC_MANAGEMENT_PORT/health/ready" &&
    curl -fs -o /dev/null --max-time 2 "$BASE_URL/realms/$KC_REALM/.well-known/openid-configuration"
}

port_busy() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start() {
  if pid="$(running_pid)"; then
    log "already running (pid $pid); waiting until ready"
    wait_ready
    return
  fi
  for port in "$KC_HTTP_PORT" "$KC_MANAGEMENT_PORT"; do
    if port_busy "$port"; then
      log "port $port on 127.0.0.1 is already taken by another process; stop it or set KC_HTTP_PORT/KC_MANAGEMENT_PORT"
      exit 1
    fi
  done
  command -v java >/dev/null || { log "java is not installed (Keycloak $KC_VERSION needs Java 17 or newer)"; exit 1; }
  fetch
  # A clean server every time: unpack afresh so no realm, user or session survives from an earlier run.
  rm -rf "$HOME_DIR"
  mkdir -p "$KC_STATE_DIR"
  unzip -q "$ZIP" -d "$KC_STATE_DIR"
  mkdir -p "$HOME_DIR/data/import"
  # --import-realm takes the realm name from the file name; keep it "<realm>-realm.json".
  cp "$REPO/keycloak-realm.json" "$HOME_DIR/data/import/$KC_REALM-realm.json"
  log "starting Keycloak $KC_VERSION on $BASE_URL (management on port $KC_MANAGEMENT_PORT), log in $LOG_FILE"
  KC_BOOTSTRAP_ADMIN_USERNAME="${KC_BOOTSTRAP_ADMIN_USERNAME:-admin}" \
  KC_BOOTSTRAP_ADMIN_PASSWORD="${KC_BOOTSTRAP_ADMIN_PASSWORD:-admin}" \
    setsid "$HOME_DIR/bin/kc.sh" start-dev \
      --http-host=127.0.0.1 --http-port="$KC_HTTP_PORT" \
      --http-management-port="$KC_MANAGEMENT_PORT" \
      --health-enabled=true --import-realm \
      </dev/null >"$LOG_FILE" 2>&1 &
  echo $! > "$PID_FILE"
  wait_ready
}

wait_ready() {
  local deadline=$((SECONDS + KC_START_TIMEOUT))
  while ((SECONDS < deadline)); do
    if ready; then
      log "ready at $BASE_URL/realms/$KC_REALM"
      return 0
    fi
    if ! running_pid >/dev/null; then
      log "Keycloak exited during start-up; last lines of $LOG_FILE:"
      tail -n 40 "$LOG_FILE" >&2 || true
      exit 1
    fi
    sleep 1
  done
  log "Keycloak was not ready after ${KC_START_TIMEOUT}s; last lines of $LOG_FILE:"
  tail -n 40 "$LOG_FILE" >&2 || true
  exit 1
}

stop() {
  local pid
  if ! pid="$(running_pid)"; then
    log "not running"
    rm -f "$PID_FILE"
    return 0
  fi
  # setsid made the server its own process group: signal the whole group (kc.sh and its java).
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$PID_FILE"; log "stopped"; return 0; }
    sleep 0.5
  done
  log "did not stop within 30s; killing"
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  rm -f "$PID_FILE"
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  status) ready ;;
  *) echo "usage: $0 fetch|start|stop|status" >&2; exit 2 ;;
esac
