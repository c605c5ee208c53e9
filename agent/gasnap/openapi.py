"""Building blocks of the two services' OpenAPI 3 documents.

The documents are written by hand, next to the routes they describe; a test
fails when a route has no entry, and schemathesis checks every answer
against them.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .httpkit import MAX_LIMIT

Schema = dict[str, Any]

OPENAPI_VERSION = "3.0.3"
STATUSES = ["creating", "available", "error", "deleting", "error_deleting"]
STRING: Schema = {"type": "string"}
REASONS = {
    200: "OK", 201: "Created", 202: "Accepted: the work runs as a task", 204: "Done, no content",
    400: "Bad input", 401: "Missing or wrong token (TCP only)",
    404: "Unknown domain, volume, snapshot or task", 409: "Conflict: busy, wrong status",
    501: "This hypervisor backend cannot do it (not_supported_on_backend; nothing changed)",
    503: "A service gasnap depends on is unreachable",
    507: "Not enough free space for it (nothing changed)",
}

ERROR: Schema = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
    }},
}

SECURITY_SCHEMES: Schema = {
    "bearer": {"type": "http", "scheme": "bearer"},
    "authToken": {"type": "apiKey", "in": "header", "name": "X-Auth-Token"},
}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(kind: str, **more: Any) -> Schema:
    return {"type": kind, "nullable": True, **more}


def obj(required: list[str], properties: Schema, *, closed: bool = False) -> Schema:
    doc: Schema = {"type": "object", "properties": properties}
    if required:  # OpenAPI 3.0 forbids an empty list
        doc["required"] = required
    if closed:
        doc["additionalProperties"] = False
    return doc


# a volume's own limits; null: the agent's [limits] default
LIMIT_PROPERTIES: Schema = {
    "max_snapshots": nullable("integer", minimum=1, maximum=65535),
    "soft_limit_percent": nullable("integer", minimum=1, maximum=100),
    "auto_delete": nullable("boolean"),
    "max_chain_depth": nullable("integer", minimum=2, maximum=1024),
}


def json_body(schema: Schema) -> Schema:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def path_param(name: str) -> Schema:
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "string", "minLength": 1}}


def query_param(name: str, schema: Schema | None = None, *, required: bool = False) -> Schema:
    return {"name": name, "in": "query", "required": required,
            "schema": schema or {"type": "string"}}


def operation(summary: str, ok: int, ok_schema: Schema | None, errors: list[int], *,
              params: list[Schema] | None = None, body: Schema | None = None,
              content_type: str = "application/json") -> Schema:
    responses: Schema = {}
    ok_doc: Schema = {"description": REASONS[ok]}
    if ok_schema is not None:
        ok_doc["content"] = {content_type: {"schema": ok_schema}}
    responses[str(ok)] = ok_doc
    for status in [*errors, 401]:
        responses[str(status)] = {"description": REASONS[status], "content": {
            "application/json": {"schema": ref("Error")}}}
    doc: Schema = {"summary": summary, "responses": responses}
    if params:
        doc["parameters"] = params
    if body is not None:
        doc["requestBody"] = body
    return doc


def document(title: str, description: str, paths: Schema, schemas: Schema,
             version: str) -> Schema:
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {"schemas": {"Error": ERROR, **schemas},
                       "securitySchemes": SECURITY_SCHEMES},
        "security": [{}, {"bearer": []}, {"authToken": []}],
    }


def routes_missing(app: web.Application, spec: Schema) -> list[str]:
    """Routes of APP without an entry in SPEC ("METHOD /path")."""
    missing = []
    for route in app.router.routes():
        if route.method in ("HEAD", "*") or route.resource is None:
            continue
        path = route.resource.canonical
        entry = spec["paths"].get(path, {})
        if route.method.lower() not in entry:
            missing.append(f"{route.method} {path}")
    return missing


def add_route(app: web.Application, spec: Schema) -> None:
    async def serve_spec(_request: web.Request) -> web.Response:
        return web.json_response(spec)

    app.router.add_get("/openapi.json", serve_spec)


def page_params() -> list[Schema]:
    """``limit`` and ``marker`` of a paged listing (httpkit.page_query)."""
    return [query_param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
            query_param("marker")]


def page_of(key: str, item: Schema) -> Schema:
    """A listing's answer: ``next_marker`` only when LIMIT left records out."""
    return obj([key], {key: {"type": "array", "items": item}, "next_marker": STRING})
