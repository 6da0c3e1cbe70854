/** token-broker-client: fetch with the broker's tokens, refreshed once, shared across tabs. */

export { AuthClient, createAuthClient, rejectsAccessToken } from "./client.js";
export type { AuthClientOptions, TokenTransport } from "./client.js";
export { AuthError, AuthRequestError, RetryableAuthError, SessionExpiredError } from "./errors.js";
export { createCoordinator, localCoordinator, TabCoordinator } from "./coordination.js";
export type { BroadcastChannelLike, CrossTabOptions, LockManagerLike, PeerEvent, RefreshCoordinator, SessionAnnouncement } from "./coordination.js";
export { fromTokenResponse, memoryStorage, webStorage } from "./tokens.js";
export type { BrokerTokenResponse, StoredTokens, TokenStorage, WebStorageLike } from "./tokens.js";
