"""The Flask side of the broker: the app factory, request hooks, the error handler, and one module per URL area.

Everything Flask knows lives here; the core it serves (app/*.py outside this package) imports no Flask.
"""
