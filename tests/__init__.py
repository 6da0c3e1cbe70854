"""The token broker test suite."""
