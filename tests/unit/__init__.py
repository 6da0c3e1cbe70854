"""Pure-logic tests, and client tests over real loopback sockets."""
