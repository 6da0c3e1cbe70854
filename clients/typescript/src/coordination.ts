/**
 * Cross-tab coordination: the tabs of one browser spend a refresh token once, and share the result.
 *
 * With refresh-token rotation a refresh token may be used once; two tabs refreshing the same token end
 * the session. So before a tab refreshes it *claims* the token (by its fingerprint) on a
 * BroadcastChannel; a tab that sees a claim for the token it wanted to spend waits for the claimant's
 * result instead. The claimant posts the result (the new tokens, or why it failed) on the channel.
 *
 * Who claims first:
 * - with Web Locks (`navigator.locks`), the tab that holds the lock; it posts its claim before it
 *   refreshes, so the next holder, who has seen the claim, waits for the result;
 * - without them (Node, older browsers), every claimant waits a short window (`claimWindowMs`) for other
 *   claims of the same token, and the earliest claim (time, then tab id) wins; all tabs compute the same
 *   winner from the same claims.
 */

import { AuthError, deserializeAuthError, RetryableAuthError, serializeAuthError, type SerializedAuthError } from "./errors.js";
import { isStoredTokens, type StoredTokens } from "./tokens.js";

/** What the client needs from a coordinator. */
export interface RefreshCoordinator {
  /**
   * Run `refresh` here, or wait for the tab that is already spending `key`; resolves with the new tokens.
   * `remember`: keep a finished result for `key` so a tab that asks later gets it instead of spending
   * the token again (right when `key` names one refresh token; wrong for cookie mode's shared cookie).
   */
  coordinate(key: string, refresh: () => Promise<StoredTokens>, remember: boolean): Promise<StoredTokens>;
  /** Tell the other tabs about a login (new tokens) or a logout. */
  announce(event: SessionAnnouncement): void;
  /** Hear what the other tabs did. Returns a function that stops listening. */
  subscribe(listener: (event: PeerEvent) => void): () => void;
  close(): void;
}

export type SessionAnnouncement = { type: "login"; tokens: StoredTokens } | { type: "logout" };

export type PeerEvent =
  | SessionAnnouncement
  | { type: "refreshed"; key: string; tokens: StoredTokens }
  | { type: "refresh-failed"; key: string; error: AuthError };

/** The part of BroadcastChannel the coordinator uses. */
export interface BroadcastChannelLike {
  postMessage(message: unknown): void;
  addEventListener(type: "message", listener: (event: { data: unknown }) => void): void;
  close(): void;
}

/** The part of the Web Locks API (`navigator.locks`) the coordinator uses. */
export interface LockManagerLike {
  request<T>(name: string, callback: (lock: unknown) => Promise<T>): Promise<T>;
}

export interface CrossTabOptions {
  /** Tabs coordinate with the tabs that use the same name. Default "token-broker". */
  channelName?: string;
  /** The channel to use; default `new BroadcastChannel(channelName)`. */
  channel?: BroadcastChannelLike;
  /** Web Locks; default `navigator.locks` when present. `null` forces the claim window. */
  locks?: LockManagerLike | null;
  /** Without Web Locks: how long a claimant listens for competing claims. Default 50 ms. */
  claimWindowMs?: number;
  /** How long a tab waits for another tab's refresh before giving up with a RetryableAuthError. */
  waitTimeoutMs?: number;
}

/** Refreshes in this tab only: for contexts without BroadcastChannel, or when cross-tab is switched off. */
export function localCoordinator(): RefreshCoordinator {
  return {
    coordinate: (_key, refresh) => refresh(),
    announce: () => {},
    subscribe: () => () => {},
    close: () => {},
  };
}

type Message =
  | { v: 1; from: string; type: "claim"; key: string; time: number }
  | { v: 1; from: string; type: "result"; key: string; remember: boolean; tokens: StoredTokens }
  | { v: 1; from: string; type: "failure"; key: string; remember: boolean; failure: SerializedAuthError }
  | { v: 1; from: string; type: "login"; tokens: StoredTokens }
  | { v: 1; from: string; type: "logout" };

type Outcome = { ok: true; tokens: StoredTokens } | { ok: false; error: AuthError };

/** A finished refresh: `seq` orders it among finishes; `remember` lets later askers, not only concurrent ones, use it. */
interface Finished {
  outcome: Outcome;
  seq: number;
  remember: boolean;
}

interface Waiter {
  resolve(tokens: StoredTokens): void;
  reject(error: AuthError): void;
}

const REMEMBERED_RESULTS = 32;

/** A coordinator over a BroadcastChannel (and Web Locks when given). */
export class TabCoordinator implements RefreshCoordinator {
  readonly id = randomId();
  private readonly channel: BroadcastChannelLike;
  private readonly locks: LockManagerLike | null;
  private readonly lockName: string;
  private readonly claimWindowMs: number;
  private readonly waitTimeoutMs: number;
  /** key → (tab id → claim time): who is spending which token right now. */
  private readonly claims = new Map<string, Map<string, number>>();
  /** key → the last finished refresh of it (bounded, oldest out first). */
  private readonly results = new Map<string, Finished>();
  private seq = 0;
  private readonly waiters = new Map<string, Waiter[]>();
  private readonly listeners = new Set<(event: PeerEvent) => void>();
  private closed = false;

  constructor(channel: BroadcastChannelLike, options: { channelName: string; locks: LockManagerLike | null; claimWindowMs: number; waitTimeoutMs: number }) {
    this.channel = channel;
    this.locks = options.locks;
    this.lockName = `${options.channelName}:refresh`;
    this.claimWindowMs = options.claimWindowMs;
    this.waitTimeoutMs = options.waitTimeoutMs;
    channel.addEventListener("message", (event) => this.receive(event.data));
  }

  async coordinate(key: string, refresh: () => Promise<StoredTokens>, remember: boolean): Promise<StoredTokens> {
    const since = this.seq;
    const early = this.settled(key, since) ?? (this.claimedByOther(key) ? this.waitFor(key) : undefined);
    if (early) return early;
    if (this.locks) {
      return this.locks.request(this.lockName, async () => {
        const settled = this.settled(key, since) ?? (this.claimedByOther(key) ? this.waitFor(key) : undefined);
        if (settled) return settled;
        this.claim(key);
        return this.spend(key, refresh, remember);
      });
    }
    this.claim(key);
    await delay(this.claimWindowMs);
    const settled = this.settled(key, since);
    if (settled) return settled;
    if (this.winner(key) !== this.id) return this.waitFor(key);
    return this.spend(key, refresh, remember);
  }

  announce(event: SessionAnnouncement): void {
    // A new session or none: nothing remembered about the old one's tokens applies any more.
    this.results.clear();
    this.post(event.type === "login" ? { v: 1, from: this.id, type: "login", tokens: event.tokens } : { v: 1, from: this.id, type: "logout" });
  }

  subscribe(listener: (event: PeerEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.channel.close();
    const closedError = new RetryableAuthError("The client was closed", { error: "client_closed" });
    for (const key of [...this.waiters.keys()]) this.finish(key, { ok: false, error: closedError }, false);
  }

  private async spend(key: string, refresh: () => Promise<StoredTokens>, remember: boolean): Promise<StoredTokens> {
    try {
      const tokens = await refresh();
      this.post({ v: 1, from: this.id, type: "result", key, remember, tokens });
      this.finish(key, { ok: true, tokens }, remember);
      return tokens;
    } catch (err) {
      const failure = serializeAuthError(err);
      this.post({ v: 1, from: this.id, type: "failure", key, remember, failure });
      this.finish(key, { ok: false, error: err instanceof AuthError ? err : deserializeAuthError(failure) }, remember);
      throw err;
    }
  }

  private claim(key: string): void {
    const time = Date.now();
    this.claimsOf(key).set(this.id, time);
    this.post({ v: 1, from: this.id, type: "claim", key, time });
  }

  private claimsOf(key: string): Map<string, number> {
    let claims = this.claims.get(key);
    if (!claims) this.claims.set(key, (claims = new Map()));
    return claims;
  }

  private claimedByOther(key: string): boolean {
    const claims = this.claims.get(key);
    return claims !== undefined && [...claims.keys()].some((id) => id !== this.id);
  }

  /** The earliest claim for `key` (time, then tab id): the same answer in every tab that saw the same claims. */
  private winner(key: string): string | undefined {
    let best: [string, number] | undefined;
    for (const [id, time] of this.claims.get(key) ?? []) {
      if (!best || time < best[1] || (time === best[1] && id < best[0])) best = [id, time];
    }
    return best?.[0];
  }

  /** The outcome of a refresh of `key` that finished after `since` (a concurrent one), or any remembered one. */
  private settled(key: string, since: number): Promise<StoredTokens> | undefined {
    const finished = this.results.get(key);
    if (!finished || (!finished.remember && finished.seq <= since)) return undefined;
    const { outcome } = finished;
    return outcome.ok ? Promise.resolve(outcome.tokens) : Promise.reject(outcome.error);
  }

  private waitFor(key: string): Promise<StoredTokens> {
    return new Promise<StoredTokens>((resolve, reject) => {
      const timer = setTimeout(() => {
        // The claimant vanished (tab closed, frozen): forget its claim so a later attempt may claim again.
        this.claims.delete(key);
        this.removeWaiter(key, waiter);
        reject(new RetryableAuthError("Another tab's token refresh did not finish in time", { error: "refresh_timeout" }));
      }, this.waitTimeoutMs);
      const waiter: Waiter = {
        resolve: (tokens) => {
          clearTimeout(timer);
          resolve(tokens);
        },
        reject: (error) => {
          clearTimeout(timer);
          reject(error);
        },
      };
      const list = this.waiters.get(key) ?? [];
      list.push(waiter);
      this.waiters.set(key, list);
    });
  }

  private removeWaiter(key: string, waiter: Waiter): void {
    const list = this.waiters.get(key)?.filter((w) => w !== waiter);
    if (list && list.length) this.waiters.set(key, list);
    else this.waiters.delete(key);
  }

  /** A refresh of `key` ended (here or in another tab): release the waiters and forget the claims. */
  private finish(key: string, outcome: Outcome, remember: boolean): void {
    this.claims.delete(key);
    // Concurrent askers always share the outcome; later ones only an outcome that will never change
    // (a retryable failure must allow a new attempt).
    this.results.delete(key);
    this.results.set(key, { outcome, seq: ++this.seq, remember: remember && (outcome.ok || !outcome.error.retryable) });
    while (this.results.size > REMEMBERED_RESULTS) this.results.delete(this.results.keys().next().value as string);
    const waiters = this.waiters.get(key) ?? [];
    this.waiters.delete(key);
    for (const w of waiters) {
      if (outcome.ok) w.resolve(outcome.tokens);
      else w.reject(outcome.error);
    }
  }

  private post(message: Message): void {
    if (this.closed) return;
    try {
      this.channel.postMessage(message);
    } catch {
      // A channel that cannot post (closed by the page) leaves this tab on its own; it still works alone.
    }
  }

  private receive(data: unknown): void {
    const m = parseMessage(data);
    if (!m || m.from === this.id || this.closed) return;
    switch (m.type) {
      case "claim":
        this.claimsOf(m.key).set(m.from, m.time);
        return;
      case "result":
        this.finish(m.key, { ok: true, tokens: m.tokens }, m.remember === true);
        this.emit({ type: "refreshed", key: m.key, tokens: m.tokens });
        return;
      case "failure": {
        const error = deserializeAuthError(m.failure);
        this.finish(m.key, { ok: false, error }, m.remember === true);
        this.emit({ type: "refresh-failed", key: m.key, error });
        return;
      }
      case "login":
        this.results.clear();
        this.emit({ type: "login", tokens: m.tokens });
        return;
      case "logout":
        this.results.clear();
        this.emit({ type: "logout" });
        return;
    }
  }

  private emit(event: PeerEvent): void {
    for (const listener of this.listeners) {
      try {
        listener(event);
      } catch {
        // One listener's bug must not stop the others from hearing about a refresh.
      }
    }
  }
}

/** The best coordinator this environment allows: Web Locks + BroadcastChannel, BroadcastChannel alone, or none. */
export function createCoordinator(options: CrossTabOptions = {}, defaultWaitTimeoutMs = 15_000): RefreshCoordinator {
  const channelName = options.channelName ?? "token-broker";
  let channel = options.channel;
  if (!channel) {
    const Channel = (globalThis as { BroadcastChannel?: new (name: string) => BroadcastChannelLike & { unref?: () => void } }).BroadcastChannel;
    if (!Channel) return localCoordinator();
    const created = new Channel(channelName);
    created.unref?.(); // Node: an open channel must not keep the process alive.
    channel = created;
  }
  const locks = options.locks === undefined ? defaultLocks() : options.locks;
  return new TabCoordinator(channel, {
    channelName,
    locks,
    claimWindowMs: options.claimWindowMs ?? 50,
    waitTimeoutMs: options.waitTimeoutMs ?? defaultWaitTimeoutMs,
  });
}

function defaultLocks(): LockManagerLike | null {
  const nav = (globalThis as { navigator?: { locks?: LockManagerLike } }).navigator;
  return nav?.locks && typeof nav.locks.request === "function" ? nav.locks : null;
}

function parseMessage(data: unknown): Message | null {
  if (typeof data !== "object" || data === null) return null;
  const m = data as Record<string, unknown>;
  if (m.v !== 1 || typeof m.from !== "string") return null;
  switch (m.type) {
    case "claim":
      return typeof m.key === "string" && typeof m.time === "number" ? (m as Message) : null;
    case "result":
    case "login":
      return (m.type === "login" || typeof m.key === "string") && isStoredTokens(m.tokens) ? (m as Message) : null;
    case "failure":
      return typeof m.key === "string" && typeof m.failure === "object" && m.failure !== null ? (m as Message) : null;
    case "logout":
      return m as Message;
    default:
      return null;
  }
}

function randomId(): string {
  const c = (globalThis as { crypto?: { randomUUID?: () => string } }).crypto;
  return c?.randomUUID ? c.randomUUID() : `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Node: a pending timer of the client must not keep the process alive. Browsers return a number. */
export function unrefTimer(timer: unknown): void {
  (timer as { unref?: () => void } | undefined)?.unref?.();
}
