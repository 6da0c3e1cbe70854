"""The OpenAPI document and Swagger UI: served, complete, and in step with the routes."""

from __future__ import annotations

import re

from tests.support.keycloak_stub import body_of

SERVICE_ONLY = {"/api/openapi.json", "/api/docs", "/api/docs/static/swagger-init.js", "/api/docs/static/<path:filename>",
                "/static/<path:filename>"}


def test_the_document_is_openapi_3(client):
    """GET /api/openapi.json answers an OpenAPI 3.0 document titled token-broker."""
    response = client.get("/api/openapi.json")
    document = body_of(response)
    assert response.status_code == 200
    assert (document["openapi"], document["info"]["title"]) == ("3.0.3", "token-broker")


def test_every_route_is_documented_with_its_methods(app, client):
    """Each URL rule of the app (but the docs' own) appears in the document with exactly its methods."""
    paths = body_of(client.get("/api/openapi.json"))["paths"]
    routes = {}
    for rule in app.url_map.iter_rules():
        if rule.rule not in SERVICE_ONLY:
            routes.setdefault(rule.rule, set()).update(m.lower() for m in rule.methods - {"OPTIONS"})
    documented = {path: set(ops) for path, ops in paths.items()}
    routes_without_head = {p: m - {"head"} for p, m in routes.items()}
    documented_without_head = {p: m - {"head"} for p, m in documented.items()}
    assert documented_without_head == routes_without_head


def test_every_error_response_is_the_fixed_shape(client):
    """Every 4xx/5xx response in the document refers to ErrorResponse, which allows exactly error and message."""
    document = body_of(client.get("/api/openapi.json"))
    error_schema = document["components"]["schemas"]["ErrorResponse"]
    assert error_schema == {
        "type": "object",
        "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
        "required": ["error", "message"],
        "additionalProperties": False,
    }
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if (path, status) == ("/api/auth/verify", "414"):
                    # gunicorn's own answer to a request line over its limit, before the app: documented as it is
                    assert list(response["content"]) == ["text/html"]
                    continue
                if re.fullmatch(r"[45]\d\d", status):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (path, method, status)


def test_token_bodies_are_described_for_json_and_form(client):
    """Login, refresh and logout accept JSON and form bodies in the document, as they do in fact."""
    paths = body_of(client.get("/api/openapi.json"))["paths"]
    for path in ("/api/auth/login", "/api/auth/refresh-token", "/api/auth/logout"):
        assert set(paths[path]["post"]["requestBody"]["content"]) == {
            "application/json", "application/x-www-form-urlencoded"
        }


def test_swagger_ui_is_served_from_the_package(client):
    """GET /api/docs answers an HTML page whose scripts and styles the broker itself serves."""
    page = client.get("/api/docs")
    assert (page.status_code, page.mimetype) == (200, "text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.get_data(as_text=True))
    assert assets == ["/api/docs/static/swagger-ui.css", "/api/docs/static/swagger-ui-bundle.js",
                      "/api/docs/static/swagger-init.js"]
    for asset in assets:
        with client.get(asset) as response:
            assert response.status_code == 200 and len(response.get_data()) > 20, asset
    assert "/api/openapi.json" in client.get("/api/docs/static/swagger-init.js").get_data(as_text=True)


def test_a_missing_docs_asset_is_404_in_the_fixed_shape(client):
    """Unknown files under /api/docs/static answer the fixed 404."""
    response = client.get("/api/docs/static/nope.js")
    assert (response.status_code, body_of(response)) == (404, {"error": "not_found", "message": "No such route"})
