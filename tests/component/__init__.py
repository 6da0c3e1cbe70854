"""One part of the broker over real local resources, no Keycloak: a real redis-server, loopback sockets, shared SQLite files."""
