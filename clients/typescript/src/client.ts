/**
 * AuthClient: `fetch` with the broker's access token attached. When the broker rejects the access token,
 * or it is about to expire, the client refreshes once (one refresh in flight per tab, one tab at a time
 * with Web Locks) and replays the request once. The session ends only when the broker refuses the
 * refresh token; a 5xx, a 429 or a network error keeps the tokens for a later try.
 */

import { AuthError, AuthRequestError, RetryableAuthError, SessionExpiredError } from "./errors.js";
import { fromTokenResponse, isStoredTokens, memoryStorage, type BrokerTokenResponse, type StoredTokens, type TokenStorage } from "./tokens.js";

/** Where the refresh token travels (the broker's token transport modes). */
export type TokenTransport = "body" | "cookie";

/** The part of the Web Locks API (`navigator.locks`) the client uses. */
export interface LockManagerLike {
  request<T>(name: string, callback: (lock: unknown) => Promise<T>): Promise<T>;
}

/** The part of BroadcastChannel the client uses. */
export interface BroadcastChannelLike {
  postMessage(message: unknown): void;
  addEventListener(type: "message", listener: (event: { data: unknown }) => void): void;
  close(): void;
}

/** How the tabs of one browser share a session. */
export interface CrossTabOptions {
  /** Tabs with the same name share a session: the channel's name, and the lock's (`<name>:refresh`). Default "token-broker". */
  channelName?: string;
  /** Where session changes are posted. Default `new BroadcastChannel(channelName)` where there is one; null: none. */
  channel?: BroadcastChannelLike | null;
  /** Web Locks. Default `navigator.locks` where there are; null: none (each tab refreshes on its own). */
  locks?: LockManagerLike | null;
}

export interface AuthClientOptions {
  /** The broker's origin (and path prefix, if any); default `location.origin` in a browser. */
  baseUrl?: string;
  /** The broker's auth routes, resolved against baseUrl. Default "/api/auth". */
  authPath?: string;
  /** "body" (default): the refresh token is kept in storage and posted. "cookie": it is an HttpOnly cookie JavaScript never sees. */
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
   * Retry-After says. Default 1 000 ms: well inside the broker's coalescing grace (5 s).
   */
  retryDelayMs?: number;
  /** Timeout of each call to login, refresh-token and logout. Default 10 000 ms. */
  requestTimeoutMs?: number;
  /**
   * Share the session with the other tabs of this browser (Web Locks and a BroadcastChannel): true, false,
   * or options. Default: true in a browser page, false elsewhere (a server's clients belong to different users).
   */
  crossTab?: boolean | CrossTabOptions;
  /** Which requests get the access token. Default: those to baseUrl's origin. */
  shouldAttachToken?: (url: URL) => boolean;
  /** The session ended: the broker refused the refresh token (here or in another tab). Send the user to log in. */
  onSessionExpired?: (error: SessionExpiredError) => void;
  /** logout() ran in this tab or another one. */
  onLogout?: () => void;
  /** The tokens changed (login, refresh, logout, expiry, another tab). null: none any more. */
  onTokens?: (tokens: StoredTokens | null) => void;
}

type Callbacks = "onSessionExpired" | "onLogout" | "onTokens";
/** The options with every default filled in (crossTab is the constructor's business only). */
type Settings = Required<Omit<AuthClientOptions, Callbacks | "crossTab">> & Pick<AuthClientOptions, Callbacks>;

/** A change of the session, as setSession applies it and the other tabs hear it. */
interface Change {
  type: "login" | "refresh" | "logout" | "expired" | "set";
  /** The access token it replaces or ends: the change is for the tabs holding it. null: for every tab (login, logout). */
  replaces: string | null;
  /** Why the session expired (type "expired"). */
  error?: SessionExpiredError;
}

/** What a tab posts when its session changed (`v`: tabs running another version of the client ignore it). */
interface TabMessage extends Omit<Change, "error"> {
  v: 2;
  tokens: StoredTokens | null;
  error?: { error: string; message: string; status?: number };
}

const SESSION_OVER = new Set(["invalid_grant", "refresh_token_required", "location_blocked"]);
const RETRY_LATER_STATUS = new Set([408, 425, 429]);
const MAX_TIMER_MS = 2 ** 31 - 1;
const MAX_RETRY_DELAY_MS = 60_000;

/** fetch with the broker's tokens: see the module comment, and docs/frontend.md for the whole behaviour. */
export class AuthClient {
  private readonly options: Settings;
  private readonly channel: BroadcastChannelLike | null = null;
  private readonly locks: LockManagerLike | null = null;
  private readonly lockName: string = "";
  /** The refresh under way in this tab: every caller that needs one joins it. */
  private flight: Promise<StoredTokens> | null = null;
  /** Bumped by setSession: a refresh that ends in another epoch belongs to a session that changed meanwhile. */
  private epoch = 0;
  /** Why the session ended last: what the callers of a refresh that outlived it get. */
  private ended: SessionExpiredError = loggedOut();
  private timer: ReturnType<typeof setTimeout> | undefined;
  private closed = false;

  constructor(options: AuthClientOptions = {}) {
    const baseUrl = options.baseUrl ?? (globalThis as { location?: { origin?: string } }).location?.origin;
    if (!baseUrl) throw new TypeError("AuthClient needs baseUrl outside a browser page");
    const origin = new URL(baseUrl).origin;
    const fetchImpl = options.fetch ?? globalThis.fetch;
    this.options = {
      ...options,
      baseUrl,
      authPath: (options.authPath ?? "/api/auth").replace(/\/+$/, ""),
      transport: options.transport ?? "body",
      csrfHeader: options.csrfHeader ?? { name: "X-Requested-With", value: "XMLHttpRequest" },
      // Browsers refuse a fetch called with another `this` ("Illegal invocation").
      fetch: (input, init) => fetchImpl.call(globalThis, input, init),
      storage: options.storage ?? memoryStorage(),
      proactiveRefresh: options.proactiveRefresh ?? true,
      refreshLeadMs: options.refreshLeadMs ?? 30_000,
      refreshJitterMs: options.refreshJitterMs ?? 10_000,
      retryDelayMs: options.retryDelayMs ?? 1_000,
      requestTimeoutMs: options.requestTimeoutMs ?? 10_000,
      shouldAttachToken: options.shouldAttachToken ?? ((url) => url.origin === origin),
    };
    const crossTab = options.crossTab ?? typeof (globalThis as { document?: unknown }).document !== "undefined";
    if (crossTab) {
      const tabs = crossTab === true ? {} : crossTab;
      const name = tabs.channelName ?? "token-broker";
      this.lockName = `${name}:refresh`;
      const locks = (globalThis as { navigator?: { locks?: LockManagerLike } }).navigator?.locks;
      this.locks = tabs.locks !== undefined ? tabs.locks : typeof locks?.request === "function" ? locks : null;
      this.channel = tabs.channel !== undefined ? tabs.channel : openChannel(name);
      this.channel?.addEventListener("message", (event) => this.onMessage(event.data));
    }
    this.schedule(this.options.storage.get());
  }

  /**
   * fetch with the access token. On a 401 for an expired or invalid access token, refresh (joining the
   * refresh under way) and send the request once more, with the same body; answers, a second 401
   * included, come back as they are. Rejects with SessionExpiredError (the session is over) or
   * RetryableAuthError (no refresh now); an aborted `signal` stops the wait for a refresh.
   */
  readonly fetch = async (input: RequestInfo | URL, init?: RequestInit): Promise<Response> => {
    if (this.closed) throw closedError();
    const o = this.options;
    const request = toRequest(input, init, o.baseUrl);
    if (request.headers.has("Authorization") || !o.shouldAttachToken(new URL(request.url))) return o.fetch(request);
    let tokens = o.storage.get();
    if (tokens?.expiresAt !== undefined && Date.now() >= tokens.expiresAt && this.canRefresh(tokens)) {
      tokens = await abortable(this.refresh(), request.signal);
    }
    const response = await this.send(request, tokens);
    if (!tokens || !(await rejectsAccessToken(response))) return response;
    const current = o.storage.get();
    const refreshedMeanwhile = current !== null && current.accessToken !== tokens.accessToken;
    if (!current || (!refreshedMeanwhile && !this.canRefresh(current))) return response;
    await discard(response);
    return this.send(request, refreshedMeanwhile ? current : await abortable(this.refresh(), request.signal));
  };

  /** Log in with the broker; the other tabs get the new session too. Rejects with AuthRequestError for a wrong password. */
  async login(username: string, password: string, options: { scope?: string } = {}): Promise<StoredTokens> {
    const response = await this.post("login", options.scope ? { username, password, scope: options.scope } : { username, password });
    if (!response.ok) throw await failure(response, false);
    const tokens = await this.tokensFrom(response, null);
    this.setSession(tokens, { type: "login", replaces: null });
    return tokens;
  }

  /**
   * Refresh now, or join the refresh under way: the client's one way to refresh (fetch and the timer use
   * it too). With Web Locks one tab at a time refreshes, and a tab that gets the lock after another tab's
   * new tokens arrived takes those. In cookie mode, call it on page load to pick the session up from the
   * cookie. Rejects with SessionExpiredError, RetryableAuthError or AuthRequestError.
   */
  refresh(): Promise<StoredTokens> {
    if (this.flight) return this.flight;
    if (this.closed) return Promise.reject(closedError());
    const o = this.options;
    const from = o.storage.get();
    if (from ? !this.canRefresh(from) : o.transport === "body") {
      return Promise.reject(new SessionExpiredError("There is no session to refresh", { error: "no_session" }));
    }
    const epoch = this.epoch;
    const changed = () => this.epoch !== epoch || o.storage.get()?.accessToken !== from?.accessToken;
    const run = async (): Promise<StoredTokens> => {
      if (changed()) return this.current(); // another tab refreshed (or a login, a logout) while this one waited
      let tokens: StoredTokens;
      try {
        const response = await this.post("refresh-token", o.transport === "body" ? { refresh_token: from?.refreshToken } : {});
        if (!response.ok) throw await failure(response, true);
        tokens = await this.tokensFrom(response, from);
      } catch (err) {
        if (changed()) return this.current();
        if (err instanceof SessionExpiredError && from) this.setSession(null, { type: "expired", replaces: from.accessToken, error: err });
        throw err;
      }
      if (changed()) return this.current();
      this.setSession(tokens, { type: "refresh", replaces: from?.accessToken ?? null }); // told to the other tabs before the lock goes
      return tokens;
    };
    const flight = (this.locks ? this.locks.request(this.lockName, run) : run())
      .catch((err: unknown) => {
        throw err instanceof AuthError ? err : new RetryableAuthError("The refresh failed", { error: "refresh_failed", cause: err });
      })
      .finally(() => {
        if (this.flight === flight) this.flight = null;
      });
    this.flight = flight;
    return flight;
  }

  /**
   * End the session: the tokens are forgotten here and in the other tabs at once, then the broker ends the
   * Keycloak session. Rejects with RetryableAuthError when the broker could not be told (the local tokens
   * are gone all the same) and AuthRequestError when it refused the call (e.g. csrf_failed).
   */
  async logout(): Promise<void> {
    const tokens = this.options.storage.get();
    const body = this.options.transport === "body";
    this.setSession(null, { type: "logout", replaces: null });
    if (body && !tokens?.refreshToken) return;
    const response = await this.post("logout", body ? { refresh_token: tokens?.refreshToken } : {});
    if (response.ok) return discard(response);
    const error = await failure(response, false);
    // No refresh token (cookie gone) or a dead one: there is no session left to end.
    if (error.status === 400 && SESSION_OVER.has(error.error)) return;
    throw error;
  }

  /** The tokens in storage, or null. */
  getTokens(): StoredTokens | null {
    return this.options.storage.get();
  }

  /** Put tokens in storage (StoredTokens, or the broker's token object as login answered it), or clear them. This tab only. */
  setTokens(tokens: StoredTokens | BrokerTokenResponse | null): void {
    const stored = tokens === null || isStoredTokens(tokens) ? tokens : fromTokenResponse(tokens, Date.now());
    if (tokens !== null && stored === null) throw new TypeError("setTokens needs an access token");
    this.setSession(stored, { type: "set", replaces: null });
  }

  /** Stop the proactive refresh and leave the other tabs. Every later call, and a refresh still under way, rejects with `client_closed`. */
  close(): void {
    this.closed = true;
    clearTimeout(this.timer);
    this.channel?.close();
  }

  /**
   * The only place the session changes: storage, epoch, the proactive timer, the callbacks, and (unless
   * the change came from there, or is setTokens) the other tabs.
   */
  private setSession(tokens: StoredTokens | null, change: Change, fromOtherTab = false): void {
    if (this.closed) throw closedError();
    this.epoch++;
    this.flight = null; // callers from now on need a refresh of the new session, not of the old one
    this.options.storage.set(tokens);
    const { type, replaces, error } = change;
    if (!tokens) this.ended = error ?? loggedOut();
    this.schedule(tokens);
    if (!fromOtherTab && type !== "set") {
      const message: TabMessage = { v: 2, type, replaces, tokens, error: error && { error: error.error, message: error.message, status: error.status } };
      try {
        this.channel?.postMessage(message);
      } catch {
        // A channel that cannot post (closed by the page) leaves this tab on its own.
      }
    }
    safely(() => this.options.onTokens?.(tokens));
    if (type === "logout") safely(() => this.options.onLogout?.());
    if (error) safely(() => this.options.onSessionExpired?.(error));
  }

  /** Another tab's change of the session: taken if it is for the tokens this tab holds (or for every tab). */
  private onMessage(data: unknown): void {
    const m = parseMessage(data);
    const current = this.options.storage.get();
    if (!m || this.closed || (m.replaces === null ? !m.tokens && !current : current?.accessToken !== m.replaces)) return;
    const error = m.error && new SessionExpiredError(m.error.message, { error: m.error.error, status: m.error.status });
    this.setSession(m.tokens, { type: m.type, replaces: m.replaces, error }, true);
  }

  /** What the callers of a refresh that lost its session to a change get: the new session's tokens, or why it ended. */
  private current(): StoredTokens {
    if (this.closed) throw closedError();
    const tokens = this.options.storage.get();
    if (!tokens) throw this.ended;
    return tokens;
  }

  /** Plan the proactive refresh of `tokens`: shortly before they expire, or `delayMs` after a retryable failure. */
  private schedule(tokens: StoredTokens | null, attempt = 0, delayMs?: number): void {
    clearTimeout(this.timer);
    const o = this.options;
    if (!tokens || !o.proactiveRefresh || this.closed || tokens.expiresAt === undefined || !this.canRefresh(tokens)) return;
    const lifetime = Math.max(0, tokens.expiresAt - tokens.receivedAt);
    const lead = Math.min(o.refreshLeadMs, lifetime / 3) + Math.random() * Math.min(o.refreshJitterMs, lifetime / 10);
    const wait = delayMs ?? tokens.expiresAt - lead - Date.now();
    this.timer = setTimeout(() => {
      const current = o.storage.get();
      // Another tab changed a storage the tabs share: plan for what is there now.
      if (current?.accessToken !== tokens.accessToken) return this.schedule(current);
      this.refresh().catch((err: unknown) => {
        // An ended session was handled by refresh(); a refusal that a retry will not fix waits for a request.
        if (!(err instanceof RetryableAuthError) || o.storage.get()?.accessToken !== tokens.accessToken) return;
        const backoff = err.retryAfter !== undefined ? err.retryAfter * 1000 : Math.min(o.retryDelayMs * 2 ** attempt, MAX_RETRY_DELAY_MS);
        this.schedule(tokens, attempt + 1, backoff);
      });
    }, Math.min(Math.max(0, wait), MAX_TIMER_MS));
    (this.timer as { unref?: () => void }).unref?.(); // Node: a pending refresh must not keep the process alive
  }

  private canRefresh(tokens: StoredTokens): boolean {
    return this.options.transport === "cookie" || !!tokens.refreshToken;
  }

  private async tokensFrom(response: Response, previous: StoredTokens | null): Promise<StoredTokens> {
    const body = (await readJson(response)) as { token?: unknown } | undefined;
    const tokens = fromTokenResponse(body?.token, Date.now());
    if (!tokens) throw new RetryableAuthError("The broker's answer had no usable token", { error: "invalid_response", status: response.status });
    // A broker without rotation may leave the refresh token out of a refresh answer: keep the one in hand.
    if (this.options.transport === "body" && !tokens.refreshToken && previous?.refreshToken) tokens.refreshToken = previous.refreshToken;
    return tokens;
  }

  /**
   * POST JSON to one of the broker's auth routes; a network failure or the timeout is a RetryableAuthError.
   * Cookie mode: with the cookie and the CSRF proof, on login too (no cross-site form may plant a session).
   */
  private async post(route: string, body: object): Promise<Response> {
    if (this.closed) throw closedError();
    const o = this.options;
    const cookie = o.transport === "cookie";
    const headers = new Headers({ "Content-Type": "application/json", Accept: "application/json" });
    if (cookie) headers.set(o.csrfHeader.name, o.csrfHeader.value);
    const signal = AbortSignal.timeout(o.requestTimeoutMs);
    const init: RequestInit = { method: "POST", headers, body: JSON.stringify(body), credentials: cookie ? "include" : "same-origin", signal };
    try {
      return await o.fetch(new Request(new URL(`${o.authPath}/${route}`, o.baseUrl), init));
    } catch (err) {
      const timedOut = signal.aborted || (err as { name?: string } | null)?.name === "TimeoutError";
      const message = timedOut ? "The broker did not answer in time" : "The broker could not be reached";
      throw new RetryableAuthError(message, { error: timedOut ? "timeout" : "network_error", cause: err });
    }
  }

  /** Send a copy of `request` (the original stays unread, for the replay) with the access token. */
  private send(request: Request, tokens: StoredTokens | null): Promise<Response> {
    const attempt = request.clone();
    if (tokens) attempt.headers.set("Authorization", `Bearer ${tokens.accessToken}`);
    return this.options.fetch(attempt);
  }
}

/** A new AuthClient: `createAuthClient(options)` is `new AuthClient(options)`. */
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

/** The broker's refusal as an AuthError: 5xx, 408, 425, 429 mean later; a refused refresh token ends the session. */
async function failure(response: Response, refresh: boolean): Promise<AuthError> {
  const body = (await readJson(response)) as { error?: unknown; message?: unknown } | undefined;
  const status = response.status;
  const error = typeof body?.error === "string" ? body.error : `http_${status}`;
  const message = typeof body?.message === "string" ? body.message : `The broker answered ${status}`;
  if (status >= 500 || RETRY_LATER_STATUS.has(status)) {
    return new RetryableAuthError(message, { error, status, retryAfter: retryAfterSeconds(response.headers.get("Retry-After")) });
  }
  if (refresh && (status === 400 || status === 401) && SESSION_OVER.has(error)) return new SessionExpiredError(message, { error, status });
  return new AuthRequestError(message, { error, status });
}

/** A TabMessage, or null for anything else on the channel. */
function parseMessage(data: unknown): TabMessage | null {
  const m = data as Partial<TabMessage> | null;
  if (m?.v !== 2 || !["login", "refresh", "logout", "expired"].includes(m.type!)) return null;
  if ((m.tokens !== null && !isStoredTokens(m.tokens)) || (m.replaces !== null && typeof m.replaces !== "string")) return null;
  return m.error === undefined || typeof m.error?.message === "string" ? (m as TabMessage) : null;
}

/** A Request; relative URLs resolve as fetch resolves them (against the page), or against baseUrl outside a browser. */
function toRequest(input: RequestInfo | URL, init: RequestInit | undefined, baseUrl: string): Request {
  if (input instanceof Request) return init ? new Request(input, init) : input;
  const page = (globalThis as { location?: { href?: string } }).location?.href;
  return new Request(new URL(input instanceof URL ? input.href : input, page ?? baseUrl), init);
}

function openChannel(name: string): BroadcastChannelLike | null {
  const Channel = (globalThis as { BroadcastChannel?: new (name: string) => BroadcastChannelLike & { unref?: () => void } }).BroadcastChannel;
  if (!Channel) return null;
  const channel = new Channel(name);
  channel.unref?.(); // Node: an open channel must not keep the process alive
  return channel;
}

const closedError = () => new AuthError("The client was closed", { error: "client_closed" });
const loggedOut = () => new SessionExpiredError("Logged out", { error: "logged_out" });
const readJson = (response: Response): Promise<unknown> => response.json().catch(() => undefined);

function retryAfterSeconds(value: string | null): number | undefined {
  if (!value) return undefined;
  if (/^\s*\d+\s*$/.test(value)) return Number(value);
  const date = Date.parse(value);
  return Number.isNaN(date) ? undefined : Math.max(0, Math.ceil((date - Date.now()) / 1000));
}

/** Free an answer's body that nobody will read (already read or errored: nothing to free). */
const discard = async (response: Response): Promise<void> => response.body?.cancel().catch(() => undefined);

/** `promise`, or the caller's abort: a request aborted while it waits for a refresh does not wait on. */
function abortable<T>(promise: Promise<T>, signal: AbortSignal | null): Promise<T> {
  if (!signal) return promise;
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
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
