"""The OpenAPI 3.1 document of API v1, served at ``/v1/openapi.json`` (docs/api.md is the prose).

Generated: the component schemas come from the typed bodies (api_models.py, and ``JobSettings``
in schemas.py, the JSON a submit body carries in its safetensors metadata under ``tetriserve``),
the same types that validate requests; this module adds only the paths. Schemas are JSON Schema
2020-12 (what OpenAPI 3.1 uses).
"""
from __future__ import annotations

import copy
from functools import lru_cache

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema

from .. import __version__
from . import api_models
from .schemas import SETTINGS_ADAPTER, JobSettings

REF_TEMPLATE = "#/components/schemas/{model}"
_TOKEN = {"type": "string", "pattern": api_models.TOKEN_PATTERN}


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


def _job_id() -> list:
    return [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]


def _after() -> dict:
    return {"name": "after", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0},
            "description": "send only events with seq greater than this"}


_NDJSON = {"application/x-ndjson": {"schema": {"$ref": "#/components/schemas/Event"}}}
_SAFETENSORS = {"application/octet-stream": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}

PATHS: dict = {
    "/v1/health": {"get": {"operationId": "health", "summary": "Liveness, version and boot id",
                           "responses": _ok(200, "alive", "Health")}},
    "/v1/openapi.json": {"get": {"operationId": "openapi", "summary": "This document",
                                 "responses": _ok(200, "OpenAPI document", content={"application/json": {"schema": {"type": "object"}}})}},
    "/v1/executor": {"get": {"operationId": "executorStatus",
                             "summary": "The devices' health: recovery state, faults, restarts, workers",
                             "responses": {**_ok(200, "executor", "Executor"), **_err(401)}}},
    "/v1/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics (text format 0.0.4)",
                            "responses": _ok(200, "metrics", content={"text/plain": {"schema": {"type": "string"}}})}},
    "/v1/board": {"get": {"operationId": "board", "summary": "Recent and current assignments, jobs, SAR",
                          "parameters": [{"name": "window_s", "in": "query", "required": False,
                                          "schema": {"type": "number", "minimum": 1, "maximum": 3600}}],
                          "responses": {**_ok(200, "board", "Board"), **_err(400, 401)}}},
    "/v1/events": {"get": {"operationId": "serviceEvents", "summary": "Service-wide NDJSON event stream",
                           "parameters": [_after()],
                           "responses": {**_ok(200, "stream", content=_NDJSON), **_err(400, 401, 429)}}},
    "/v1/models": {"get": {"operationId": "listModels", "summary": "Configured, loadable and loaded models",
                           "responses": {**_ok(200, "models", "ModelList"), **_err(401)}}},
    "/v1/models/load": {"post": {"operationId": "loadModel", "summary": "Load a model by configured name or file name",
                                 "requestBody": {"required": True, **_json("ModelLoadRequest")},
                                 "responses": {**_ok(200, "already loaded", "Model"), **_ok(202, "loading", "Model"),
                                               **_err(400, 401, 404, 413)}}},
    "/v1/models/unload": {"post": {"operationId": "unloadModel",
                                   "summary": "Free a loaded model's weights on every worker (a later job loads it again)",
                                   "requestBody": {"required": True, **_json("ModelUnloadRequest")},
                                   "responses": {**_ok(200, "unloaded", "Model"), **_err(400, 401, 404, 409, 413)}}},
    "/v1/models/{name}": {"get": {"operationId": "modelStatus", "summary": "One model's load state",
                                  "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                                  "responses": {**_ok(200, "model", "Model"), **_err(400, 401, 404)}}},
    "/v1/leases": {"post": {"operationId": "createLease", "summary": "Open a lease (heartbeat it or its jobs are cancelled)",
                            "requestBody": {"required": False, **_json("LeaseRequest")},
                            "responses": {**_ok(201, "lease", "Lease"), **_err(400, 401, 413, 429)}}},
    "/v1/leases/{lease_id}/heartbeat": {"post": {
        "operationId": "heartbeat", "summary": "Renew a lease",
        "parameters": [{"name": "lease_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {**_ok(200, "renewed", "Lease"), **_err(401, 404)}}},
    "/v1/leases/{lease_id}": {"delete": {
        "operationId": "releaseLease", "summary": "Close a lease and cancel its unfinished jobs",
        "parameters": [{"name": "lease_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {**_ok(200, "released", "Lease"), **_err(401, 404)}}},
    "/v1/usage": {"get": {
        "operationId": "usage", "summary": "GPU-hours, SAR and latency by tenant or model and by day (job history)",
        "parameters": [
            {"name": name, "in": "query", "required": False, "description": desc, "schema": {"type": "string"}}
            for name, desc in (("since", "unix seconds or ISO 8601 date (default: until minus 7 days)"),
                               ("until", "unix seconds or ISO 8601 date (default: now)"))
        ] + [{"name": "by", "in": "query", "required": False, "schema": {"enum": ["tenant", "model"]}}],
        "responses": {**_ok(200, "usage", "Usage"), **_err(400, 401)}}},
    "/v1/jobs": {
        "post": {"operationId": "submitJob",
                 "summary": "Submit a job: a safetensors body, settings (JobSettings) as JSON in metadata key 'tetriserve'",
                 "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False, "schema": _TOKEN},
                                {"name": "X-TetriServe-Lease", "in": "header", "required": False, "schema": _TOKEN}],
                 "requestBody": {"required": True, "content": _SAFETENSORS},
                 "responses": {**_ok(202, "accepted", "Job"), **_ok(200, "existing job with this key", "Job"),
                               **_err(400, 401, 404, 408, 409, 413, 429, 503)}},
        "get": {"operationId": "listJobs", "summary": "Jobs the service holds",
                "parameters": [{"name": "tenant", "in": "query", "required": False, "schema": {"type": "string"}},
                               {"name": "lease", "in": "query", "required": False, "schema": {"type": "string"}}],
                "responses": {**_ok(200, "jobs", "JobList"), **_err(401)}}},
    "/v1/jobs/{job_id}": {"get": {"operationId": "jobStatus", "summary": "A job's status", "parameters": _job_id(),
                                  "responses": {**_ok(200, "status", "Job"), **_err(401, 404, 410)}}},
    "/v1/jobs/{job_id}/events": {"get": {
        "operationId": "jobEvents", "summary": "A job's NDJSON event stream (ends after its terminal event)",
        "parameters": _job_id() + [_after()],
        "responses": {**_ok(200, "stream", content=_NDJSON), **_err(400, 401, 404, 410, 429)}}},
    "/v1/jobs/{job_id}/result": {"get": {
        "operationId": "jobResult", "summary": "The result: safetensors with tensor 'latent'",
        "parameters": _job_id(),
        "responses": {**_ok(200, "result", content=_SAFETENSORS), **_err(401, 404, 409, 410)}}},
    "/v1/jobs/{job_id}/cancel": {"post": {
        "operationId": "cancelJob", "summary": "Cancel a job (frees its devices by the next step boundary)",
        "parameters": _job_id(), "responses": {**_ok(202, "cancelling or cancelled", "Job"), **_err(401, 404, 409, 410)}}},
}


@lru_cache(maxsize=1)
def _document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "comfy_tetriserve scheduler service", "version": __version__,
                 "description": "Deadline-aware serving of diffusion transformers. See docs/api.md."},
        "servers": [{"url": "http://127.0.0.1:8189"}],
        "components": {"schemas": component_schemas(),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{}, {"bearer": []}],
        "paths": PATHS,
    }


def openapi_document() -> dict:
    return copy.deepcopy(_document())
