/** The "by hand" interceptor in docs/frontend.md, taken from the page and run against the fake broker. */

import assert from "node:assert/strict";
import { readFileSync, writeFileSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { after, before, beforeEach, describe, it } from "node:test";
import ts from "typescript";

import { REPO } from "../support/stack.js";
import { FakeBroker } from "../support/fake-broker.js";

interface ByHand {
  authFetch(url: string, init?: RequestInit): Promise<Response>;
  setTokens(token: { access_token: string; refresh_token: string } | null): void;
  SessionExpired: new (message?: string) => Error;
}

let broker: FakeBroker;
let byHand: ByHand;
const realFetch = globalThis.fetch;

before(async () => {
  broker = await new FakeBroker().start();
  // The page's code uses relative URLs, as a browser page would; resolve them against the fake broker.
  globalThis.fetch = (input, init) => realFetch(typeof input === "string" && input.startsWith("/") ? broker.url + input : input, init);
  const page = readFileSync(join(REPO, "docs", "frontend.md"), "utf8");
  const section = page.slice(page.indexOf("## Doing it by hand"));
  const code = /```ts\n([\s\S]*?)```/.exec(section)?.[1];
  assert.ok(code, "docs/frontend.md has the by-hand code block");
  const js = ts.transpileModule(code, { compilerOptions: { target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.ESNext } }).outputText;
  const file = join(mkdtempSync(join(tmpdir(), "by-hand-")), "auth-fetch.mjs");
  writeFileSync(file, js);
  byHand = (await import(pathToFileURL(file).href)) as ByHand;
});
after(async () => {
  globalThis.fetch = realFetch;
  await broker.stop();
});
beforeEach(() => {
  broker.calls.length = 0;
  broker.refresh = "ok";
});

function garbageSession(): void {
  const token = broker.issue();
  byHand.setTokens({ access_token: "garbage", refresh_token: token.refresh_token! });
}

describe("the by-hand interceptor of docs/frontend.md", () => {
  it("ten concurrent 401s: one refresh, ten repeated requests, all 200", async () => {
    garbageSession();
    const responses = await Promise.all(Array.from({ length: 10 }, () => byHand.authFetch("/api/data")));
    assert.deepEqual(new Set(responses.map((r) => r.status)), new Set([200]));
    assert.equal(broker.refreshCount(), 1);
  });

  it("a 503 from refresh rejects every waiting request, keeps the tokens, and a later try works", async () => {
    garbageSession();
    broker.refresh = { status: 503, body: { error: "upstream_unavailable", message: "x" }, delayMs: 30 };
    const results = await Promise.allSettled(Array.from({ length: 3 }, () => byHand.authFetch("/api/data")));
    for (const r of results) assert.equal(r.status, "rejected");
    assert.equal(broker.refreshCount(), 1);
    broker.refresh = "ok";
    assert.equal((await byHand.authFetch("/api/data")).status, 200);
  });

  it("invalid_grant ends the session with SessionExpired", async () => {
    garbageSession();
    broker.refresh = { status: 400, body: { error: "invalid_grant", message: "Session has ended" } };
    const err = await byHand.authFetch("/api/data").catch((e: unknown) => e);
    assert.ok(err instanceof byHand.SessionExpired);
    assert.equal((err as Error).message, "Session has ended");
  });
});
