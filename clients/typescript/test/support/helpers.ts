/** Small helpers the tests share. */

import assert from "node:assert/strict";

import { AuthError, RetryableAuthError } from "../../src/index.js";

/** An error as the caller sees it: its class and every field, for comparing whole. */
export function seen(err: unknown): Record<string, unknown> {
  assert.ok(err instanceof AuthError, `an AuthError, not ${String(err)}`);
  const fields = { class: err.constructor.name, error: err.error, status: err.status, message: err.message };
  return err instanceof RetryableAuthError ? { ...fields, retryAfter: err.retryAfter } : fields;
}

/** A promise and the function that resolves it: what a test waits on instead of a clock. */
export function deferred<T = void>(): { promise: Promise<T>; resolve: (value: T) => void } {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}
