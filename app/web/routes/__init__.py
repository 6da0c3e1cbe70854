"""HTTP routes, one module per URL area: auth.py (/api/auth/login, refresh-token, logout), tokens.py
(/api/auth/me, /api/auth/verify), health.py (/health, /ready, /metrics); openapi.py (/api/openapi.json,
/api/docs) sits beside them."""
