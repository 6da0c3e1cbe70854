/** The tokens the client keeps, how they are read from the broker's answers, and where they are kept. */

/** The broker's token object (`token` in the answers of login and refresh-token). */
export interface BrokerTokenResponse {
  access_token: string;
  refresh_token?: string;
  expires_in?: number;
  refresh_expires_in?: number;
  token_type?: string;
  scope?: string;
  id_token?: string;
}

/** The tokens as the client keeps them: plain JSON, with absolute times (epoch milliseconds). */
export interface StoredTokens {
  accessToken: string;
  /** Absent in cookie mode, where the refresh token lives in an HttpOnly cookie. */
  refreshToken?: string;
  /** When the access token expires, by this browser's clock (received at + expires_in). */
  expiresAt?: number;
  refreshExpiresAt?: number;
  /** When the client received these tokens; with expiresAt it gives the lifetime the broker granted. */
  receivedAt: number;
  tokenType?: string;
  scope?: string;
  idToken?: string;
}

/** Where tokens live. Synchronous on purpose: every request reads it. */
export interface TokenStorage {
  get(): StoredTokens | null;
  set(tokens: StoredTokens | null): void;
}

/** Tokens in this JavaScript context's memory only (the default): gone on reload, never on disk. */
export function memoryStorage(): TokenStorage {
  let tokens: StoredTokens | null = null;
  return { get: () => tokens, set: (next) => void (tokens = next) };
}

/** The part of the Web Storage API (sessionStorage, localStorage) that webStorage needs. */
export interface WebStorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/**
 * Tokens in a Web Storage object, e.g. `webStorage(sessionStorage)`: they survive a reload of the tab.
 * Anything that runs script on the page can read them; prefer memory (and cookie mode) where you can.
 */
export function webStorage(store: WebStorageLike, key = "token-broker.tokens"): TokenStorage {
  return {
    get: () => {
      try {
        const parsed: unknown = JSON.parse(store.getItem(key) ?? "null");
        return isStoredTokens(parsed) ? parsed : null;
      } catch {
        return null; // not JSON: not ours
      }
    },
    set: (tokens) => (tokens === null ? store.removeItem(key) : store.setItem(key, JSON.stringify(tokens))),
  };
}

/** Does `value` look like StoredTokens (what storage and the other tabs hand over)? */
export function isStoredTokens(value: unknown): value is StoredTokens {
  if (typeof value !== "object" || value === null) return false;
  const v = value as Record<string, unknown>;
  return (
    typeof v.accessToken === "string" &&
    v.accessToken !== "" &&
    typeof v.receivedAt === "number" &&
    (v.refreshToken === undefined || typeof v.refreshToken === "string") &&
    (v.expiresAt === undefined || typeof v.expiresAt === "number")
  );
}

/** StoredTokens from the broker's token object; null when it has no usable access token. */
export function fromTokenResponse(token: unknown, now: number): StoredTokens | null {
  if (typeof token !== "object" || token === null) return null;
  const t = token as Record<string, unknown>;
  if (typeof t.access_token !== "string" || t.access_token === "") return null;
  const after = (v: unknown) => (typeof v === "number" && Number.isFinite(v) && v > 0 ? now + v * 1000 : undefined);
  const text = (v: unknown) => (typeof v === "string" && v !== "" ? v : undefined);
  return {
    accessToken: t.access_token,
    refreshToken: text(t.refresh_token),
    expiresAt: after(t.expires_in),
    refreshExpiresAt: after(t.refresh_expires_in),
    receivedAt: now,
    tokenType: text(t.token_type),
    scope: text(t.scope),
    idToken: text(t.id_token),
  };
}
