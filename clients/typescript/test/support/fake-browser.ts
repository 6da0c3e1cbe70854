/**
 * One browser for the tests' tabs: the Web Locks it shares (Node has no `navigator.locks`) and a channel
 * like BroadcastChannel on which a tab's message reaches the other tabs before the lock it releases does
 * (the order the client counts on; `hold()` delays the messages, to see what happens when it is not so).
 */

import type { BroadcastChannelLike, CrossTabOptions, LockManagerLike } from "../../src/index.js";

/** Web Locks as a browser has them: one holder per name, the others wait in order; `released` when a holder lets go. */
export class FakeLocks implements LockManagerLike {
  /** How many requests have been made (held or waiting), by name. */
  readonly requests = new Map<string, number>();
  private readonly tails = new Map<string, Promise<unknown>>();
  private readonly watchers: (() => void)[] = [];

  request<T>(name: string, callback: (lock: unknown) => Promise<T>): Promise<T> {
    this.requests.set(name, (this.requests.get(name) ?? 0) + 1);
    for (const w of this.watchers.splice(0)) w();
    const run = (this.tails.get(name) ?? Promise.resolve()).then(() => callback({ name }));
    this.tails.set(name, run.catch(() => undefined));
    return run;
  }

  /** Resolves once `count` requests of `name` have been made in all. */
  async requested(name: string, count: number): Promise<void> {
    while ((this.requests.get(name) ?? 0) < count) await new Promise<void>((resolve) => this.watchers.push(resolve));
  }
}

type Listener = (event: { data: unknown }) => void;

export class FakeBrowser {
  readonly locks = new FakeLocks();
  private readonly listeners = new Set<Listener>();
  private held: (() => void)[] | null = null;

  /** What a tab of this browser passes as `crossTab`. */
  tab(): CrossTabOptions {
    return { locks: this.locks, channel: this.channel() };
  }

  /** Queue the messages until `release()` instead of delivering them. */
  hold(): void {
    this.held ??= [];
  }

  /** Deliver the queued messages, in order, and deliver the next ones at once again. */
  release(): void {
    const queued = this.held ?? [];
    this.held = null;
    for (const deliver of queued) deliver();
  }

  private channel(): BroadcastChannelLike {
    const own: Listener[] = [];
    let closed = false;
    return {
      addEventListener: (_type, listener) => {
        own.push(listener);
        this.listeners.add(listener);
      },
      postMessage: (message) => {
        if (closed) throw new Error("InvalidStateError: the channel is closed");
        const data = structuredClone(message);
        for (const listener of this.listeners) {
          if (own.includes(listener)) continue;
          // A microtask: before the lock the sender releases next reaches the next holder.
          const deliver = () => queueMicrotask(() => this.listeners.has(listener) && listener({ data }));
          if (this.held) this.held.push(deliver);
          else deliver();
        }
      },
      close: () => {
        closed = true;
        for (const listener of own) this.listeners.delete(listener);
      },
    };
  }
}
