"""HTTP routes, one module per URL area: auth.py (/api/auth/*), health.py (/health, /ready)."""
