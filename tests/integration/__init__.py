"""Tests against the real Keycloak and the real broker under gunicorn."""
