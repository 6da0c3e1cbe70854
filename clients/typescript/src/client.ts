/**
 * AuthClient: `fetch` with the broker's access token attached, refreshed once when it is rejected or about
 * to expire, shared across tabs, and a session that ends only when the broker says the refresh token is dead.
 */

import { createCoordinator, localCoordinator, unrefTimer, type CrossTabOptions, type PeerEvent, type RefreshCoordinator } from "./coordination.js";
import { AuthError, AuthRequestError, RetryableAuthError, SessionExpiredError } from "./errors.js";
import { fingerprint, fromTokenResponse, isStoredTokens, memoryStorage, type BrokerTokenResponse, type StoredTokens, type TokenStorage } from "./tokens.js";

export type FetchLike = (input: Request, init?: RequestInit) => Promise<Response>;

/** Where the refresh token travels (the broker's token transport modes). */
export type TokenTransport = "body" | "cookie";

export interface AuthClientOptions {
  /** The broker's origin (and path prefix, if any); default `location.origin` in a browser. */
  baseUrl?: string;
  /** The broker's auth routes, resolved against baseUrl. Default "/api/auth". */
  authPath?: string;
  /**
   * "body" (default): refresh posts `{"refresh_token": ...}` from storage.
   * "cookie": the refresh token is an HttpOnly cookie; login, refresh and logout go with
   * `credentials: "include"` and the CSRF header, refresh and logout post `{}`, and JavaScript never
   * sees the refresh token.
   */
  transport?: TokenTransport;
  /** Cookie mode's CSRF proof, sent on login, refresh and logout. Default `X-Requested-With: XMLHttpRequest`. */
  csrfHeader?: { name: string; value: string };
  /** The fetch to use for everything (the API requests and the broker's routes). Default the global fetch. */
  fetch?: (input: Request | string | URL, init?: RequestInit) => Promise<Response>;
  /** Where tokens live. Default memoryStorage(). */
  storage?: TokenStorage;
  /** Refresh shortly before the access token expires, so most requests never see a 401. Default true. */
  proactiveRefresh?: boolean;
  /** How long before expiry to refresh (capped at a third of the token's lifetime). Default 30 000 ms. */
  refreshLeadMs?: number;
  /** A random extra lead so tabs and users do not refresh in lockstep (capped at a tenth of the lifetime). Default 10 000 ms. */
  refreshJitterMs?: number;
  /**
   * After a retryable failure of a proactive refresh, try again after this (doubling, at most 60 s) unless
   * Retry-After says. Default 1 000 ms: a first retry inside the broker's coalescing grace (5 s) gets the
   * answer of a refresh whose response was lost on the way, instead of a spent token.
   */
  retryDelayMs?: number;
  /** Timeout of each call to login, refresh-token and logout. Default 10 000 ms. */
  requestTimeoutMs?: number;
  /**
   * Coordinate refreshes with the other tabs of this browser: true (Web Locks or BroadcastChannel, whichever
   * the browser has), false (this client alone), options, or your own RefreshCoordinator. Default: true in a
   * browser page, false elsewhere (in a server, clients of different users must never share tokens).
   */
  crossTab?: boolean | CrossTabOptions | RefreshCoordinator;
  /** Which requests get the access token. Default: those to baseUrl's origin. */
  shouldAttachToken?: (url: URL) => boolean;
  /** The session ended: the broker refused the refresh token (here or in another tab). Send the user to log in. */
  onSessionExpired?: (error: SessionExpiredError) => void;
  /** logout() ran in this tab or another one. */
  onLogout?: () => void;
  /** The tokens changed (login, refresh, logout, expiry, another tab). null: none any more. */
  onTokens?: (tokens: StoredTokens | null) => void;
}

const SESSION_OVER = new Set(["invalid_grant", "refresh_token_required", "location_blocked"]);
const RETRYABLE_STATUS = new Set([408, 425, 429]);
const MAX_TIMER_MS = 2 ** 31 - 1;
const MAX_RETRY_DELAY_MS = 60_000;

export class AuthClient {
  private readonly fetchImpl: FetchLike;
  private readonly storage: TokenStorage;
  private readonly baseUrl: URL;
  private readonly authBase: string;
  private readonly transport: TokenTransport;
  private readonly csrf: { name: string; value: string };
  private readonly proactive: boolean;
  private readonly leadMs: number;
  private readonly jitterMs: number;
  private readonly retryDelayMs: number;
  private readonly timeoutMs: number;
  private readonly coordinator: RefreshCoordinator;
  private readonly ownsCoordinator: boolean;
  private readonly unsubscribe: () => void;
  private readonly attach: (url: URL) => boolean;
  private readonly options: AuthClientOptions;
  /** The refresh this tab is doing or waiting for: every caller that needs the same one gets this promise. */
  private inflight: { key: string; promise: Promise<StoredTokens> } | null = null;
  private readonly logins = new Map<string, Promise<StoredTokens>>();
  /** Bumped by every login and logout: a refresh that finishes in another epoch belongs to a session that is gone. */
  private epoch = 0;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private closed = false;

  constructor(options: AuthClientOptions = {}) {
    this.options = options;
    const base = options.baseUrl ?? (globalThis as { location?: { origin?: string } }).location?.origin;
    if (!base) throw new TypeError("AuthClient needs baseUrl outside a browser page");
    this.baseUrl = new URL(base);
    this.authBase = (options.authPath ?? "/api/auth").replace(/\/+$/, "");
    const f = options.fetch ?? globalThis.fetch;
    // Browsers refuse a fetch called with another `this` ("Illegal invocation").
    this.fetchImpl = (input, init) => f.call(globalThis, input, init);
    this.storage = options.storage ?? memoryStorage();
    this.transport = options.transport ?? "body";
    this.csrf = options.csrfHeader ?? { name: "X-Requested-With", value: "XMLHttpRequest" };
    this.proactive = options.proactiveRefresh ?? true;
    this.leadMs = options.refreshLeadMs ?? 30_000;
    this.jitterMs = options.refreshJitterMs ?? 10_000;
    this.retryDelayMs = options.retryDelayMs ?? 1_000;
    this.timeoutMs = options.requestTimeoutMs ?? 10_000;
    const origin = this.baseUrl.origin;
    this.attach = options.shouldAttachToken ?? ((url) => url.origin === origin);
    const crossTab = options.crossTab ?? typeof (globalThis as { document?: unknown }).document !== "undefined";
    if (isCoordinator(crossTab)) {
      this.coordinator = crossTab;
      this.ownsCoordinator = false;
    } else {
      this.coordinator =
        crossTab === false ? localCoordinator() : createCoordinator(crossTab === true ? {} : crossTab, this.timeoutMs + 5_000);
      this.ownsCoordinator = true;
    }
    this.unsubscribe = this.coordinator.subscribe((event) => this.onPeer(event));
    this.schedule(this.storage.get());
  }

  /**
   * fetch with the access token: on a 401 for an expired or invalid access token, refresh once (shared by
   * every request and tab that needs it) and retry the request once. Rejects with SessionExpiredError
   * when the session is over and RetryableAuthError when the refresh could not be done now; answers
   * (including a second 401) are returned as they are. Bodies are replayed on the retry, so a stream
   * body is buffered.
   */
  readonly fetch = async (input: RequestInfo | URL, init?: RequestInit): Promise<Response> => {
    const request = this.toRequest(input, init);
    if (request.headers.has("Authorization") || !this.attach(new URL(request.url))) return this.fetchImpl(request);
    let tokens = this.storage.get();
    if (tokens && this.expired(tokens) && this.canRefresh(tokens)) {
      tokens = await abortable(this.refreshFrom(tokens), request.signal);
    }
    const response = await this.send(request, tokens);
    if (!tokens || !(await rejectsAccessToken(response))) return response;
    let fresh: StoredTokens;
    try {
      const current = this.storage.get();
      if (current && current.accessToken !== tokens.accessToken) fresh = current; // refreshed meanwhile
      else if (current && this.canRefresh(current)) fresh = await abortable(this.refreshFrom(current), request.signal);
      else return response;
    } catch (err) {
      await discard(response);
      throw err;
    }
    await discard(response);
    return this.send(request, fresh);
  };

  /** Log in with the broker. Identical concurrent attempts share one request: Keycloak refuses parallel logins of one user. */
  login(username: string, password: string, options: { scope?: string } = {}): Promise<StoredTokens> {
    // The same attempt twice (a double click) is one request; the password is part of the key, in memory while it runs.
    const attempt = JSON.stringify([username, password, options.scope ?? null]);
    const pending = this.logins.get(attempt);
    if (pending) return pending;
    const promise = (async () => {
      const body: Record<string, string> = { username, password };
      if (options.scope) body.scope = options.scope;
      const response = await this.post("login", body);
      if (!response.ok) throw await failure(response, "login");
      const tokens = await this.tokensFrom(response, null);
      this.epoch++;
      this.adopt(tokens);
      this.coordinator.announce({ type: "login", tokens });
      return tokens;
    })().finally(() => this.logins.delete(attempt));
    this.logins.set(attempt, promise);
    return promise;
  }

  /**
   * Refresh now (shared with any refresh already under way). In cookie mode, call it after a page load to
   * pick the session up from the cookie. Rejects with SessionExpiredError or RetryableAuthError.
   */
  refresh(): Promise<StoredTokens> {
    const tokens = this.storage.get();
    if (tokens ? !this.canRefresh(tokens) : this.transport === "body") {
      return Promise.reject(new SessionExpiredError("There is no session to refresh", { error: "no_session" }));
    }
    return this.refreshFrom(tokens);
  }

  /**
   * End the session: tokens are forgotten here and in the other tabs at once, then the broker ends the
   * Keycloak session. Rejects with RetryableAuthError when the broker could not be told (the local
   * tokens are gone all the same) and AuthRequestError when it refused the call (e.g. csrf_failed).
   */
  async logout(): Promise<void> {
    const tokens = this.storage.get();
    this.epoch++;
    this.clear();
    this.coordinator.announce({ type: "logout" });
    safely(() => this.options.onLogout?.());
    if (this.transport === "body" && !tokens?.refreshToken) return;
    const response = await this.post("logout", this.transport === "body" ? { refresh_token: tokens?.refreshToken } : {});
    if (response.ok) return discard(response);
    const error = await failure(response, "logout");
    // No refresh token (cookie gone) or a dead one: there is no session left to end.
    if (error.status === 400 && SESSION_OVER.has(error.error)) return;
    throw error;
  }

  /** The tokens in storage, or null. */
  getTokens(): StoredTokens | null {
    return this.storage.get();
  }

  /** Put tokens in storage (StoredTokens, or the broker's token object as login answered it), or clear them. */
  setTokens(tokens: StoredTokens | BrokerTokenResponse | null): void {
    const stored = tokens === null || isStoredTokens(tokens) ? tokens : fromTokenResponse(tokens, Date.now());
    if (tokens !== null && stored === null) throw new TypeError("setTokens needs an access token");
    this.epoch++;
    if (stored) this.adopt(stored);
    else this.clear();
  }

  /** Stop timers and leave the tabs' channel. The client must not be used afterwards. */
  close(): void {
    this.closed = true;
    this.setTimer(undefined);
    this.unsubscribe();
    if (this.ownsCoordinator) this.coordinator.close();
  }

  // --- refresh ---

  /** The one refresh that replaces `from`: joined by every caller in this tab, coordinated with the other tabs. */
  private refreshFrom(from: StoredTokens | null): Promise<StoredTokens> {
    const key = this.keyOf(from);
    if (this.inflight?.key === key) return this.inflight.promise;
    const epoch = this.epoch;
    const run = async () => {
      try {
        const tokens = await this.coordinator.coordinate(key, () => this.refreshHere(from), this.transport === "body");
        if (epoch !== this.epoch) return this.afterSessionChange();
        if (this.storage.get()?.accessToken !== tokens.accessToken) this.adopt(tokens);
        return tokens;
      } catch (err) {
        if (epoch !== this.epoch) return this.afterSessionChange(err);
        if (err instanceof SessionExpiredError) this.expire(key, err);
        throw err;
      }
    };
    const promise = run().finally(() => {
      if (this.inflight?.promise === promise) this.inflight = null;
    });
    this.inflight = { key, promise };
    return promise;
  }

  /**
   * A login, logout or expiry (maybe announced by another tab) happened while a refresh was under way:
   * its outcome belongs to the old session. Go on with the new session's tokens, if there is one.
   */
  private afterSessionChange(error?: unknown): StoredTokens {
    const current = this.storage.get();
    if (current) return current;
    if (error instanceof SessionExpiredError) throw error;
    throw new SessionExpiredError("Logged out", { error: "logged_out" });
  }

  /** The refresh call itself, in the tab that won the claim. Never goes through `this.fetch`. */
  private async refreshHere(from: StoredTokens | null): Promise<StoredTokens> {
    const current = this.storage.get();
    if (from && !current) throw new SessionExpiredError("Logged out", { error: "logged_out" });
    // Another tab's tokens arrived while this one waited for its turn: nothing left to spend.
    if (current && current.accessToken !== from?.accessToken) return current;
    const body = this.transport === "body" ? { refresh_token: from?.refreshToken } : {};
    const response = await this.post("refresh-token", body);
    if (!response.ok) throw await failure(response, "refresh");
    return this.tokensFrom(response, from);
  }

  private async tokensFrom(response: Response, previous: StoredTokens | null): Promise<StoredTokens> {
    const body = (await readJson(response)) as { token?: unknown } | undefined;
    const tokens = fromTokenResponse(body?.token, Date.now());
    if (!tokens) {
      throw new RetryableAuthError("The broker's answer had no usable token", { error: "invalid_response", status: response.status });
    }
    // A broker without rotation may leave the refresh token out of a refresh answer: keep the one in hand.
    if (this.transport === "body" && !tokens.refreshToken && previous?.refreshToken) tokens.refreshToken = previous.refreshToken;
    return tokens;
  }

  /**
   * POST JSON to one of the broker's auth routes; network failures and timeouts become RetryableAuthError.
   * Cookie mode: with the cookie (`credentials: "include"`) and the CSRF proof, on login too (so that a
   * cross-site form cannot plant another person's session cookie).
   */
  private async post(route: string, body: object): Promise<Response> {
    const headers = new Headers({ "Content-Type": "application/json", Accept: "application/json" });
    const cookie = this.transport === "cookie";
    if (cookie) headers.set(this.csrf.name, this.csrf.value);
    const url = new URL(`${this.authBase}/${route}`, this.baseUrl);
    const request = new Request(url, {
      method: "POST",
      headers,
      body: JSON.stringify(body),
      credentials: cookie ? "include" : "same-origin",
      signal: timeoutSignal(this.timeoutMs),
    });
    try {
      return await this.fetchImpl(request);
    } catch (err) {
      const timedOut = (err as { name?: string } | null)?.name === "TimeoutError" || request.signal.aborted;
      throw new RetryableAuthError(timedOut ? "The broker did not answer in time" : "The broker could not be reached", {
        error: timedOut ? "timeout" : "network_error",
        cause: err,
      });
    }
  }

  // --- state ---

  private keyOf(tokens: StoredTokens | null): string {
    // Cookie mode: every tab spends the same cookie, so every refresh is the same one.
    if (this.transport === "cookie") return "cookie";
    return fingerprint(tokens?.refreshToken ?? tokens?.accessToken ?? "");
  }

  private canRefresh(tokens: StoredTokens): boolean {
    return this.transport === "cookie" || !!tokens.refreshToken;
  }

  private expired(tokens: StoredTokens): boolean {
    return tokens.expiresAt !== undefined && Date.now() >= tokens.expiresAt;
  }

  private adopt(tokens: StoredTokens): void {
    this.storage.set(tokens);
    this.schedule(tokens);
    safely(() => this.options.onTokens?.(tokens));
  }

  private clear(): void {
    this.setTimer(undefined);
    this.storage.set(null);
    safely(() => this.options.onTokens?.(null));
  }

  /** The broker refused the refresh of `key`: end the session once, if it is still the one in storage. */
  private expire(key: string, error: SessionExpiredError): void {
    const current = this.storage.get();
    if (!current || this.keyOf(current) !== key) return;
    this.epoch++;
    this.clear();
    safely(() => this.options.onSessionExpired?.(error));
  }

  private onPeer(event: PeerEvent): void {
    if (this.closed) return;
    const current = this.storage.get();
    switch (event.type) {
      case "login":
        this.epoch++;
        this.adopt(event.tokens);
        return;
      case "logout":
        if (!current) return;
        this.epoch++;
        this.clear();
        safely(() => this.options.onLogout?.());
        return;
      case "refreshed":
        // Body mode: take them if they replace the tokens this tab holds. Cookie mode: if they are newer.
        if (!current || current.accessToken === event.tokens.accessToken) return;
        if (this.transport === "cookie" ? event.tokens.receivedAt > current.receivedAt : this.keyOf(current) === event.key) {
          this.adopt(event.tokens);
        }
        return;
      case "refresh-failed":
        if (event.error instanceof SessionExpiredError) this.expire(event.key, event.error);
        return;
    }
  }

  // --- proactive refresh ---

  private schedule(tokens: StoredTokens | null, attempt = 0): void {
    this.setTimer(undefined);
    if (!tokens || !this.proactive || this.closed || tokens.expiresAt === undefined || !this.canRefresh(tokens)) return;
    const lifetime = Math.max(0, tokens.expiresAt - tokens.receivedAt);
    const lead = Math.min(this.leadMs, lifetime / 3) + Math.random() * Math.min(this.jitterMs, lifetime / 10);
    this.setTimer(tokens.expiresAt - lead - Date.now(), () => this.refreshAhead(tokens, attempt));
  }

  private refreshAhead(tokens: StoredTokens, attempt: number): void {
    const current = this.storage.get();
    if (this.closed || !current || current.accessToken !== tokens.accessToken) return;
    this.refreshFrom(current).catch((err: unknown) => {
      // A session that ended was handled by expire(); a refusal that trying again will not fix waits for a request.
      if (!(err instanceof AuthError) || !err.retryable || this.closed) return;
      if (this.storage.get()?.accessToken !== tokens.accessToken) return;
      const wait = err.retryAfter !== undefined ? err.retryAfter * 1000 : Math.min(this.retryDelayMs * 2 ** attempt, MAX_RETRY_DELAY_MS);
      this.setTimer(wait, () => this.refreshAhead(tokens, attempt + 1));
    });
  }

  private setTimer(delayMs: number | undefined, run?: () => void): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    if (delayMs === undefined || !run) return;
    this.timer = setTimeout(run, Math.min(Math.max(0, delayMs), MAX_TIMER_MS));
    unrefTimer(this.timer);
  }

  // --- requests ---

  /** A Request; relative URLs resolve as fetch resolves them (against the page), or against baseUrl outside a browser. */
  private toRequest(input: RequestInfo | URL, init?: RequestInit): Request {
    if (input instanceof Request) return init ? new Request(input, init) : input;
    const page = (globalThis as { location?: { href?: string } }).location?.href;
    return new Request(new URL(input instanceof URL ? input.href : input, page ?? this.baseUrl), init);
  }

  private send(request: Request, tokens: StoredTokens | null): Promise<Response> {
    const attempt = request.clone(); // the original stays unread, for the retry
    if (tokens) attempt.headers.set("Authorization", `Bearer ${tokens.accessToken}`);
    return this.fetchImpl(attempt);
  }
}

export function createAuthClient(options: AuthClientOptions = {}): AuthClient {
  return new AuthClient(options);
}

/**
 * Does this answer say "your access token is no good" (so a refresh may help)? A 401 with
 * `X-Token-Expired: true`, or `invalid_token` in `WWW-Authenticate` or in the body. The body is the one
 * signal a cross-origin page can always read: custom headers need Access-Control-Expose-Headers.
 */
export async function rejectsAccessToken(response: Response): Promise<boolean> {
  if (response.status !== 401) return false;
  if (response.headers.get("X-Token-Expired")?.trim().toLowerCase() === "true") return true;
  if (/error="?invalid_token"?/i.test(response.headers.get("WWW-Authenticate") ?? "")) return true;
  if (!(response.headers.get("Content-Type") ?? "").includes("json")) return false;
  const body = await readJson(response.clone());
  return (body as { error?: unknown } | undefined)?.error === "invalid_token";
}

/** The broker's refusal as an AuthError: 5xx, 408, 425, 429 retryable; a dead refresh token ends the session. */
async function failure(response: Response, call: "login" | "refresh" | "logout"): Promise<AuthError> {
  const body = (await readJson(response)) as { error?: unknown; message?: unknown } | undefined;
  const status = response.status;
  const error = typeof body?.error === "string" ? body.error : `http_${status}`;
  const message = typeof body?.message === "string" ? body.message : `The broker answered ${status}`;
  if (status >= 500 || RETRYABLE_STATUS.has(status)) {
    return new RetryableAuthError(message, { error, status, retryAfter: retryAfterSeconds(response.headers.get("Retry-After")) });
  }
  if (call === "refresh" && (status === 400 || status === 401) && SESSION_OVER.has(error)) {
    return new SessionExpiredError(message, { error, status });
  }
  return new AuthRequestError(message, { error, status });
}

async function readJson(response: Response): Promise<unknown> {
  try {
    return await response.json();
  } catch {
    return undefined;
  }
}

function retryAfterSeconds(value: string | null): number | undefined {
  if (!value) return undefined;
  if (/^\s*\d+\s*$/.test(value)) return Number(value);
  const date = Date.parse(value);
  return Number.isNaN(date) ? undefined : Math.max(0, Math.ceil((date - Date.now()) / 1000));
}

async function discard(response: Response): Promise<void> {
  try {
    await response.body?.cancel();
  } catch {
    // Already read or errored: nothing to free.
  }
}

function timeoutSignal(ms: number): AbortSignal {
  if (typeof AbortSignal.timeout === "function") return AbortSignal.timeout(ms);
  const controller = new AbortController();
  setTimeout(() => controller.abort(), ms);
  return controller.signal;
}

/** `promise`, or the caller's abort: a request aborted while it waits for a refresh does not wait on. */
function abortable<T>(promise: Promise<T>, signal: AbortSignal | null): Promise<T> {
  if (!signal) return promise;
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(
      (value) => {
        signal.removeEventListener("abort", onAbort);
        resolve(value);
      },
      (err: unknown) => {
        signal.removeEventListener("abort", onAbort);
        reject(err);
      },
    );
  });
}

/** Run an application callback; its exception is reported, not allowed to break the client's bookkeeping. */
function safely(run: () => void): void {
  try {
    run();
  } catch (err) {
    setTimeout(() => {
      throw err;
    }, 0);
  }
}

function isCoordinator(value: unknown): value is RefreshCoordinator {
  return typeof value === "object" && value !== null && typeof (value as RefreshCoordinator).coordinate === "function";
}
