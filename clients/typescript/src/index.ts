/** token-broker-client: fetch with the broker's tokens, refreshed once, shared across tabs. */

export { AuthClient, createAuthClient, rejectsAccessToken } from "./client.js";
export type { AuthClientOptions, BroadcastChannelLike, CrossTabOptions, LockManagerLike, TokenTransport } from "./client.js";
export { AuthError, AuthRequestError, RetryableAuthError, SessionExpiredError } from "./errors.js";
export { fromTokenResponse, memoryStorage, webStorage } from "./tokens.js";
export type { BrokerTokenResponse, StoredTokens, TokenStorage, WebStorageLike } from "./tokens.js";
