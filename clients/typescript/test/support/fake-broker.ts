/**
 * A tiny stand-in for the broker on 127.0.0.1, for what the real stack cannot produce on demand: a 503 or
 * a dropped connection from refresh, a hanging refresh, tokens that expire in a second, cookie mode.
 * It rotates refresh tokens like the shipped realm: a refresh token works once, and a second use ends the
 * session (so a test that refreshes twice with one token finds out), unless it comes within `graceMs`
 * of the first: then it gets the first one's answer, as the real broker's refresh coalescing gives it.
 */

import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

import type { BrokerTokenResponse } from "../../src/index.js";

export type Behaviour =
  | "ok"
  | "destroy" // close the connection without an answer: a network error
  | "hang" // never answer: a timeout
  | { status: number; body?: unknown; headers?: Record<string, string>; delayMs?: number };

export interface Call {
  method: string;
  path: string;
  headers: IncomingMessage["headers"];
  body: string;
}

interface Session {
  alive: boolean;
}

export class FakeBroker {
  url = "";
  readonly calls: Call[] = [];
  /** What POST /api/auth/login does. */
  login: Behaviour = "ok";
  /** What POST /api/auth/refresh-token does. */
  refresh: Behaviour = "ok";
  /** What POST /api/auth/logout does. */
  logout: Behaviour = "ok";
  /** expires_in of the tokens it issues, in seconds (fractions allowed). */
  expiresIn = 300;
  /** How long a successful refresh takes, so concurrent callers overlap. */
  refreshDelayMs = 30;
  /** The broker's coalescing grace: a spent refresh token presented again this soon gets the same answer. 0: off. */
  graceMs = 0;
  /** Cookie mode: login, refresh and logout need the CSRF header; refresh and logout take no refresh_token; none is answered. */
  cookieMode = false;
  csrfHeader = { name: "x-requested-with", value: "XMLHttpRequest" };

  private server: Server | undefined;
  private readonly watchers: (() => void)[] = [];
  private readonly accessTokens = new Map<string, { expiresAt: number; session: Session }>();
  private readonly refreshTokens = new Map<string, { used: boolean; session: Session; answer?: { usedAt: number; token: BrokerTokenResponse } }>();
  private cookieToken: { rt: string } | undefined;
  private counter = 0;

  async start(): Promise<this> {
    this.server = createServer((req, res) => void this.handle(req, res));
    await new Promise<void>((resolve) => this.server!.listen(0, "127.0.0.1", resolve));
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
    return this;
  }

  async stop(): Promise<void> {
    this.server?.closeAllConnections();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
  }

  /** A fresh session's token object, as login would answer it. */
  issue(session: Session = { alive: true }): BrokerTokenResponse {
    const n = ++this.counter;
    const access = `at-${n}`;
    const refresh = `rt-${n}`;
    this.accessTokens.set(access, { expiresAt: Date.now() + this.expiresIn * 1000, session });
    this.refreshTokens.set(refresh, { used: false, session });
    const token: BrokerTokenResponse = {
      access_token: access,
      expires_in: this.expiresIn,
      refresh_expires_in: 1800,
      token_type: "Bearer",
      scope: "openid",
    };
    if (this.cookieMode) this.cookieToken = { rt: refresh };
    else token.refresh_token = refresh;
    return token;
  }

  count(path: string, method = "POST"): number {
    return this.calls.filter((c) => c.path === path && c.method === method).length;
  }

  refreshCount(): number {
    return this.count("/api/auth/refresh-token");
  }

  /** Resolves once `n` refresh calls have arrived in all (this waits on the calls, not on a clock). */
  async refreshed(n: number): Promise<void> {
    while (this.refreshCount() < n) await new Promise<void>((resolve) => this.watchers.push(resolve));
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const chunk of req) chunks.push(chunk as Buffer);
    const body = Buffer.concat(chunks).toString("utf8");
    const path = new URL(req.url ?? "/", "http://x").pathname;
    const call: Call = { method: req.method ?? "", path, headers: req.headers, body };
    this.calls.push(call);
    for (const w of this.watchers.splice(0)) w();
    const route = `${call.method} ${path}`;
    if (route === "POST /api/auth/login") {
      return this.answer(req, res, this.login, () => {
        if (!this.csrfFailed(call, res)) this.json(res, 200, { message: "Login successful", token: this.issue() });
      });
    }
    if (route === "POST /api/auth/refresh-token") return this.answer(req, res, this.refresh, () => this.doRefresh(call, res));
    if (route === "POST /api/auth/logout") return this.answer(req, res, this.logout, () => this.doLogout(call, res));
    if (path.startsWith("/api/data")) return this.protectedRoute(call, res);
    return this.json(res, 404, { error: "not_found", message: "No such route" });
  }

  private async answer(req: IncomingMessage, res: ServerResponse, behaviour: Behaviour, ok: () => Promise<void> | void): Promise<void> {
    if (behaviour === "destroy") {
      req.socket.destroy();
      return;
    }
    if (behaviour === "hang") return;
    if (behaviour === "ok") return ok();
    if (behaviour.delayMs) await sleep(behaviour.delayMs);
    this.json(res, behaviour.status, behaviour.body ?? {}, behaviour.headers);
  }

  private csrfFailed(call: Call, res: ServerResponse): boolean {
    if (!this.cookieMode || call.headers[this.csrfHeader.name.toLowerCase()] === this.csrfHeader.value) return false;
    this.json(res, 403, { error: "csrf_failed", message: "The request lacks the CSRF proof" });
    return true;
  }

  private async doRefresh(call: Call, res: ServerResponse): Promise<void> {
    if (this.csrfFailed(call, res)) return;
    const sent = this.cookieMode ? this.cookieToken?.rt : (JSON.parse(call.body || "{}") as { refresh_token?: string }).refresh_token;
    if (!sent) return this.json(res, 400, { error: "refresh_token_required", message: "Refresh token is required" });
    await sleep(this.refreshDelayMs);
    const known = this.refreshTokens.get(sent);
    if (!known || !known.session.alive) return this.json(res, 400, { error: "invalid_grant", message: "Session has ended" });
    if (known.used && known.answer && Date.now() - known.answer.usedAt <= this.graceMs) {
      return this.json(res, 200, { message: "Token refreshed successfully", token: known.answer.token });
    }
    if (known.used) {
      known.session.alive = false; // rotation: reuse ends the session, as Keycloak does
      return this.json(res, 400, { error: "invalid_grant", message: "Refresh token was already used; the session has been ended" });
    }
    known.used = true;
    known.answer = { usedAt: Date.now(), token: this.issue(known.session) };
    this.json(res, 200, { message: "Token refreshed successfully", token: known.answer.token });
  }

  private doLogout(call: Call, res: ServerResponse): void {
    if (this.csrfFailed(call, res)) return;
    const sent = this.cookieMode ? this.cookieToken?.rt : (JSON.parse(call.body || "{}") as { refresh_token?: string }).refresh_token;
    if (!sent) return this.json(res, 400, { error: "refresh_token_required", message: "Refresh token is required" });
    const known = this.refreshTokens.get(sent);
    if (known) known.session.alive = false;
    this.cookieToken = undefined;
    this.json(res, 200, { message: "Logged out successfully" });
  }

  private protectedRoute(call: Call, res: ServerResponse): void {
    const [scheme, token] = (call.headers.authorization ?? "").split(" ");
    if (scheme !== "Bearer" || !token) {
      return this.json(res, 401, { error: "access_token_required", message: "An access token is required" }, {
        "WWW-Authenticate": 'Bearer realm="token-broker"',
      });
    }
    const known = this.accessTokens.get(token);
    if (!known || !known.session.alive) {
      return this.json(res, 401, { error: "invalid_token", message: "Invalid access token" }, {
        "WWW-Authenticate": 'Bearer realm="token-broker", error="invalid_token"',
      });
    }
    if (known.expiresAt <= Date.now()) {
      return this.json(res, 401, { error: "invalid_token", message: "Access token expired" }, {
        "WWW-Authenticate": 'Bearer realm="token-broker", error="invalid_token"',
        "X-Token-Expired": "true",
      });
    }
    this.json(res, 200, { ok: true, token, method: call.method, body: call.body });
  }

  private json(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
    res.writeHead(status, { "Content-Type": "application/json", "Cache-Control": "no-store", ...headers });
    res.end(JSON.stringify(body));
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A fetch that records what the client sends (requests as the client built them) and what came back. */
export function recordingFetch(): {
  fetch: (input: Request | string | URL, init?: RequestInit) => Promise<Response>;
  requests: Request[];
  statuses: { path: string; status: number }[];
  count: (path: string) => number;
} {
  const requests: Request[] = [];
  const statuses: { path: string; status: number }[] = [];
  return {
    requests,
    statuses,
    count: (path) => requests.filter((r) => new URL(r.url).pathname === path).length,
    fetch: async (input, init) => {
      const request = input instanceof Request && !init ? input : new Request(input, init);
      requests.push(request.clone());
      const response = await fetch(request);
      statuses.push({ path: new URL(request.url).pathname, status: response.status });
      return response;
    },
  };
}
