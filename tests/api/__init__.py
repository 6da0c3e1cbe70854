"""Tests of the app with Keycloak faked by `responses`."""
