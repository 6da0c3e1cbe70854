/** The client against a fake broker: refresh once, retry once, and never a logout for a 5xx or a network error. */

import assert from "node:assert/strict";
import { after, afterEach, before, beforeEach, describe, it } from "node:test";

import {
  AuthClient,
  rejectsAccessToken,
  RetryableAuthError,
  SessionExpiredError,
  webStorage,
  type AuthClientOptions,
  type StoredTokens,
} from "../../src/index.js";
import { FakeBroker, recordingFetch, sleep } from "../support/fake-broker.js";
import { deferred, seen } from "../support/helpers.js";

let broker: FakeBroker;
let clients: AuthClient[] = [];

before(async () => {
  broker = await new FakeBroker().start();
});
after(async () => {
  await broker.stop();
});
beforeEach(() => {
  broker.calls.length = 0;
  broker.refresh = "ok";
  broker.logout = "ok";
  broker.login = "ok";
  broker.expiresIn = 300;
  broker.refreshDelayMs = 30;
  broker.cookieMode = false;
  broker.graceMs = 0;
});
afterEach(() => {
  for (const c of clients) c.close();
  clients = [];
});

function client(options: AuthClientOptions = {}): AuthClient {
  const c = new AuthClient({ baseUrl: broker.url, crossTab: false, ...options });
  clients.push(c);
  return c;
}

/** A client holding a live session whose access token the broker refuses (`garbage`, as after a restart of Keycloak's keys). */
function withRejectedAccessToken(options: AuthClientOptions = {}): AuthClient {
  const c = client(options);
  const token = broker.issue();
  c.setTokens({ ...token, access_token: "garbage" });
  return c;
}

describe("attaching and refreshing", () => {
  it("sends the access token to the broker's origin", async () => {
    const c = client();
    const tokens = await c.login("alice", "alice-password");
    const response = await c.fetch("/api/data");
    assert.equal(response.status, 200);
    assert.equal(((await response.json()) as { token: string }).token, tokens.accessToken);
  });

  it("does not send the access token to another origin", async () => {
    const other = await new FakeBroker().start();
    try {
      const c = client();
      await c.login("alice", "alice-password");
      const response = await c.fetch(`${other.url}/api/data`);
      assert.equal(response.status, 401);
      assert.equal(other.calls[0]!.headers.authorization, undefined);
    } finally {
      await other.stop();
    }
  });

  it("leaves a request alone that brings its own Authorization header", async () => {
    const c = withRejectedAccessToken();
    const response = await c.fetch("/api/data", { headers: { Authorization: "Bearer mine" } });
    assert.equal(response.status, 401);
    assert.equal(broker.refreshCount(), 0);
  });

  it("refreshes once on a 401 with X-Token-Expired and retries the request once", async () => {
    broker.expiresIn = 0.2;
    const c = client({ proactiveRefresh: false });
    await c.login("alice", "alice-password");
    broker.expiresIn = 300;
    await sleep(250);
    // The client's own clock says expired too, so it refreshes before sending; make it believe otherwise.
    c.setTokens({ ...c.getTokens()!, expiresAt: Date.now() + 60_000 });
    const response = await c.fetch("/api/data");
    assert.equal(response.status, 200);
    assert.equal(broker.refreshCount(), 1);
    assert.deepEqual(
      broker.calls.filter((x) => x.path === "/api/data").map((x) => x.headers.authorization !== undefined),
      [true, true],
    );
  });

  it("refreshes once on a 401 invalid_token (a garbage access token) and retries once", async () => {
    const c = withRejectedAccessToken();
    const response = await c.fetch("/api/data");
    assert.equal(response.status, 200);
    assert.equal(broker.refreshCount(), 1);
    assert.equal(broker.count("/api/data", "GET"), 2);
  });

  it("refreshes before sending when the access token has already expired by the client's clock", async () => {
    const c = client({ proactiveRefresh: false });
    const tokens = broker.issue();
    c.setTokens({ ...tokens, expires_in: 0.001 });
    await sleep(5);
    const response = await c.fetch("/api/data");
    assert.equal(response.status, 200);
    assert.equal(broker.refreshCount(), 1);
    assert.equal(broker.count("/api/data", "GET"), 1, "no request went out with the expired token");
  });

  it("returns the second 401 as it is: no second refresh, no logout", async () => {
    let expired = 0;
    const c = withRejectedAccessToken({ onSessionExpired: () => expired++ });
    broker.refresh = { status: 200, body: { message: "Token refreshed successfully", token: { access_token: "still-garbage", refresh_token: "rt-x", expires_in: 300 } } };
    const response = await c.fetch("/api/data");
    assert.equal(response.status, 401);
    assert.equal(c.getTokens()?.accessToken, "still-garbage");
    assert.equal(broker.refreshCount(), 1);
    assert.equal(expired, 0);
  });

  it("does not refresh on other answers: 401 access_token_required, 403, 404, 500", async () => {
    const c = client();
    assert.equal((await c.fetch("/api/data")).status, 401); // no tokens at all
    await c.login("alice", "alice-password");
    assert.equal((await c.fetch("/api/nothing")).status, 404);
    assert.equal(broker.refreshCount(), 0);
  });

  it("replays the request body on the retry", async () => {
    const c = withRejectedAccessToken();
    const response = await c.fetch("/api/data", { method: "POST", body: JSON.stringify({ n: 42 }), headers: { "Content-Type": "application/json" } });
    assert.equal(response.status, 200);
    assert.deepEqual(await response.json(), { ok: true, token: c.getTokens()!.accessToken, method: "POST", body: '{"n":42}' });
  });

  it("replays the body of a Request given as input, and keeps its method and headers", async () => {
    const c = withRejectedAccessToken();
    const response = await c.fetch(new Request(`${broker.url}/api/data/x`, { method: "PUT", body: "plain text", headers: { "X-Mine": "1" } }));
    assert.deepEqual(await response.json(), { ok: true, token: c.getTokens()!.accessToken, method: "PUT", body: "plain text" });
    const sent = broker.calls.filter((x) => x.path === "/api/data/x");
    assert.deepEqual(sent.map((x) => [x.method, x.body, x.headers["x-mine"]]), [["PUT", "plain text", "1"], ["PUT", "plain text", "1"]]);
  });

  it("posts the refresh token as JSON and never routes the refresh through its own interceptor", async () => {
    const recorder = recordingFetch();
    const c = withRejectedAccessToken({ fetch: recorder.fetch });
    const rt = c.getTokens()!.refreshToken;
    await c.fetch("/api/data");
    const refresh = recorder.requests.find((r) => r.url.endsWith("/api/auth/refresh-token"))!;
    assert.equal(refresh.headers.get("Content-Type"), "application/json");
    assert.equal(refresh.headers.get("Authorization"), null);
    assert.deepEqual(await refresh.json(), { refresh_token: rt });
  });
});

describe("which answers mean 'refresh and retry'", () => {
  const json = { "Content-Type": "application/json" };
  const cases: [string, Response, boolean][] = [
    ["401 with X-Token-Expired: true and no body", new Response(null, { status: 401, headers: { "X-Token-Expired": "true" } }), true],
    ["401 with WWW-Authenticate error=invalid_token", new Response(null, { status: 401, headers: { "WWW-Authenticate": 'Bearer realm="x", error="invalid_token"' } }), true],
    ["401 with invalid_token in the body only (a cross-origin page sees no custom headers)", new Response('{"error":"invalid_token","message":"x"}', { status: 401, headers: json }), true],
    ["401 access_token_required", new Response('{"error":"access_token_required","message":"x"}', { status: 401, headers: { ...json, "WWW-Authenticate": 'Bearer realm="x"' } }), false],
    ["401 without a body", new Response(null, { status: 401 }), false],
    ["401 with HTML", new Response("<html>invalid_token</html>", { status: 401, headers: { "Content-Type": "text/html" } }), false],
    ["403 invalid_token", new Response('{"error":"invalid_token","message":"x"}', { status: 403, headers: json }), false],
  ];
  for (const [name, response, expected] of cases) {
    it(`${name}: ${expected ? "yes" : "no"}`, async () => {
      assert.equal(await rejectsAccessToken(response), expected);
      assert.equal(response.bodyUsed, false, "the caller's body stays unread");
    });
  }
});

describe("single flight", () => {
  it("makes any number of concurrent 401s cause one refresh, and retries them all", async () => {
    const c = withRejectedAccessToken();
    const responses = await Promise.all(Array.from({ length: 25 }, () => c.fetch("/api/data")));
    assert.deepEqual(new Set(responses.map((r) => r.status)), new Set([200]));
    assert.equal(broker.refreshCount(), 1);
    assert.equal(broker.count("/api/data", "GET"), 50);
  });

  it("rejects every waiting request together when the refresh fails, and none hangs", async () => {
    const c = withRejectedAccessToken();
    broker.refresh = { status: 503, body: { error: "upstream_unavailable", message: "The identity provider cannot be reached; try again later" }, headers: { "Retry-After": "5" }, delayMs: 50 };
    const results = await Promise.allSettled(Array.from({ length: 10 }, () => c.fetch("/api/data")));
    assert.equal(broker.refreshCount(), 1);
    for (const r of results) {
      assert.equal(r.status, "rejected");
      assert.ok((r as PromiseRejectedResult).reason instanceof RetryableAuthError);
    }
    assert.equal(new Set(results.map((r) => (r as PromiseRejectedResult).reason)).size, 1, "one error for all");
  });

  it("a refresh() while one is under way joins it", async () => {
    const c = withRejectedAccessToken();
    const [a, b] = await Promise.all([c.refresh(), c.refresh()]);
    assert.equal(a, b);
    assert.equal(broker.refreshCount(), 1);
  });
});

describe("abort", () => {
  it("an aborted request stops waiting for the refresh; the refresh goes on for the others", async () => {
    const sent = deferred();
    const c = client({
      proactiveRefresh: false,
      fetch: (input, init) => {
        if (input instanceof Request && input.url.endsWith("/api/auth/refresh-token")) sent.resolve();
        return fetch(input, init);
      },
    });
    const { refresh_token } = broker.issue();
    c.setTokens({ accessToken: "at-old", refreshToken: refresh_token, receivedAt: Date.now() - 300_000, expiresAt: Date.now() - 1 });
    broker.refreshDelayMs = 100;
    const controller = new AbortController();
    // Expired by the client's clock: both wait for one refresh before they are sent.
    const other = c.fetch("/api/data");
    const aborted = c.fetch("/api/data", { signal: controller.signal });
    await sent.promise;
    controller.abort(new Error("the user went elsewhere"));
    await assert.rejects(aborted, { message: "the user went elsewhere" });
    assert.equal((await other).status, 200);
    assert.equal(broker.refreshCount(), 1);
    assert.deepEqual(broker.calls.filter((x) => x.path === "/api/data").map((x) => x.headers.authorization), [`Bearer ${c.getTokens()!.accessToken}`]);
  });

  it("a signal aborted before the call rejects it as fetch would", async () => {
    const c = withRejectedAccessToken();
    const controller = new AbortController();
    controller.abort();
    await assert.rejects(c.fetch("/api/data", { signal: controller.signal }), { name: "AbortError" });
    assert.equal(broker.refreshCount(), 0);
  });
});

describe("failures that must not log the user out", () => {
  it("keeps the tokens and rejects with a retryable error when refresh answers 503", async () => {
    let expired = 0;
    const c = withRejectedAccessToken({ onSessionExpired: () => expired++ });
    const before = c.getTokens();
    broker.refresh = { status: 503, body: { error: "upstream_unavailable", message: "The identity provider cannot be reached; try again later" }, headers: { "Retry-After": "5" } };
    const err = await c.fetch("/api/data").catch((e: unknown) => e);
    assert.deepEqual(seen(err), {
      class: "RetryableAuthError",
      error: "upstream_unavailable",
      status: 503,
      message: "The identity provider cannot be reached; try again later",
      retryAfter: 5,
    });
    assert.deepEqual(c.getTokens(), before);
    assert.equal(expired, 0);
    broker.refresh = "ok"; // the broker is back: the kept refresh token still works
    assert.equal((await c.fetch("/api/data")).status, 200);
  });

  for (const [status, error, retryAfter] of [
    [500, "internal_error", undefined],
    [502, "upstream_error", undefined],
    [504, "upstream_timeout", undefined], // the broker's ANSWER_KEPT: retry with the same refresh token
    [429, "rate_limited", "30"],
    [408, "request_timeout", undefined],
  ] as const) {
    it(`keeps the tokens on ${status} ${error} from refresh`, async () => {
      const c = withRejectedAccessToken();
      const before = c.getTokens();
      broker.refresh = { status, body: { error, message: "x" }, headers: retryAfter ? { "Retry-After": retryAfter } : {} };
      const err = await c.fetch("/api/data").catch((e: unknown) => e);
      assert.deepEqual(seen(err), { class: "RetryableAuthError", error, status, message: "x", retryAfter: retryAfter && Number(retryAfter) });
      assert.deepEqual(c.getTokens(), before);
    });
  }

  it("an answer without the broker's error shape is http_<status>", async () => {
    const c = withRejectedAccessToken();
    broker.refresh = { status: 502, body: "<html>Bad gateway</html>" };
    assert.deepEqual(seen(await c.fetch("/api/data").catch((e: unknown) => e)), {
      class: "RetryableAuthError",
      error: "http_502",
      status: 502,
      message: "The broker answered 502",
      retryAfter: undefined,
    });
    broker.login = { status: 404, body: "<html>Not here</html>" };
    assert.deepEqual(seen(await c.login("alice", "pw").catch((e: unknown) => e)), {
      class: "AuthRequestError",
      error: "http_404",
      status: 404,
      message: "The broker answered 404",
    });
  });

  it("keeps the tokens and rejects with a retryable error on a network error", async () => {
    const c = withRejectedAccessToken();
    const before = c.getTokens();
    broker.refresh = "destroy";
    const err = await c.fetch("/api/data").catch((e: unknown) => e);
    assert.deepEqual(seen(err), { class: "RetryableAuthError", error: "network_error", status: undefined, message: "The broker could not be reached", retryAfter: undefined });
    assert.deepEqual(c.getTokens(), before);
  });

  it("keeps the tokens and rejects with a retryable error when the refresh times out", async () => {
    const c = withRejectedAccessToken({ requestTimeoutMs: 200 });
    const before = c.getTokens();
    broker.refresh = "hang";
    const err = await c.fetch("/api/data").catch((e: unknown) => e);
    assert.deepEqual(seen(err), { class: "RetryableAuthError", error: "timeout", status: undefined, message: "The broker did not answer in time", retryAfter: undefined });
    assert.deepEqual(c.getTokens(), before);
  });

  it("anything else that breaks a refresh (here the lock manager) is refresh_failed, with the cause", async () => {
    const denied = new Error("SecurityError: locks are not allowed in this frame");
    const c = withRejectedAccessToken({ crossTab: { channel: null, locks: { request: () => Promise.reject(denied) } } });
    const before = c.getTokens();
    const err = await c.fetch("/api/data").catch((e: unknown) => e);
    assert.deepEqual(seen(err), { class: "RetryableAuthError", error: "refresh_failed", status: undefined, message: "The refresh failed", retryAfter: undefined });
    assert.equal((err as Error).cause, denied);
    assert.deepEqual(c.getTokens(), before);
  });

  it("keeps the tokens when the broker is not there at all", async () => {
    const gone = await new FakeBroker().start();
    const url = gone.url;
    await gone.stop();
    const c = client({ baseUrl: url });
    c.setTokens({ access_token: "a", refresh_token: "r", expires_in: 0.001 });
    await sleep(5);
    const err = await c.refresh().catch((e: unknown) => e);
    assert.equal(seen(err).error, "network_error");
    assert.ok(err instanceof RetryableAuthError);
    assert.equal(c.getTokens()?.refreshToken, "r");
  });

  it("keeps the tokens on an answer it cannot use (200 without a token, HTML)", async () => {
    const c = withRejectedAccessToken();
    const before = c.getTokens();
    broker.refresh = { status: 200, body: "<html>portal</html>" };
    const err = await c.fetch("/api/data").catch((e: unknown) => e);
    assert.deepEqual(seen(err), { class: "RetryableAuthError", error: "invalid_response", status: 200, message: "The broker's answer had no usable token", retryAfter: undefined });
    assert.deepEqual(c.getTokens(), before);
  });

  it("keeps the tokens on a refusal that is the client's bug, not the session's end", async () => {
    const c = withRejectedAccessToken();
    const before = c.getTokens();
    broker.refresh = { status: 400, body: { error: "invalid_request", message: "The request body is not valid" } };
    const err = await c.fetch("/api/data").catch((e: unknown) => e);
    assert.deepEqual(seen(err), { class: "AuthRequestError", error: "invalid_request", status: 400, message: "The request body is not valid" });
    assert.deepEqual(c.getTokens(), before);
  });
});

describe("the end of a session", () => {
  it("invalid_grant from refresh: onSessionExpired once, every request rejected with SessionExpiredError, tokens cleared", async () => {
    const expired: SessionExpiredError[] = [];
    const c = withRejectedAccessToken({ onSessionExpired: (e) => expired.push(e) });
    broker.refresh = { status: 400, body: { error: "invalid_grant", message: "Refresh token expired" }, delayMs: 30 };
    const results = await Promise.allSettled(Array.from({ length: 5 }, () => c.fetch("/api/data")));
    assert.equal(expired.length, 1);
    assert.deepEqual(seen(expired[0]), { class: "SessionExpiredError", error: "invalid_grant", status: 400, message: "Refresh token expired" });
    assert.deepEqual(results, Array.from({ length: 5 }, () => ({ status: "rejected", reason: expired[0] })), "the same error for every request");
    assert.equal(c.getTokens(), null);
    assert.equal(broker.refreshCount(), 1);
  });

  it("a refresh token that was spent elsewhere ends the session (the fake rotates like Keycloak)", async () => {
    let expired = 0;
    const c = client({ onSessionExpired: () => expired++ });
    const token = broker.issue();
    c.setTokens({ ...token, access_token: "garbage" });
    const other = client();
    other.setTokens({ ...token, access_token: "garbage" });
    assert.equal((await other.fetch("/api/data")).status, 200); // spends the refresh token
    await assert.rejects(c.fetch("/api/data"), SessionExpiredError);
    assert.equal(expired, 1);
  });

  it("logout forgets the tokens, tells the broker, and calls onLogout", async () => {
    let loggedOut = 0;
    const seen: (StoredTokens | null)[] = [];
    const c = client({ onLogout: () => loggedOut++, onTokens: (t) => seen.push(t) });
    const tokens = await c.login("alice", "pw");
    await c.logout();
    assert.equal(c.getTokens(), null);
    assert.equal(loggedOut, 1);
    assert.deepEqual(seen, [tokens, null]);
    const call = broker.calls.find((x) => x.path === "/api/auth/logout")!;
    assert.deepEqual(JSON.parse(call.body), { refresh_token: tokens.refreshToken });
  });

  it("logout forgets the tokens even when the broker cannot be told, and says so", async () => {
    const c = client();
    await c.login("alice", "pw");
    broker.logout = { status: 503, body: { error: "upstream_unavailable", message: "x" } };
    await assert.rejects(c.logout(), RetryableAuthError);
    assert.equal(c.getTokens(), null);
  });

  it("a refresh that finishes after logout does not bring the tokens back: its callers get logged_out", async () => {
    const c = withRejectedAccessToken();
    broker.refreshDelayMs = 150;
    const pending = c.refresh();
    await broker.refreshed(1);
    await c.logout();
    assert.deepEqual(seen(await pending.catch((e: unknown) => e)), { class: "SessionExpiredError", error: "logged_out", status: undefined, message: "Logged out" });
    assert.equal(c.getTokens(), null);
  });

  it("refresh() without a session: no_session, and no call to the broker", async () => {
    const c = client();
    assert.deepEqual(seen(await c.refresh().catch((e: unknown) => e)), {
      class: "SessionExpiredError",
      error: "no_session",
      status: undefined,
      message: "There is no session to refresh",
    });
    assert.equal(broker.calls.length, 0);
  });

  it("login refused: AuthRequestError with the broker's code and message", async () => {
    const c = client();
    broker.login = { status: 401, body: { error: "invalid_grant", message: "Invalid username or password" } };
    const err = await c.login("alice", "wrong").catch((e: unknown) => e);
    assert.deepEqual(seen(err), { class: "AuthRequestError", error: "invalid_grant", status: 401, message: "Invalid username or password" });
    assert.equal(c.getTokens(), null);
  });
});

describe("a closed client", () => {
  it("rejects every call with client_closed, and a refresh under way too; storage keeps what it had", async () => {
    const c = withRejectedAccessToken();
    const before = c.getTokens();
    broker.refreshDelayMs = 100;
    const pending = c.refresh();
    await broker.refreshed(1);
    c.close();
    const closed = { class: "AuthError", error: "client_closed", status: undefined, message: "The client was closed" };
    assert.deepEqual(seen(await pending.catch((e: unknown) => e)), closed);
    for (const call of [() => c.fetch("/api/data"), () => c.refresh(), () => c.login("alice", "pw"), () => c.logout()]) {
      assert.deepEqual(seen(await call().catch((e: unknown) => e)), closed);
    }
    assert.deepEqual(c.getTokens(), before);
    assert.equal(broker.count("/api/auth/login"), 0);
    assert.equal(broker.refreshCount(), 1);
  });
});

describe("proactive refresh", () => {
  it("refreshes shortly before expires_in runs out, so requests never see a 401", async () => {
    broker.expiresIn = 2; // lead 667 ms: a loaded machine's late timer still fires before the expiry
    const c = client({ refreshJitterMs: 100 });
    const first = await c.login("alice", "pw");
    const twoRefreshes = broker.refreshed(2).then(() => true);
    const statuses: number[] = [];
    while (!(await Promise.race([twoRefreshes, sleep(50).then(() => false)]))) statuses.push((await c.fetch("/api/data")).status);
    assert.ok(statuses.length > 0);
    assert.deepEqual(new Set(statuses), new Set([200]));
    assert.equal(broker.count("/api/data", "GET"), statuses.length, "no request was sent twice (no 401)");
    assert.notEqual(c.getTokens()!.accessToken, first.accessToken);
  });

  it("schedules within [lifetime - lead - jitter, lifetime - lead]", async () => {
    broker.expiresIn = 2; // lead = min(30 s, 2 s / 3) = 667 ms; jitter <= min(10 s, 2 s / 10) = 200 ms
    const c = client();
    const t0 = Date.now();
    await c.login("alice", "pw");
    await broker.refreshed(1);
    const elapsed = Date.now() - t0;
    // Timers never fire early, but a loaded machine may fire them late: the bound that matters above is
    // "before the token expires" (2000 ms), not the scheduled 1333 ms.
    assert.ok(elapsed >= 1100 && elapsed < 2000, `refresh after ${elapsed} ms (scheduled 1133..1333 ms after login)`);
  });

  it("retries a proactive refresh that failed with a retryable error, keeping the tokens", async () => {
    broker.expiresIn = 1;
    let expired = 0;
    let onTokens = (_tokens: StoredTokens | null) => {};
    const c = client({ retryDelayMs: 100, onSessionExpired: () => expired++, onTokens: (t) => onTokens(t) });
    const tokens = await c.login("alice", "pw");
    broker.refresh = { status: 503, body: { error: "upstream_unavailable", message: "x" } };
    await broker.refreshed(2);
    assert.deepEqual(c.getTokens(), tokens);
    const refreshed = deferred<StoredTokens | null>();
    onTokens = refreshed.resolve;
    broker.refresh = "ok";
    const fresh = await refreshed.promise;
    assert.notEqual(fresh?.accessToken, tokens.accessToken);
    assert.equal(broker.refreshCount(), 3);
    assert.equal(expired, 0);
  });

  it("ends the session when a proactive refresh gets invalid_grant", async () => {
    broker.expiresIn = 0.4;
    const expired = deferred<SessionExpiredError>();
    const c = client({ onSessionExpired: expired.resolve });
    await c.login("alice", "pw");
    broker.refresh = { status: 400, body: { error: "invalid_grant", message: "Session has ended" } };
    assert.deepEqual(seen(await expired.promise), { class: "SessionExpiredError", error: "invalid_grant", status: 400, message: "Session has ended" });
    assert.equal(c.getTokens(), null);
  });

  it("can be switched off", async () => {
    broker.expiresIn = 0.3;
    const c = client({ proactiveRefresh: false });
    await c.login("alice", "pw");
    await sleep(500);
    assert.equal(broker.refreshCount(), 0);
  });
});

describe("cookie mode", () => {
  it("refreshes with credentials, the CSRF header and an empty body, and keeps no refresh token", async () => {
    broker.cookieMode = true;
    const recorder = recordingFetch();
    const c = client({ transport: "cookie", fetch: recorder.fetch });
    const tokens = await c.login("alice", "pw");
    assert.equal(tokens.refreshToken, undefined);
    c.setTokens({ ...tokens, accessToken: "garbage" });
    assert.equal((await c.fetch("/api/data")).status, 200);
    const refresh = recorder.requests.find((r) => r.url.endsWith("/api/auth/refresh-token"))!;
    assert.equal(refresh.credentials, "include");
    assert.equal(refresh.headers.get("X-Requested-With"), "XMLHttpRequest");
    assert.deepEqual(await refresh.json(), {});
    const login = recorder.requests.find((r) => r.url.endsWith("/api/auth/login"))!;
    assert.equal(login.credentials, "include");
    assert.equal(c.getTokens()!.refreshToken, undefined);
  });

  it("sends a configured CSRF header on login, refresh and logout", async () => {
    broker.cookieMode = true;
    broker.csrfHeader = { name: "x-csrf", value: "1" };
    try {
      const recorder = recordingFetch();
      const c = client({ transport: "cookie", csrfHeader: { name: "X-CSRF", value: "1" }, fetch: recorder.fetch });
      await c.login("alice", "pw");
      await c.refresh();
      await c.logout();
      for (const path of ["/api/auth/login", "/api/auth/refresh-token", "/api/auth/logout"]) {
        const r = recorder.requests.find((x) => x.url.endsWith(path))!;
        assert.equal(r.headers.get("X-CSRF"), "1", path);
        assert.equal(r.credentials, "include", path);
        assert.equal(r.headers.get("X-Requested-With"), null, path);
      }
      assert.deepEqual(recorder.statuses.map((s) => s.status), [200, 200, 200]);
    } finally {
      broker.csrfHeader = { name: "x-requested-with", value: "XMLHttpRequest" };
    }
  });

  it("a missing CSRF proof (403 csrf_failed) is a refusal, not the end of the session", async () => {
    broker.cookieMode = true;
    let expired = 0;
    const tokens = await client({ transport: "cookie" }).login("alice", "pw");
    const c = client({ transport: "cookie", csrfHeader: { name: "X-Other", value: "no" }, onSessionExpired: () => expired++ });
    c.setTokens(tokens);
    const err = await c.refresh().catch((e: unknown) => e);
    assert.deepEqual(seen(err), { class: "AuthRequestError", error: "csrf_failed", status: 403, message: "The request lacks the CSRF proof" });
    assert.deepEqual(c.getTokens(), tokens);
    assert.equal(expired, 0);
  });

  it("picks a session up from the cookie after a reload: refresh() without tokens", async () => {
    broker.cookieMode = true;
    const first = client({ transport: "cookie" });
    await first.login("alice", "pw");
    const reloaded = client({ transport: "cookie" });
    const tokens = await reloaded.refresh();
    assert.equal((await reloaded.fetch("/api/data")).status, 200);
    assert.equal(tokens.refreshToken, undefined);
  });

  it("concurrent 401s in cookie mode cause one refresh too", async () => {
    broker.cookieMode = true;
    const c = client({ transport: "cookie" });
    const tokens = await c.login("alice", "pw");
    c.setTokens({ ...tokens, accessToken: "garbage" });
    const responses = await Promise.all(Array.from({ length: 10 }, () => c.fetch("/api/data")));
    assert.deepEqual(new Set(responses.map((r) => r.status)), new Set([200]));
    assert.equal(broker.refreshCount(), 1);
  });
});

describe("where tokens live", () => {
  it("webStorage keeps them across a reload, and ignores what is not its own", async () => {
    const data = new Map<string, string>();
    const store = { getItem: (k: string) => data.get(k) ?? null, setItem: (k: string, v: string) => void data.set(k, v), removeItem: (k: string) => void data.delete(k) };
    const tokens = await client({ storage: webStorage(store) }).login("alice", "pw");
    const reloaded = client({ storage: webStorage(store) });
    assert.deepEqual(reloaded.getTokens(), JSON.parse(JSON.stringify(tokens)));
    assert.equal((await reloaded.fetch("/api/data")).status, 200);
    data.set("token-broker.tokens", "{not json");
    assert.equal(reloaded.getTokens(), null);
    data.set("token-broker.tokens", JSON.stringify({ accessToken: 42 }));
    assert.equal(reloaded.getTokens(), null);
  });

  it("outside a browser page, clients do not share tokens by default (a server's clients belong to different users)", async () => {
    const a = new AuthClient({ baseUrl: broker.url });
    const b = new AuthClient({ baseUrl: broker.url });
    clients.push(a, b);
    await a.login("alice", "pw");
    await sleep(30);
    assert.equal(b.getTokens(), null);
  });
});
