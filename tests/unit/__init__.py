"""Pure logic: no server, no socket, no Keycloak."""
