"""The OpenAPI 3.1 document of API v1, served at ``/v1/openapi.json`` (docs/api.md is the prose).

Generated: the component schemas come from the typed bodies (api_models.py, and ``JobSettings``
in schemas.py, the JSON a submit body carries in its safetensors metadata under ``tetriserve``),
the same types that validate requests; the paths come from the route table, each handler carrying
its operation (``documented``), path parameters from the route's path. Schemas are JSON Schema
2020-12 (what OpenAPI 3.1 uses).
"""
from __future__ import annotations

import copy
import re
from functools import lru_cache

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema

from .. import __version__
from . import api_models
from .schemas import SETTINGS_ADAPTER, JobSettings

REF_TEMPLATE = "#/components/schemas/{model}"


class CompactJsonSchema(GenerateJsonSchema):
    """pydantic's generator, writing ``X | None`` as ``"type": [X, "null"]`` where X is a plain type
    (what JSON Schema readers and fuzzers handle best) and leaving out the generated titles."""

    def nullable_schema(self, schema):
        inner = self.generate_inner(schema["schema"])
        kind = inner.get("type")
        if isinstance(kind, str) and "$ref" not in inner and "anyOf" not in inner:
            out = {**inner, "type": [kind, "null"]}
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
            return out
        return super().nullable_schema(schema)

    def field_title_should_be_set(self, schema) -> bool:
        return False

    def generate(self, schema, mode="validation"):
        out = super().generate(schema, mode)
        out.pop("title", None)
        for sub in out.get("$defs", {}).values():
            sub.pop("title", None)
        return out


def _inline(node, defs: dict, keep: set[str]):
    """``node`` with references to nested types (those not in ``keep``) replaced by their schema, so
    that each component also stands alone (Error carries its detail, Executor its workers)."""
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        name = ref.rsplit("/", 1)[-1]
        if ref and name not in keep:
            return _inline(defs[name], defs, keep)
        return {k: _inline(v, defs, keep) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs, keep) for v in node]
    return node


def component_schemas() -> dict:
    """Every component schema, named by its type; nested types are written in place."""
    kinds = (*api_models.COMPONENTS, JobSettings)
    keep = {kind.__name__ for kind in kinds}
    out: dict = {}
    for kind in kinds:
        adapter = SETTINGS_ADAPTER if kind is JobSettings else TypeAdapter(kind)
        schema = adapter.json_schema(ref_template=REF_TEMPLATE, schema_generator=CompactJsonSchema)
        out[kind.__name__] = _inline(schema, schema.pop("$defs", {}), keep)
    out["JobSettings"]["description"] = ("JSON in the safetensors metadata key 'tetriserve' of a submit body. "
                                         "Unknown keys are refused.")
    return out


def _json(ref: str) -> dict:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _err(*statuses: int) -> dict:
    return {str(s): {"description": "error", **_json("Error")} for s in statuses}


def _ok(status: int, description: str, ref: str | None = None, content: dict | None = None) -> dict:
    body = _json(ref) if ref else ({"content": content} if content else {})
    return {str(status): {"description": description, **body}}


def query(name: str, schema: dict, description: str | None = None) -> dict:
    out = {"name": name, "in": "query", "required": False, "schema": schema}
    return {**out, "description": description} if description else out


def header(name: str, schema: dict) -> dict:
    return {"name": name, "in": "header", "required": False, "schema": schema}


def json_body(ref: str, required: bool = True) -> dict:
    return {"required": required, **_json(ref)}


AFTER = query("after", {"type": "integer", "minimum": 0}, "send only events with seq greater than this")
TOKEN = {"type": "string", "pattern": api_models.TOKEN_PATTERN}
NDJSON = {"application/x-ndjson": {"schema": {"$ref": "#/components/schemas/Event"}}}
SAFETENSORS = {"application/octet-stream": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}

def documented(operation_id: str, summary: str, *, ok: dict[int, tuple[str, object]], errors: tuple[int, ...] = (),
               query: tuple[dict, ...] = (), headers: tuple[dict, ...] = (), body: dict | None = None):
    """Attach a route's operation to its handler (``ok``: status -> (description, component name, or a
    content map, or None)); the document's paths are generated from the route table with these, and path
    parameters from the route's path."""
    responses: dict = {}
    for status, (description, what) in ok.items():
        responses.update(_ok(status, description, what if isinstance(what, str) else None,
                             what if isinstance(what, dict) else None))
    responses.update(_err(*errors))
    spec = {"operationId": operation_id, "summary": summary, "parameters": [*query, *headers],
            "responses": responses}
    if body is not None:
        spec["requestBody"] = body
    def attach(handler):
        handler.openapi = spec
        return handler
    return attach


def _path_params(path: str) -> tuple[str, list]:
    """An aiohttp path (``/v1/models/{name:.+}``) as an OpenAPI path and its path parameters."""
    names = re.findall(r"{(\w+)(?::[^}]*)?}", path)
    clean = re.sub(r"{(\w+)(?::[^}]*)?}", r"{\1}", path)
    return clean, [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]


def paths_of(route_defs) -> dict:
    """The ``paths`` of every API route (``/v1/...``) in an aiohttp route table; a route without
    ``documented`` metadata is an error, so the document cannot miss one."""
    paths: dict = {}
    for route in route_defs:
        if not hasattr(route, "handler") or not route.path.startswith("/v1/"):
            continue  # static files and the HTML pages
        spec = getattr(route.handler, "openapi", None)
        if spec is None:
            raise TypeError(f"{route.method} {route.path} ({route.handler.__name__}) has no @documented operation")
        path, params = _path_params(route.path)
        operation = {**spec, "parameters": params + spec["parameters"]}
        if not operation["parameters"]:
            del operation["parameters"]
        paths.setdefault(path, {})[route.method.lower()] = operation
    return paths


@lru_cache(maxsize=1)
def _document() -> dict:
    from .routes import routes  # the route table imports this module for its decorators
    return {
        "openapi": "3.1.0",
        "info": {"title": "comfy_tetriserve scheduler service", "version": __version__,
                 "description": "Deadline-aware serving of diffusion transformers. See docs/api.md."},
        "servers": [{"url": "http://127.0.0.1:8189"}],
        "components": {"schemas": component_schemas(),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{}, {"bearer": []}],
        "paths": paths_of(routes),
    }


def openapi_document() -> dict:
    return copy.deepcopy(_document())
