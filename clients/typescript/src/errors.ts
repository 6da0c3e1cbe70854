/**
 * The client's error tree. Program against the class (or `retryable`), show `message` to people.
 *
 *     AuthError                     retryable  when
 *     ├── SessionExpiredError        false     refresh refused (invalid_grant, no refresh token, location_blocked):
 *     │                                        the session is over; tokens are cleared, onSessionExpired ran
 *     ├── RetryableAuthError         true      network error, timeout, 5xx, 408, 429, an unusable answer:
 *     │                                        tokens are kept; try again later (after `retryAfter` if set)
 *     └── AuthRequestError           false     any other refusal (a wrong password at login, a client bug such
 *                                              as 400 invalid_request, 403 csrf_failed); tokens are kept
 */

/** Anything that fails in login, refresh, logout or the refresh behind `fetch`. */
export class AuthError extends Error {
  /** The broker's stable `error` code, or the client's own (`network_error`, `timeout`, `invalid_response`, ...). */
  readonly error: string;
  /** The HTTP status of the broker's answer; absent when there was none (network error, timeout). */
  readonly status?: number;
  /** True when trying again later may succeed: the session is still alive and the tokens are kept. */
  readonly retryable: boolean;
  /** Seconds to wait before trying again, from `Retry-After` (429, 503), when the broker said. */
  readonly retryAfter?: number;

  constructor(
    message: string,
    details: { error: string; status?: number; retryable: boolean; retryAfter?: number; cause?: unknown },
  ) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = new.target.name;
    this.error = details.error;
    this.status = details.status;
    this.retryable = details.retryable;
    this.retryAfter = details.retryAfter;
  }
}

/** The session is over (the refresh token was refused): send the user to log in. */
export class SessionExpiredError extends AuthError {
  constructor(message: string, details: { error: string; status?: number; cause?: unknown }) {
    super(message, { ...details, retryable: false });
  }
}

/** The broker, Keycloak or the network is in trouble; the session may well be alive. Never a reason to log out. */
export class RetryableAuthError extends AuthError {
  constructor(message: string, details: { error: string; status?: number; retryAfter?: number; cause?: unknown }) {
    super(message, { ...details, retryable: true });
  }
}

/** The broker refused the request for a reason that trying again will not fix (and that does not end the session). */
export class AuthRequestError extends AuthError {
  constructor(message: string, details: { error: string; status: number; cause?: unknown }) {
    super(message, { ...details, retryable: false });
  }
}

/** What travels between tabs to rebuild an AuthError on the other side. */
export interface SerializedAuthError {
  kind: "session_expired" | "retryable" | "request";
  message: string;
  error: string;
  status?: number;
  retryAfter?: number;
}

export function serializeAuthError(err: unknown): SerializedAuthError {
  if (err instanceof SessionExpiredError) {
    return { kind: "session_expired", message: err.message, error: err.error, status: err.status };
  }
  if (err instanceof AuthRequestError) {
    return { kind: "request", message: err.message, error: err.error, status: err.status };
  }
  if (err instanceof AuthError) {
    return { kind: "retryable", message: err.message, error: err.error, status: err.status, retryAfter: err.retryAfter };
  }
  return { kind: "retryable", message: "The refresh failed in another tab", error: "refresh_failed" };
}

export function deserializeAuthError(data: SerializedAuthError): AuthError {
  switch (data.kind) {
    case "session_expired":
      return new SessionExpiredError(data.message, { error: data.error, status: data.status });
    case "request":
      return new AuthRequestError(data.message, { error: data.error, status: data.status ?? 400 });
    default:
      return new RetryableAuthError(data.message, { error: data.error, status: data.status, retryAfter: data.retryAfter });
  }
}
