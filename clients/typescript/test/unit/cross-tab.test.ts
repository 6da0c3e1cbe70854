/**
 * Clients of one FakeBrowser are tabs of one browser: they share its Web Locks and its channel, and spend
 * a refresh token once. Every wait is on a promise (a call the broker received, a callback, a lock
 * request), never on a clock.
 */

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, afterEach, before, beforeEach, describe, it } from "node:test";

import { AuthClient, SessionExpiredError, type AuthClientOptions, type StoredTokens } from "../../src/index.js";
import { FakeBroker } from "../support/fake-broker.js";
import { FakeBrowser } from "../support/fake-browser.js";
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
  broker.expiresIn = 300;
  broker.refreshDelayMs = 30;
  broker.graceMs = 0;
});
afterEach(() => {
  for (const c of clients) c.close();
  clients = [];
});

function tab(options: AuthClientOptions): AuthClient {
  const c = new AuthClient({ baseUrl: broker.url, ...options });
  clients.push(c);
  return c;
}

/** `n` tabs of `browser`, sharing one session whose access token the broker refuses. */
function tabs(n: number, browser = new FakeBrowser(), options: (i: number) => AuthClientOptions = () => ({})): AuthClient[] {
  const token = broker.issue();
  return Array.from({ length: n }, (_, i) => {
    const c = tab({ crossTab: browser.tab(), ...options(i) });
    c.setTokens({ ...token, access_token: "garbage" });
    return c;
  });
}

/** The two tokens of a session: tabs that each refreshed hold the same ones, received at other times. */
function pair(tokens: StoredTokens | null): [string, string | undefined] | null {
  return tokens && [tokens.accessToken, tokens.refreshToken];
}

/** The refresh tokens the broker was sent, in order. */
function spent(): string[] {
  return broker.calls.filter((x) => x.path === "/api/auth/refresh-token").map((x) => (JSON.parse(x.body) as { refresh_token: string }).refresh_token);
}

describe("cross-tab refresh with Web Locks", () => {
  it("concurrent 401s in two tabs cause one refresh, and both tabs get the new tokens", async () => {
    const [a, b] = tabs(2);
    const responses = await Promise.all([...Array.from({ length: 5 }, () => a!.fetch("/api/data")), ...Array.from({ length: 5 }, () => b!.fetch("/api/data"))]);
    assert.deepEqual(new Set(responses.map((r) => r.status)), new Set([200]));
    assert.equal(broker.refreshCount(), 1);
    assert.deepEqual(b!.getTokens(), a!.getTokens());
  });

  it("three tabs refreshing at once: one refresh, and the session survives the next refresh", async () => {
    const all = tabs(3);
    const results = await Promise.all(all.map((c) => c.refresh()));
    assert.equal(broker.refreshCount(), 1);
    assert.deepEqual(results.slice(1), [results[0], results[0]]);
    await all[2]!.refresh(); // a reused refresh token would have ended the session in the fake
    assert.equal((await all[0]!.fetch("/api/data")).status, 200);
    assert.equal(new Set(spent()).size, 2, "two refreshes, two different refresh tokens");
  });

  it("a tab that got the other tab's new tokens before its own 401 repeats the request without refreshing", async () => {
    const [a, b] = tabs(2);
    assert.equal((await a!.fetch("/api/data")).status, 200);
    assert.deepEqual(b!.getTokens(), a!.getTokens(), "b took a's tokens");
    assert.equal((await b!.fetch("/api/data")).status, 200);
    assert.equal(broker.refreshCount(), 1);
  });

  it("a retryable failure: the tabs try one after the other, keep their tokens, and the session lives on", async () => {
    const [a, b] = tabs(2);
    const before = [a!.getTokens(), b!.getTokens()];
    broker.refresh = { status: 503, body: { error: "upstream_unavailable", message: "x" }, headers: { "Retry-After": "5" }, delayMs: 50 };
    const results = await Promise.allSettled([a!.fetch("/api/data"), b!.fetch("/api/data")]);
    for (const r of results) {
      assert.deepEqual(seen((r as PromiseRejectedResult).reason), { class: "RetryableAuthError", error: "upstream_unavailable", status: 503, message: "x", retryAfter: 5 });
    }
    assert.deepEqual([a!.getTokens(), b!.getTokens()], before);
    const token = before[0]!.refreshToken;
    assert.deepEqual(spent(), [token, token], "a 503 spends nothing: each tab tried with the same token");
    broker.refresh = "ok";
    assert.equal((await b!.fetch("/api/data")).status, 200);
    assert.equal((await a!.fetch("/api/data")).status, 200, "a took b's new tokens");
    assert.equal(broker.refreshCount(), 3);
  });

  it("invalid_grant in one tab ends the session in every tab that holds it, with onSessionExpired in each", async () => {
    const expired = [deferred<SessionExpiredError>(), deferred<SessionExpiredError>()];
    const [x, y] = tabs(2, undefined, (i) => ({ onSessionExpired: expired[i]!.resolve }));
    broker.refresh = { status: 400, body: { error: "invalid_grant", message: "Session has ended" } };
    await assert.rejects(x!.fetch("/api/data"), SessionExpiredError);
    const errors = await Promise.all(expired.map((e) => e.promise));
    const error = { class: "SessionExpiredError", error: "invalid_grant", status: 400, message: "Session has ended" };
    assert.deepEqual(errors.map(seen), [error, error]);
    assert.deepEqual([x!.getTokens(), y!.getTokens()], [null, null]);
  });

  it("another tab's refresh or expiry leaves a tab alone that holds other tokens", async () => {
    const browser = new FakeBrowser();
    const [a] = tabs(1, browser);
    const mine = broker.issue();
    let expired = 0;
    const b = tab({ crossTab: browser.tab(), onSessionExpired: () => expired++ });
    b.setTokens(mine);
    const before = b.getTokens();
    await a!.refresh();
    broker.refresh = { status: 400, body: { error: "invalid_grant", message: "Session has ended" } };
    await assert.rejects(a!.refresh(), SessionExpiredError);
    assert.deepEqual(b.getTokens(), before);
    assert.equal(expired, 0);
  });

  it("a tab waiting for the lock of a tab that went away refreshes once the browser frees it", async () => {
    const browser = new FakeBrowser();
    const [c] = tabs(1, browser);
    const gone = deferred();
    void browser.locks.request("token-broker:refresh", () => gone.promise); // a tab that took the lock, then was closed
    const response = c!.fetch("/api/data");
    await browser.locks.requested("token-broker:refresh", 2);
    assert.equal(broker.refreshCount(), 0, "it waits for the lock");
    gone.resolve(); // the browser releases a closed tab's locks
    assert.equal((await response).status, 200);
    assert.equal(broker.refreshCount(), 1);
  });

  it("another tab's tokens that arrive after the lock: the spent token goes once more, and the broker's coalescing answers it", async () => {
    broker.graceMs = 5_000; // the broker's BROKER_REFRESH_GRACE_SECONDS
    const browser = new FakeBrowser();
    const [a, b] = tabs(2, browser);
    const from = a!.getTokens()!.refreshToken;
    browser.hold();
    const [ta, tb] = await Promise.all([a!.refresh(), b!.refresh()]);
    assert.deepEqual(spent(), [from, from], "b did not know yet, and presented the same token");
    assert.deepEqual(pair(tb), pair(ta), "the broker gave b the same tokens");
    browser.release();
    await Promise.resolve();
    assert.deepEqual(pair(b!.getTokens()), pair(a!.getTokens()));
    await b!.refresh(); // the session is alive
    assert.equal((await a!.fetch("/api/data")).status, 200);
  });

  it("cookie mode, the other tab's tokens after the lock: the tab refreshes again with the new cookie, nothing is spent twice", async () => {
    broker.cookieMode = true;
    try {
      const browser = new FakeBrowser();
      const [a, b] = [0, 1].map(() => tab({ crossTab: browser.tab(), transport: "cookie" }));
      const tokens = await a!.login("alice", "pw");
      assert.deepEqual(b!.getTokens(), tokens);
      browser.hold();
      const [ta, tb] = await Promise.all([a!.refresh(), b!.refresh()]);
      assert.equal(broker.refreshCount(), 2, "b refreshed too, after a, with the cookie a's refresh left");
      assert.notEqual(tb.accessToken, ta.accessToken);
      browser.release();
      await Promise.resolve();
      assert.deepEqual([a!.getTokens(), b!.getTokens()], [ta, tb], "neither took a message about tokens it no longer holds");
      await a!.refresh(); // the cookie session is alive
      assert.equal((await b!.fetch("/api/data")).status, 200);
    } finally {
      broker.cookieMode = false;
    }
  });

  it("without Web Locks each tab refreshes on its own, and the broker's coalescing makes it one session", async () => {
    broker.graceMs = 5_000;
    const browser = new FakeBrowser();
    const [a, b] = tabs(2, browser, () => ({ crossTab: { ...browser.tab(), locks: null } }));
    const responses = await Promise.all([a!.fetch("/api/data"), b!.fetch("/api/data")]);
    assert.deepEqual(responses.map((r) => r.status), [200, 200]);
    assert.equal(broker.refreshCount(), 2);
    assert.deepEqual(pair(b!.getTokens()), pair(a!.getTokens()));
    await a!.refresh();
    assert.equal((await b!.fetch("/api/data")).status, 200);
  });

  it("proactive refreshes of two tabs: one refresh per lifetime, never the same token twice", async () => {
    broker.expiresIn = 1;
    const browser = new FakeBrowser();
    const [a, b] = [0, 1].map(() => tab({ crossTab: browser.tab(), refreshJitterMs: 100 }));
    await a!.login("alice", "pw");
    assert.deepEqual(b!.getTokens(), a!.getTokens(), "the login reached the other tab");
    const threeRefreshes = broker.refreshed(3).then(() => true);
    const statuses: number[] = [];
    while (!(await Promise.race([threeRefreshes, new Promise((r) => setTimeout(r, 50, false))]))) {
      statuses.push((await a!.fetch("/api/data")).status, (await b!.fetch("/api/data")).status);
    }
    // Both tabs have timers; had both refreshed, the second would have presented a spent token and the
    // fake broker would have ended the session.
    assert.deepEqual(new Set(statuses), new Set([200]));
    assert.equal(new Set(spent()).size, spent().length);
    await a!.refresh();
    assert.deepEqual(b!.getTokens(), a!.getTokens());
  });
});

describe("sessions across tabs", () => {
  it("login in one tab logs the others in, and logout logs them out (onLogout)", async () => {
    const browser = new FakeBrowser();
    const seenTokens: (StoredTokens | null)[] = [];
    let loggedOut = 0;
    const a = tab({ crossTab: browser.tab() });
    const b = tab({ crossTab: browser.tab(), onLogout: () => loggedOut++, onTokens: (t) => seenTokens.push(t) });
    const tokens = await a.login("alice", "pw");
    await a.logout();
    await Promise.resolve(); // messages arrive in a microtask
    assert.deepEqual(seenTokens, [tokens, null]);
    assert.equal(b.getTokens(), null);
    assert.equal(loggedOut, 1);
  });

  it("the default channel is a BroadcastChannel named after channelName", async () => {
    const channelName = `test-${randomUUID()}`;
    const arrived = [deferred<StoredTokens | null>(), deferred<StoredTokens | null>()];
    let n = 0;
    const a = tab({ crossTab: { channelName, locks: null } });
    tab({ crossTab: { channelName, locks: null }, onTokens: (t) => arrived[n++]?.resolve(t) });
    const tokens = await a.login("alice", "pw");
    assert.deepEqual(await arrived[0]!.promise, tokens);
    await a.logout();
    assert.equal(await arrived[1]!.promise, null);
  });

  it("ignores messages on the channel that are not the client's", async () => {
    const channelName = `test-${randomUUID()}`;
    const changes: (StoredTokens | null)[] = [];
    let onTokens = (_t: StoredTokens | null) => {};
    const c = tab({ crossTab: { channelName, locks: null }, onTokens: (t) => onTokens(t) });
    c.setTokens(broker.issue());
    const before = c.getTokens();
    const last = deferred();
    onTokens = (t) => (changes.push(t), last.resolve());
    const noise = new BroadcastChannel(channelName);
    const valid = { v: 2, type: "refresh", replaces: before!.accessToken, tokens: { accessToken: "at-next", receivedAt: Date.now() } };
    for (const m of [null, 42, "logout", { type: "logout" }, { v: 1, from: "x", type: "logout" }, { v: 2, type: "logout" }, { ...valid, tokens: { accessToken: 1 } }, valid]) {
      noise.postMessage(m);
    }
    noise.close();
    await last.promise; // one sender's messages arrive in order: the valid one is the last
    assert.deepEqual(changes, [valid.tokens]);
  });
});
