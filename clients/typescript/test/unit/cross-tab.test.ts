/** Two clients on one BroadcastChannel name are two tabs of one browser: they spend a refresh token once. */

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, afterEach, before, beforeEach, describe, it } from "node:test";

import { AuthClient, RetryableAuthError, SessionExpiredError, type AuthClientOptions, type LockManagerLike } from "../../src/index.js";
import { FakeBroker, sleep } from "../support/fake-broker.js";

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
  broker.expiresIn = 300;
  broker.refreshDelayMs = 30;
});
afterEach(() => {
  for (const c of clients) c.close();
  clients = [];
});

/** Web Locks as one browser has them: one holder per name, the others queue in order. */
class FakeLocks implements LockManagerLike {
  private readonly tails = new Map<string, Promise<unknown>>();
  request<T>(name: string, callback: (lock: unknown) => Promise<T>): Promise<T> {
    const run = (this.tails.get(name) ?? Promise.resolve()).then(() => callback({ name }));
    this.tails.set(name, run.catch(() => undefined));
    return run;
  }
}

/** `n` tabs of one browser (one channel name), sharing one session whose access token the broker refuses. */
function tabs(n: number, options: (tab: number) => AuthClientOptions = () => ({}), locks: LockManagerLike | null = null): AuthClient[] {
  const channelName = `test-${randomUUID()}`;
  const token = broker.issue();
  return Array.from({ length: n }, (_, i) => {
    const c = new AuthClient({ baseUrl: broker.url, crossTab: { channelName, locks }, ...options(i) });
    c.setTokens({ ...token, access_token: "garbage" });
    clients.push(c);
    return c;
  });
}

for (const [name, locks] of [
  ["BroadcastChannel claims", () => null],
  ["Web Locks", () => new FakeLocks()],
] as const) {
  describe(`cross-tab with ${name}`, () => {
    it("concurrent 401s in two tabs cause one refresh, and both tabs get the new tokens", async () => {
      const [a, b] = tabs(2, undefined, locks());
      const responses = await Promise.all([...Array.from({ length: 5 }, () => a!.fetch("/api/data")), ...Array.from({ length: 5 }, () => b!.fetch("/api/data"))]);
      assert.deepEqual(new Set(responses.map((r) => r.status)), new Set([200]));
      assert.equal(broker.refreshCount(), 1);
      assert.equal(a!.getTokens()!.accessToken, b!.getTokens()!.accessToken);
      assert.equal(a!.getTokens()!.refreshToken, b!.getTokens()!.refreshToken);
    });

    it("three tabs refreshing at once: one refresh, and the session survives the next refresh", async () => {
      const all = tabs(3, undefined, locks());
      await Promise.all(all.map((c) => c.refresh()));
      assert.equal(broker.refreshCount(), 1);
      await all[2]!.refresh(); // a reused refresh token would have ended the session in the fake
      assert.equal((await all[0]!.fetch("/api/data")).status, 200);
    });

    it("a retryable failure in the refreshing tab reaches every tab's requests; tokens are kept everywhere", async () => {
      const [a, b] = tabs(2, undefined, locks());
      broker.refresh = { status: 503, body: { error: "upstream_unavailable", message: "x" }, headers: { "Retry-After": "5" }, delayMs: 50 };
      const results = await Promise.allSettled([a!.fetch("/api/data"), b!.fetch("/api/data")]);
      for (const r of results) assert.ok((r as PromiseRejectedResult).reason instanceof RetryableAuthError);
      assert.equal(broker.refreshCount(), 1);
      assert.ok(a!.getTokens() && b!.getTokens());
      broker.refresh = "ok";
      assert.equal((await b!.fetch("/api/data")).status, 200, "a later attempt may claim again");
    });

    it("invalid_grant in one tab ends the session in every tab, with onSessionExpired in each", async () => {
      const expired = [0, 0];
      const [x, y] = tabs(2, (i) => ({ onSessionExpired: () => expired[i]!++ }), locks());
      broker.refresh = { status: 400, body: { error: "invalid_grant", message: "Session has ended" } };
      await assert.rejects(x!.fetch("/api/data"), SessionExpiredError);
      await sleep(50);
      assert.deepEqual(expired, [1, 1]);
      assert.equal(y!.getTokens(), null);
    });
  });
}

describe("sessions across tabs", () => {
  it("a tab that gets the other tab's new tokens before its own 401 retries without refreshing", async () => {
    const [a, b] = tabs(2);
    assert.equal((await a!.fetch("/api/data")).status, 200);
    await sleep(20);
    assert.equal(b!.getTokens()!.accessToken, a!.getTokens()!.accessToken, "b adopted a's tokens");
    assert.equal((await b!.fetch("/api/data")).status, 200);
    assert.equal(broker.refreshCount(), 1);
  });

  it("proactive refreshes of two tabs: one tab refreshes each time, and the session lives on", async () => {
    broker.expiresIn = 1;
    const channelName = `test-${randomUUID()}`;
    const [a, b] = [0, 1].map(() => {
      const c = new AuthClient({ baseUrl: broker.url, crossTab: { channelName, locks: null }, refreshJitterMs: 100 });
      clients.push(c);
      return c;
    });
    await a!.login("alice", "pw");
    await sleep(20);
    assert.ok(b!.getTokens(), "the login reached the other tab");
    const statuses: number[] = [];
    const t0 = Date.now();
    while (Date.now() - t0 < 2600) {
      statuses.push((await a!.fetch("/api/data")).status, (await b!.fetch("/api/data")).status);
      await sleep(50);
    }
    // The fake broker ends the session when a refresh token is spent twice (as Keycloak does), so all-200
    // means the tabs never refreshed the same token twice. How many cycles fit in 2.6 s depends on the
    // machine's load, so the count is only bounded loosely.
    assert.deepEqual(new Set(statuses), new Set([200]));
    const refreshes = broker.refreshCount();
    assert.ok(refreshes >= 2 && refreshes <= 8, `a refresh per cycle, not one per tab; got ${refreshes}`);
  });

  it("logout in one tab logs the other out (onLogout), and login in one tab logs the other in", async () => {
    const channelName = `test-${randomUUID()}`;
    let loggedOut = 0;
    const a = new AuthClient({ baseUrl: broker.url, crossTab: { channelName } });
    const b = new AuthClient({ baseUrl: broker.url, crossTab: { channelName }, onLogout: () => loggedOut++ });
    clients.push(a, b);
    const tokens = await a.login("alice", "pw");
    await sleep(20);
    assert.equal(b.getTokens()?.accessToken, tokens.accessToken);
    await a.logout();
    await sleep(20);
    assert.equal(b.getTokens(), null);
    assert.equal(loggedOut, 1);
  });

  it("a tab whose refresher vanished gives up with a retryable error, and a later attempt refreshes", async () => {
    const channelName = `test-${randomUUID()}`;
    const token = broker.issue();
    const c = new AuthClient({ baseUrl: broker.url, crossTab: { channelName, locks: null, waitTimeoutMs: 200 } });
    clients.push(c);
    c.setTokens({ ...token, access_token: "garbage" });
    // A tab that claims the refresh token and then is closed before it answers.
    const ghost = new BroadcastChannel(channelName);
    const { fingerprint } = await import("../../src/tokens.js");
    ghost.postMessage({ v: 1, from: "ghost", type: "claim", key: fingerprint(token.refresh_token!), time: Date.now() - 1000 });
    ghost.close();
    await sleep(20);
    const err = await c.fetch("/api/data").catch((e: unknown) => e);
    assert.ok(err instanceof RetryableAuthError);
    assert.equal(err.error, "refresh_timeout");
    assert.equal((await c.fetch("/api/data")).status, 200);
    assert.equal(broker.refreshCount(), 1);
  });

  it("ignores messages that are not the client's", async () => {
    const channelName = `test-${randomUUID()}`;
    const c = new AuthClient({ baseUrl: broker.url, crossTab: { channelName } });
    clients.push(c);
    await c.login("alice", "pw");
    const noise = new BroadcastChannel(channelName);
    for (const m of [null, 42, "logout", { type: "logout" }, { v: 2, from: "x", type: "logout" }, { v: 1, from: "x", type: "login", tokens: { accessToken: 1 } }]) {
      noise.postMessage(m);
    }
    noise.close();
    await sleep(20);
    assert.ok(c.getTokens());
  });
});
