"""docs/api.md, rendered from the agent's and the metadata service's OpenAPI
documents (``python -m gasnap.apidoc > docs/api.md``); a test keeps the file
and the documents in step."""

from __future__ import annotations

import sys
from typing import Any

from .api.spec import SPEC as AGENT
from .metaserver.spec import SPEC as SERVICE

HEADER = """# HTTP API

Generated from the OpenAPI documents the services serve at `GET /openapi.json`
(`python -m gasnap.apidoc > docs/api.md`). Errors are always
`{"error": {"code": "...", "message": "..."}}`; on TCP every path but
`/openapi.json` needs `Authorization: Bearer T` or `X-Auth-Token: T` (401 otherwise).
"""


def _params(op: dict[str, Any]) -> str:
    names = [f"`{p['name']}`" + ("" if p.get("required") else "?")
             for p in op.get("parameters", []) if p["in"] == "query"]
    return ", ".join(names) or "-"


def _body(op: dict[str, Any]) -> str:
    body = op.get("requestBody")
    if body is None:
        return "-"
    ref = body["content"]["application/json"]["schema"].get("$ref", "")
    return f"`{ref.rsplit('/', 1)[-1]}`" if ref else "JSON"


def _section(title: str, spec: dict[str, Any]) -> list[str]:
    lines = [f"## {title}", "", "| method and path | what | query | body | answers |",
             "| --- | --- | --- | --- | --- |"]
    for path, entry in spec["paths"].items():
        for method, op in entry.items():
            codes = ", ".join(code for code in op["responses"] if code != "401")
            lines.append(f"| `{method.upper()} {path}` | {op['summary']} | {_params(op)} "
                         f"| {_body(op)} | {codes} |")
    lines += ["", "Schemas: " + ", ".join(f"`{name}`" for name in
                                         spec["components"]["schemas"]) + ".", ""]
    return lines


def render() -> str:
    lines = [HEADER, *_section("The agent", AGENT), *_section("The metadata service", SERVICE)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
