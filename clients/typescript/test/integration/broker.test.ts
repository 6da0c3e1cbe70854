/**
 * The client against the real broker and the real Keycloak (the shipped realm: refresh-token rotation on,
 * so a refresh token spent twice ends the session). The protected resource is GET /api/auth/me.
 */

import assert from "node:assert/strict";
import { after, before, describe, it, test } from "node:test";

import { AuthClient, SessionExpiredError, type AuthClientOptions, type StoredTokens } from "../../src/index.js";
import { FakeBrowser } from "../support/fake-browser.js";
import { seen } from "../support/helpers.js";
import { CI, CLIENT_SECRET, KeycloakUnavailable, startStack, type Stack } from "../support/stack.js";

let stack: Stack | undefined;
let unavailable: string | undefined;
try {
  stack = await startStack();
} catch (err) {
  if (!(err instanceof KeycloakUnavailable)) throw err;
  unavailable = err.message;
}

if (unavailable && CI) {
  test("the real Keycloak and broker start", () => {
    assert.fail(unavailable); // under CI a missing Keycloak is a failure, never a skip
  });
}

after(async () => {
  await stack?.stop();
});

const ME = "/api/auth/me";
/** Seconds. Keycloak counts whole seconds (its exp may come up to 1 s before receipt + expires_in), so not less. */
const LIFESPAN = 5;
const REFRESH = "/api/auth/refresh-token";

type Fetch = (input: Request | string | URL, init?: RequestInit) => Promise<Response>;

/** A fetch that counts, by path, what the client sends, and records every status it gets back. */
function countingFetch(inner: Fetch = fetch) {
  const sent = new Map<string, number>();
  const statuses: { path: string; status: number }[] = [];
  return {
    sent: (path: string) => sent.get(path) ?? 0,
    statuses,
    fetch: async (input: Request | string | URL, init?: RequestInit) => {
      const request = input instanceof Request && !init ? input : new Request(input, init);
      const path = new URL(request.url).pathname;
      sent.set(path, (sent.get(path) ?? 0) + 1);
      const response = await inner(request);
      statuses.push({ path, status: response.status });
      return response;
    },
  };
}

const clients: AuthClient[] = [];
function client(options: AuthClientOptions = {}): AuthClient {
  const c = new AuthClient({ baseUrl: stack!.brokerUrl, crossTab: false, ...options });
  clients.push(c);
  return c;
}

/**
 * One browser's cookie jar for the broker's refresh cookie. Like a browser serving a page from another
 * origin, it sends the cookie only with `credentials: "include"`, only under the cookie's path; it follows
 * Set-Cookie, including deletion. (It ignores `Secure`: the test broker speaks plain HTTP.)
 */
function cookieJar() {
  const cookies = new Map<string, string>();
  const fetchWithCookies: Fetch = async (input, init) => {
    const request = (input instanceof Request && !init ? input : new Request(input, init)).clone();
    if (request.credentials === "include" && new URL(request.url).pathname.startsWith("/api/auth/") && cookies.size) {
      request.headers.set("Cookie", [...cookies].map(([name, value]) => `${name}=${value}`).join("; "));
    }
    const response = await fetch(request);
    for (const line of response.headers.getSetCookie()) {
      const [pair, ...attributes] = line.split(";");
      const at = pair!.indexOf("=");
      const [name, value] = [pair!.slice(0, at).trim(), pair!.slice(at + 1).trim()];
      const gone = value === "" || attributes.some((a) => /^\s*max-age\s*=\s*0\s*$/i.test(a));
      if (gone) cookies.delete(name);
      else cookies.set(name, value);
    }
    return response;
  };
  return { cookies, fetch: fetchWithCookies };
}

/** Log a user in through the broker (one login at a time: Keycloak refuses parallel logins of one user). */
async function login(username: "alice" | "bob"): Promise<StoredTokens> {
  return client().login(username, `${username}-password`);
}

/** The session is alive: its newest refresh token still refreshes. */
async function assertAlive(tokens: StoredTokens): Promise<void> {
  const response = await fetch(`${stack!.brokerUrl}${REFRESH}`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ refresh_token: tokens.refreshToken }),
  });
  assert.equal(response.status, 200, `the session should be alive: ${await response.text()}`);
}

// Without the stack the suite is skipped; under CI the test above has already failed the run.
describe("against the real broker and Keycloak", { skip: unavailable ? `the real stack is not available: ${unavailable}` : false }, () => {
  after(() => {
    for (const c of clients) c.close();
  });

  it("logs alice in and reads /me with her access token", async () => {
    const counter = countingFetch();
    const c = client({ fetch: counter.fetch });
    const tokens = await c.login("alice", "alice-password");
    assert.equal(tokens.tokenType, "Bearer");
    assert.ok(tokens.refreshToken && tokens.expiresAt! > Date.now());
    const response = await c.fetch(ME);
    assert.equal(response.status, 200);
    assert.equal(((await response.json()) as { username: string }).username, "alice");
    assert.equal(counter.sent(REFRESH), 0);
  });

  it("a garbage access token: 401 invalid_token from the broker, then one refresh and a retry", async () => {
    const raw = await fetch(`${stack!.brokerUrl}${ME}`, { headers: { Authorization: "Bearer garbage" } });
    assert.equal(raw.status, 401);
    assert.deepEqual(((await raw.json()) as { error: string }).error, "invalid_token");
    const counter = countingFetch();
    const c = client({ fetch: counter.fetch });
    c.setTokens({ ...(await login("alice")), accessToken: "garbage" });
    const response = await c.fetch(ME);
    assert.equal(response.status, 200);
    assert.equal(counter.sent(REFRESH), 1);
    assert.equal(counter.sent(ME), 2);
  });

  it("twenty concurrent requests with a garbage access token cause exactly one refresh, and all succeed", async () => {
    const counter = countingFetch();
    const c = client({ fetch: counter.fetch });
    const tokens = await login("alice");
    c.setTokens({ ...tokens, accessToken: "garbage" });
    const responses = await Promise.all(Array.from({ length: 20 }, () => c.fetch(ME)));
    assert.deepEqual(new Set(responses.map((r) => r.status)), new Set([200]));
    assert.equal(counter.sent(REFRESH), 1);
    assert.notEqual(c.getTokens()!.refreshToken, tokens.refreshToken, "rotated");
    await assertAlive(c.getTokens()!);
  });

  it("two tabs (Web Locks) with concurrent 401s cause exactly one refresh, and the session survives", async () => {
    const counter = countingFetch();
    const browser = new FakeBrowser();
    const tokens = await login("bob");
    const tabs = [0, 1].map(() => {
      const c = client({ fetch: counter.fetch, crossTab: browser.tab() });
      c.setTokens({ ...tokens, accessToken: "garbage" });
      return c;
    });
    const responses = await Promise.all(tabs.flatMap((c) => Array.from({ length: 5 }, () => c.fetch(ME))));
    assert.deepEqual(new Set(responses.map((r) => r.status)), new Set([200]));
    assert.equal(counter.sent(REFRESH), 1);
    assert.equal(tabs[0]!.getTokens()!.refreshToken, tabs[1]!.getTokens()!.refreshToken);
    await assertAlive(tabs[1]!.getTokens()!);
  });

  it("a refresh token spent elsewhere: invalid_grant, onSessionExpired once, every request rejected, tokens cleared", async () => {
    const first = client();
    const spent = await first.login("bob", "bob-password");
    await first.refresh(); // rotation: `spent` is used up
    const expired: SessionExpiredError[] = [];
    const counter = countingFetch();
    const c = client({ fetch: counter.fetch, onSessionExpired: (e) => expired.push(e) });
    c.setTokens({ ...spent, accessToken: "garbage" });
    const results = await Promise.allSettled(Array.from({ length: 5 }, () => c.fetch(ME)));
    assert.equal(counter.sent(REFRESH), 1);
    assert.equal(expired.length, 1);
    assert.deepEqual(seen(expired[0]), {
      class: "SessionExpiredError",
      error: "invalid_grant",
      status: 400,
      message: "Refresh token was already used; the session has been ended",
    });
    assert.deepEqual(results, Array.from({ length: 5 }, () => ({ status: "rejected", reason: expired[0] })));
    assert.equal(c.getTokens(), null);
  });

  it("after logout the old refresh token is refused: SessionExpiredError", async () => {
    const c = client();
    const tokens = await c.login("alice", "alice-password");
    await c.logout();
    assert.equal(c.getTokens(), null);
    let expired = 0;
    const later = client({ onSessionExpired: () => expired++ });
    later.setTokens({ ...tokens, accessToken: "garbage" });
    const err = await later.fetch(ME).catch((e: unknown) => e);
    assert.deepEqual(seen(err), { class: "SessionExpiredError", error: "invalid_grant", status: 400, message: "Session has ended" });
    assert.equal(expired, 1);
  });

  it("503 from a broker whose Keycloak is down: a retryable error, tokens kept, the session unharmed", async () => {
    const tokens = await login("alice");
    let expired = 0;
    const counter = countingFetch();
    const down = client({ baseUrl: stack!.brokerDownUrl, fetch: counter.fetch, onSessionExpired: () => expired++ });
    down.setTokens({ ...tokens, accessToken: "garbage" });
    const results = await Promise.allSettled(Array.from({ length: 5 }, () => down.fetch(ME)));
    const errors = results.map((r) => seen((r as PromiseRejectedResult).reason));
    assert.deepEqual(new Set(errors.map((e) => JSON.stringify(e))).size, 1, "the same error for all");
    assert.deepEqual(errors[0], {
      class: "RetryableAuthError",
      error: "upstream_unavailable",
      status: 503,
      message: "The identity provider cannot be reached; try again later",
      retryAfter: 5,
    });
    // A 401 that comes back after a failed refresh has settled starts a refresh of its own, so how many
    // refreshes the five requests cause depends on timing; "many 401s in flight, one refresh" is asserted
    // against the healthy broker above.
    assert.ok(counter.sent(REFRESH) >= 1);
    assert.equal(expired, 0);
    assert.equal(down.getTokens()!.refreshToken, tokens.refreshToken, "tokens kept");
    // The broker is back (here: the one whose Keycloak is up): the kept refresh token still works.
    const back = client();
    back.setTokens({ ...tokens, accessToken: "garbage" });
    assert.equal((await back.fetch(ME)).status, 200);
  });

  it("the broker cannot be reached at all: a retryable network error, tokens kept", async () => {
    const tokens = await login("alice");
    const c = client({ baseUrl: "http://127.0.0.1:1" });
    c.setTokens(tokens);
    const err = await c.refresh().catch((e: unknown) => e);
    assert.deepEqual(seen(err), { class: "RetryableAuthError", error: "network_error", status: undefined, message: "The broker could not be reached", retryAfter: undefined });
    assert.deepEqual(c.getTokens(), tokens);
  });

  describe("cookie mode (BROKER_TOKEN_TRANSPORT=cookie)", () => {
    const COOKIE = "__Secure-refresh_token";
    function cookieClient(jar: ReturnType<typeof cookieJar>, options: AuthClientOptions = {}) {
      return client({ baseUrl: stack!.brokerCookieUrl, transport: "cookie", fetch: jar.fetch, ...options });
    }

    it("login sets the HttpOnly cookie and JavaScript keeps no refresh token; /me works", async () => {
      const jar = cookieJar();
      const c = cookieClient(jar);
      const tokens = await c.login("alice", "alice-password");
      assert.equal(tokens.refreshToken, undefined);
      assert.ok(jar.cookies.get(COOKIE), "the refresh cookie");
      assert.equal((await c.fetch(ME)).status, 200);
    });

    it("ten concurrent requests with a garbage access token cause exactly one refresh; the cookie rotates and the session lives", async () => {
      const jar = cookieJar();
      const counter = countingFetch(jar.fetch);
      const c = cookieClient(jar, { fetch: counter.fetch });
      const tokens = await c.login("bob", "bob-password");
      const before = jar.cookies.get(COOKIE);
      c.setTokens({ ...tokens, accessToken: "garbage" });
      const responses = await Promise.all(Array.from({ length: 10 }, () => c.fetch(ME)));
      assert.deepEqual(new Set(responses.map((r) => r.status)), new Set([200]));
      assert.equal(counter.sent(REFRESH), 1);
      assert.notEqual(jar.cookies.get(COOKIE), before, "rotated");
      await c.refresh(); // a cookie spent twice would have ended the session
      assert.equal((await c.fetch(ME)).status, 200);
    });

    it("two tabs of one browser (one cookie jar, Web Locks) with concurrent 401s cause exactly one refresh", async () => {
      const jar = cookieJar();
      const counter = countingFetch(jar.fetch);
      const browser = new FakeBrowser();
      const tabs = [0, 1].map(() => cookieClient(jar, { fetch: counter.fetch, crossTab: browser.tab() }));
      const tokens = await tabs[0]!.login("alice", "alice-password");
      for (const tab of tabs) tab.setTokens({ ...tokens, accessToken: "garbage" });
      const responses = await Promise.all(tabs.flatMap((tab) => Array.from({ length: 5 }, () => tab.fetch(ME))));
      assert.deepEqual(new Set(responses.map((r) => r.status)), new Set([200]));
      assert.equal(counter.sent(REFRESH), 1);
      await tabs[1]!.refresh();
    });

    it("a reloaded page (no tokens in memory) picks the session up from the cookie with refresh()", async () => {
      const jar = cookieJar();
      await cookieClient(jar).login("bob", "bob-password");
      const reloaded = cookieClient(jar);
      assert.equal(reloaded.getTokens(), null);
      await reloaded.refresh();
      assert.equal((await reloaded.fetch(ME)).status, 200);
    });

    it("logout ends the session and clears the cookie; refresh() then says the session is over", async () => {
      const jar = cookieJar();
      const c = cookieClient(jar);
      await c.login("alice", "alice-password");
      await c.logout();
      assert.equal(jar.cookies.get(COOKIE), undefined);
      const err = await c.refresh().catch((e: unknown) => e);
      assert.deepEqual(seen(err), { class: "SessionExpiredError", error: "refresh_token_required", status: 400, message: "Refresh token is required" });
    });

    it("a refresh without the CSRF header the broker wants: 403 csrf_failed, a refusal that keeps the tokens", async () => {
      const jar = cookieJar();
      const tokens = await cookieClient(jar).login("bob", "bob-password");
      let expired = 0;
      const c = cookieClient(jar, { csrfHeader: { name: "X-CSRF-Token", value: "1" }, onSessionExpired: () => expired++ });
      c.setTokens(tokens);
      const err = await c.refresh().catch((e: unknown) => e);
      assert.deepEqual(seen(err), {
        class: "AuthRequestError",
        error: "csrf_failed",
        status: 403,
        message: "This request needs the CSRF header and an allowed origin",
      });
      assert.deepEqual(c.getTokens(), tokens);
      assert.equal(expired, 0);
    });
  });

  describe("with short-lived access tokens (the client's lifespan set to 5 s through Keycloak's admin API)", () => {
    let restore: (() => Promise<void>) | undefined;
    before(async () => {
      restore = await setAccessTokenLifespan(stack!.keycloakUrl, LIFESPAN);
    });
    after(async () => {
      await restore?.();
    });

    it("an expired access token: the broker says X-Token-Expired, the client refreshes once and retries", async () => {
      const counter = countingFetch();
      const c = client({ fetch: counter.fetch, proactiveRefresh: false });
      const tokens = await c.login("bob", "bob-password");
      assert.equal(tokens.expiresAt! - tokens.receivedAt, LIFESPAN * 1000);
      await new Promise((resolve) => setTimeout(resolve, LIFESPAN * 1000 + 1000));
      const raw = await fetch(`${stack!.brokerUrl}${ME}`, { headers: { Authorization: `Bearer ${tokens.accessToken}` } });
      assert.equal(raw.status, 401);
      assert.equal(raw.headers.get("X-Token-Expired"), "true");
      // The client's clock knows it expired and refreshes before sending; pretend it does not, to see the 401 path.
      c.setTokens({ ...tokens, expiresAt: Date.now() + 60_000 });
      const responses = await Promise.all(Array.from({ length: 5 }, () => c.fetch(ME)));
      assert.deepEqual(new Set(responses.map((r) => r.status)), new Set([200]));
      assert.equal(counter.sent(REFRESH), 1);
      assert.deepEqual(counter.statuses.filter((s) => s.path === ME).map((s) => s.status).sort(), [200, 200, 200, 200, 200, 401, 401, 401, 401, 401]);
    });

    it("proactive refresh in two tabs: no request sees a 401, one refresh per lifetime, the session lives on", async () => {
      const counter = countingFetch();
      const browser = new FakeBrowser();
      const tabs = [0, 1].map(() => client({ fetch: counter.fetch, crossTab: browser.tab(), refreshJitterMs: 300 }));
      await tabs[0]!.login("alice", "alice-password");
      assert.deepEqual(tabs[1]!.getTokens(), tabs[0]!.getTokens(), "the login reached the other tab");
      const t0 = Date.now();
      while (Date.now() - t0 < 11_000) {
        const [a, b] = await Promise.all(tabs.map((c) => c.fetch(ME)));
        assert.equal(a!.status, 200);
        assert.equal(b!.status, 200);
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
      assert.deepEqual(counter.statuses.filter((s) => s.status !== 200), []);
      const refreshes = counter.sent(REFRESH);
      // Refreshes come 2.8..3.4 s apart (lifetime - lifetime/3 - jitter); a reused token would have ended the session.
      assert.ok(refreshes >= 3 && refreshes <= 4, `one refresh per lifetime in 11 s, got ${refreshes}`);
      await assertAlive(tabs[0]!.getTokens()!);
    });
  });
});

/** Set the broker client's access-token lifespan (seconds) through Keycloak's admin API; returns the undo. */
async function setAccessTokenLifespan(keycloakUrl: string, seconds: number): Promise<() => Promise<void>> {
  const tokenResponse = await fetch(`${keycloakUrl}/realms/master/protocol/openid-connect/token`, {
    method: "POST",
    body: new URLSearchParams({ grant_type: "password", client_id: "admin-cli", username: "admin", password: "admin" }),
  });
  assert.equal(tokenResponse.status, 200, "admin login");
  const { access_token: adminToken } = (await tokenResponse.json()) as { access_token: string };
  const headers = { Authorization: `Bearer ${adminToken}`, "Content-Type": "application/json" };
  const clientsUrl = `${keycloakUrl}/admin/realms/demo/clients`;
  const [rep] = (await (await fetch(`${clientsUrl}?clientId=token-broker`, { headers })).json()) as { id: string; secret?: string; attributes?: Record<string, string> }[];
  assert.ok(rep, "the token-broker client");
  const put = async (value: string) => {
    const attributes = { ...(rep.attributes ?? {}), "access.token.lifespan": value };
    const response = await fetch(`${clientsUrl}/${rep.id}`, { method: "PUT", headers, body: JSON.stringify({ ...rep, secret: CLIENT_SECRET, attributes }) });
    assert.equal(response.status, 204, `update the client: ${await response.text()}`);
  };
  await put(String(seconds));
  return () => put(rep.attributes?.["access.token.lifespan"] ?? "");
}
