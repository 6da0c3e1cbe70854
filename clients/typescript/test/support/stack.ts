/**
 * The real stack for the integration tests: Keycloak started by the project's scripts/keycloak.sh and the
 * broker under gunicorn, both on ports of their own (beside `make run` on 8080/8000 and the Python suites).
 *
 * Three brokers: one in body mode, one in cookie mode, and one whose Keycloak cannot be reached (its refresh
 * answers 503). The first two run without the broker's refresh coalescing (BROKER_REFRESH_COALESCING=false):
 * the client must be safe on its own, so a second refresh of one token reaches Keycloak, which ends the
 * session, and the test that let it happen fails.
 *
 * Ports (environment): TS_TEST_KEYCLOAK_PORT (30080), TS_TEST_KEYCLOAK_MANAGEMENT_PORT (30090),
 * TS_TEST_BROKER_PORT (30000), TS_TEST_BROKER_DOWN_PORT (30001), TS_TEST_BROKER_COOKIE_PORT (30002).
 * All below 32768, the start of Linux's ephemeral range: a port in it can be taken by any outgoing connection.
 * The broker's Python: TS_TEST_PYTHON (default <repo>/.venv/bin/python).
 */

import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { createWriteStream, existsSync, mkdtempSync, readFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export const CI = ["1", "true", "yes"].includes((process.env.CI ?? "").toLowerCase());

export const REPO = findRepo(dirname(fileURLToPath(import.meta.url)));
const KEYCLOAK_SCRIPT = join(REPO, "scripts", "keycloak.sh");
const KC_HTTP_PORT = port("TS_TEST_KEYCLOAK_PORT", 30080);
const KC_MANAGEMENT_PORT = port("TS_TEST_KEYCLOAK_MANAGEMENT_PORT", 30090);
const BROKER_PORT = port("TS_TEST_BROKER_PORT", 30000);
const BROKER_DOWN_PORT = port("TS_TEST_BROKER_DOWN_PORT", 30001);
const BROKER_COOKIE_PORT = port("TS_TEST_BROKER_COOKIE_PORT", 30002);
const PYTHON = process.env.TS_TEST_PYTHON || join(REPO, ".venv", "bin", "python");
export const CLIENT_SECRET = "token-broker-local-secret";

/** Keycloak could not be started (no Java, no distribution, ...): a skip locally, a failure under CI. */
export class KeycloakUnavailable extends Error {}

export interface Stack {
  keycloakUrl: string;
  /** The broker in body mode, talking to the test Keycloak. */
  brokerUrl: string;
  /** The broker in cookie mode (BROKER_TOKEN_TRANSPORT=cookie, CSRF header X-Requested-With). */
  brokerCookieUrl: string;
  /** A second broker whose Keycloak cannot be reached: its refresh answers 503 upstream_unavailable. */
  brokerDownUrl: string;
  stop(): Promise<void>;
}

const scriptEnv = { ...process.env, KC_HTTP_PORT: String(KC_HTTP_PORT), KC_MANAGEMENT_PORT: String(KC_MANAGEMENT_PORT) };
const brokers: ChildProcess[] = [];
let keycloakStarted = false;

/** Start Keycloak and the two brokers; throw KeycloakUnavailable or Error. Cleans up after itself on failure. */
export async function startStack(): Promise<Stack> {
  installExitCleanup();
  for (const p of [BROKER_PORT, BROKER_DOWN_PORT, BROKER_COOKIE_PORT]) {
    if (!(await portFree(p))) throw new Error(`port ${p} on 127.0.0.1 is taken; set TS_TEST_BROKER_PORT, TS_TEST_BROKER_DOWN_PORT, TS_TEST_BROKER_COOKIE_PORT`);
  }
  if (!existsSync(PYTHON)) throw new KeycloakUnavailable(`no Python for the broker at ${PYTHON} (run \`make install\`, or set TS_TEST_PYTHON)`);
  const started = await run(KEYCLOAK_SCRIPT, ["start"], scriptEnv, 600_000);
  keycloakStarted = true;
  if (started.code !== 0) {
    await stopKeycloak();
    throw new KeycloakUnavailable(`Keycloak could not start:\n${started.stderr.slice(-4000)}`);
  }
  const keycloakUrl = `http://127.0.0.1:${KC_HTTP_PORT}`;
  try {
    const strict = { BROKER_REFRESH_COALESCING: "false" };
    const started = await Promise.allSettled([
      startBroker(BROKER_PORT, keycloakUrl, strict),
      startBroker(BROKER_COOKIE_PORT, keycloakUrl, { ...strict, BROKER_TOKEN_TRANSPORT: "cookie" }),
      startBroker(BROKER_DOWN_PORT, `http://127.0.0.1:${await unusedPort()}`),
    ]);
    const [brokerUrl, brokerCookieUrl, brokerDownUrl] = started.map((r) => {
      if (r.status === "rejected") throw r.reason;
      return r.value;
    });
    return { keycloakUrl, brokerUrl: brokerUrl!, brokerCookieUrl: brokerCookieUrl!, brokerDownUrl: brokerDownUrl!, stop: stopAll };
  } catch (err) {
    await stopAll();
    throw err;
  }
}

async function startBroker(brokerPort: number, keycloakUrl: string, extraEnv: Record<string, string> = {}): Promise<string> {
  const logPath = join(mkdtempSync(join(tmpdir(), "token-broker-ts-")), "gunicorn.log");
  const log = createWriteStream(logPath);
  await new Promise((resolve) => log.once("open", resolve));
  const proc = spawn(PYTHON, ["-m", "gunicorn", "--config", "gunicorn.conf.py"], {
    cwd: REPO,
    detached: true, // its own process group, so stopping it stops its workers too
    stdio: ["ignore", log, log],
    env: {
      ...process.env,
      KEYCLOAK_URL: keycloakUrl,
      KEYCLOAK_REALM: "demo",
      KEYCLOAK_CLIENT_ID: "token-broker",
      KEYCLOAK_CLIENT_SECRET: CLIENT_SECRET,
      BROKER_BIND: `127.0.0.1:${brokerPort}`,
      // No leeway: a token expired by its `exp` is refused at once, so the tests see X-Token-Expired in seconds.
      BROKER_TOKEN_LEEWAY: "0",
      BROKER_UPSTREAM_RETRY_AFTER: "5",
      ...extraEnv,
    },
  });
  brokers.push(proc);
  const url = `http://127.0.0.1:${brokerPort}`;
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    if (proc.exitCode !== null) break;
    try {
      const health = await fetch(`${url}/health`, { signal: AbortSignal.timeout(1000) });
      if (health.ok) return url;
    } catch {
      // not listening yet
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  throw new Error(`the broker on ${url} did not start:\n${readFileSync(logPath, "utf8").slice(-4000)}`);
}

async function stopAll(): Promise<void> {
  await Promise.all(brokers.splice(0).map(stopProcessGroup));
  await stopKeycloak();
}

async function stopKeycloak(): Promise<void> {
  if (!keycloakStarted) return;
  keycloakStarted = false;
  await run(KEYCLOAK_SCRIPT, ["stop"], scriptEnv, 120_000);
}

async function stopProcessGroup(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null || proc.pid === undefined) return;
  const exited = new Promise((resolve) => proc.once("exit", resolve));
  process.kill(-proc.pid, "SIGTERM");
  const timer = setTimeout(() => proc.pid !== undefined && killGroup(proc.pid, "SIGKILL"), 30_000);
  await exited;
  clearTimeout(timer);
}

function killGroup(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pid, signal);
  } catch {
    // already gone
  }
}

/** If the test process ends early (a crash, Ctrl-C), stop what it started, synchronously. */
function installExitCleanup(): void {
  const cleanup = () => {
    for (const proc of brokers.splice(0)) if (proc.pid !== undefined && proc.exitCode === null) killGroup(proc.pid, "SIGTERM");
    if (keycloakStarted) {
      keycloakStarted = false;
      spawnSync(KEYCLOAK_SCRIPT, ["stop"], { env: scriptEnv, stdio: "ignore", timeout: 60_000 });
    }
  };
  process.once("exit", cleanup);
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    process.once(signal, () => {
      cleanup();
      process.exit(130);
    });
  }
}

function run(command: string, args: string[], env: NodeJS.ProcessEnv, timeoutMs: number): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve) => {
    const proc = spawn(command, args, { env, stdio: ["ignore", "ignore", "pipe"], timeout: timeoutMs });
    let stderr = "";
    proc.stderr!.on("data", (chunk: Buffer) => (stderr += chunk.toString("utf8")));
    proc.on("error", (err) => resolve({ code: 127, stderr: String(err) }));
    proc.on("close", (code) => resolve({ code: code ?? 1, stderr }));
  });
}

function portFree(p: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = createServer();
    server.once("error", () => resolve(false));
    server.listen(p, "127.0.0.1", () => server.close(() => resolve(true)));
  });
}

/** A port nothing listens on (bound once by us, then released). */
function unusedPort(): Promise<number> {
  return new Promise((resolve) => {
    const server = createServer();
    server.listen(0, "127.0.0.1", () => {
      const { port: p } = server.address() as { port: number };
      server.close(() => resolve(p));
    });
  });
}

function port(name: string, fallback: number): number {
  const raw = process.env[name];
  if (!raw) return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 1 || value > 65535) throw new Error(`${name} must be a port number, not ${raw}`);
  return value;
}

function findRepo(start: string): string {
  for (let dir = start; ; dir = dirname(dir)) {
    if (existsSync(join(dir, "scripts", "keycloak.sh")) && existsSync(join(dir, "gunicorn.conf.py"))) return dir;
    if (dirname(dir) === dir) throw new Error(`no repository root (scripts/keycloak.sh) above ${start}`);
  }
}
