/**
 * The client's errors: the class says what to do, `message` is for people (docs/frontend.md lists every `error`).
 *
 *     AuthError                  a call on a closed client (`client_closed`)
 *     ├── SessionExpiredError    the session is over (the refresh token was refused): log in again
 *     ├── RetryableAuthError     network error, timeout, 5xx, 408, 425, 429: tokens kept, try again later
 *     └── AuthRequestError       any other refusal (a wrong password, csrf_failed): not the end of the session
 */

/** Anything that fails in login, refresh, logout or the refresh behind `fetch`. */
export class AuthError extends Error {
  /** The broker's stable `error` code, or the client's own (`network_error`, `timeout`, ...; docs/frontend.md lists them). */
  readonly error: string;
  /** The HTTP status of the broker's answer; absent when there was none. */
  readonly status?: number;

  constructor(message: string, details: { error: string; status?: number; cause?: unknown }) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = new.target.name;
    this.error = details.error;
    this.status = details.status;
  }
}

/** The session is over (the refresh token was refused, or the user logged out meanwhile): send the user to log in. */
export class SessionExpiredError extends AuthError {}

/** The broker, Keycloak or the network is in trouble; the session may well be alive. Never a reason to log out. */
export class RetryableAuthError extends AuthError {
  /** Seconds to wait before trying again, from `Retry-After` (429, 503), when the broker said. */
  readonly retryAfter?: number;

  constructor(message: string, details: { error: string; status?: number; retryAfter?: number; cause?: unknown }) {
    super(message, details);
    this.retryAfter = details.retryAfter;
  }
}

/** The broker refused the request for a reason that trying again will not fix (and that does not end the session). */
export class AuthRequestError extends AuthError {
  declare readonly status: number;

  constructor(message: string, details: { error: string; status: number; cause?: unknown }) {
    super(message, details);
  }
}
