"""/docs and /redoc: the OpenAPI description rendered as one self-contained HTML page (no script,
style or font from another host), so the reference reads the same offline."""

from __future__ import annotations

import html
import json

STYLE = """body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h2{margin-top:2.2rem;border-bottom:1px solid #ddd}code,pre{font:13px ui-monospace,monospace}
.method{display:inline-block;min-width:3.5rem;font-weight:bold;color:#fff;background:#3a6;padding:0 .4rem;border-radius:3px}
.get{background:#36a}table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left;vertical-align:top}"""


def docs_page(openapi: dict) -> str:
    """Every route of `openapi` with its summary and its body's fields (type, default, description)."""
    schemas = openapi.get("components", {}).get("schemas", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(openapi['info']['title'])} API</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(openapi['info']['title'])} {html.escape(openapi['info']['version'])}</h1>",
             "<p>The machine-readable description is <a href='/openapi.json'>/openapi.json</a>.</p>"]
    for path, methods in openapi.get("paths", {}).items():
        for method, operation in methods.items():
            parts.append(f"<h2><span class='method {method}'>{method.upper()}</span> <code>{html.escape(path)}</code></h2>")
            parts.append(f"<p>{html.escape(operation.get('summary', ''))}</p>")
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                parts.append(_fields_table(_resolve(body, schemas), schemas))
    parts.append("</body></html>")
    return "".join(parts)


def _resolve(schema: dict, schemas: dict) -> dict:
    ref = schema.get("$ref")
    return schemas[ref.rsplit("/", 1)[1]] if ref else schema


def _type_of(schema: dict, schemas: dict) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[1]
    if "anyOf" in schema:
        return " | ".join(_type_of(option, schemas) for option in schema["anyOf"])
    if "enum" in schema:
        return " | ".join(json.dumps(value) for value in schema["enum"])
    if schema.get("type") == "array":
        return f"list[{_type_of(schema.get('items', {}), schemas)}]"
    return schema.get("type", "any")


def _fields_table(schema: dict, schemas: dict) -> str:
    required = set(schema.get("required", ()))
    description = f"<p>{html.escape(schema.get('description', ''))}</p>"
    rows = ["<tr><th>field</th><th>type</th><th>default</th><th>description</th></tr>"]
    for name, field in schema.get("properties", {}).items():
        default = "required" if name in required else json.dumps(field.get("default"))
        cells = (name, _type_of(field, schemas), default, field.get("description", ""))
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells) + "</tr>")
    return description + "<table>" + "".join(rows) + "</table>"
