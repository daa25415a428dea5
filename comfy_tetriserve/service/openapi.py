"""The OpenAPI 3.1 description of API v1, served at ``/v1/openapi.json`` (docs/api.md is the prose).

Schemas are JSON Schema 2020-12 (what OpenAPI 3.1 uses). The job settings schema documents
the JSON stored in a submit body's safetensors metadata under the key ``tetriserve``.
"""
from __future__ import annotations

import copy
from functools import lru_cache

from .. import __version__
from ..sampling.names import WEIGHT_DTYPES

_NUM_OR_NULL = {"type": ["number", "null"]}
_STR_OR_NULL = {"type": ["string", "null"]}
_TOKEN = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"}

SCHEMAS: dict = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["code", "message", "status"], "properties": {
            "code": {"type": "string"}, "message": {"type": "string"}, "status": {"type": "integer"}}}},
    },
    "JobSettings": {
        "description": "JSON in the safetensors metadata key 'tetriserve' of a submit body. Unknown keys are refused.",
        "type": "object", "required": ["model"], "additionalProperties": False,
        "properties": {
            "model": {"type": "string", "description": "a configured model name or a file in the model folders"},
            "steps": {"type": ["integer", "null"], "minimum": 1, "description": "required unless a sigmas tensor is sent"},
            "scheduler": {"type": "string", "default": "simple"},
            "denoise": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1.0},
            "shift": _NUM_OR_NULL,
            "sampler": {"type": "string", "default": "euler"},
            "cfg": {"type": "number", "exclusiveMinimum": 0, "maximum": 100, "default": 1.0},
            "guidance": _NUM_OR_NULL,
            "seed": {"type": "integer", "minimum": 0, "maximum": 18446744073709551615, "default": 0},
            "deadline_s": {"type": ["number", "null"], "exclusiveMinimum": 0,
                           "description": "seconds after submission; null = best effort"},
            "priority": {"type": "integer", "minimum": -1000, "maximum": 1000, "default": 0},
            "tenant": {**_TOKEN, "description": "default: the lease's tenant, else 'default'"},
            "job_key": {**_TOKEN, "description": "idempotency key: the same key returns the existing job"},
            "lease": _TOKEN,
            "latent_space": {"enum": ["vae", "model"], "default": "vae"},
            "result_space": {"enum": ["vae", "model", None]},
            "loras": {"type": "array", "maxItems": 16, "description": "LoRA stack, applied in order: files named "
                      "inside the service's --lora-dir folders", "items": {
                          "type": "object", "required": ["name"], "additionalProperties": False,
                          "properties": {"name": {"type": "string"},
                                         "strength": {"type": "number", "minimum": -100, "maximum": 100,
                                                      "default": 1.0}}}},
        },
    },
    "Job": {
        "type": "object",
        "required": ["job_id", "status", "boot_id", "steps_done", "num_steps", "simulated"],
        "properties": {
            "job_id": {"type": "string"}, "job_key": _STR_OR_NULL, "boot_id": {"type": "string"},
            "status": {"enum": ["queued", "running", "waiting", "finished", "failed", "cancelled"]},
            "model": {"type": "string"}, "tenant": {"type": "string"}, "lease": _STR_OR_NULL,
            "height": {"type": "integer"}, "width": {"type": "integer"}, "batch": {"type": "integer"},
            "priority": {"type": "integer"}, "steps_done": {"type": "integer"}, "num_steps": {"type": "integer"},
            "gpu_ids": {"type": "array", "items": {"type": "integer"}}, "sp_degree": {"type": "integer"},
            "submitted_at": {"type": "number"}, "deadline_at": _NUM_OR_NULL, "predicted_finish_at": _NUM_OR_NULL,
            "feasible": {"type": ["boolean", "null"]}, "first_step_at": _NUM_OR_NULL, "ended_at": _NUM_OR_NULL,
            "met_deadline": {"type": ["boolean", "null"]}, "error": _STR_OR_NULL, "error_code": _STR_OR_NULL,
            "cancel_reason": _STR_OR_NULL,
            "simulated": {"type": "boolean"}, "result_ready": {"type": "boolean"},
            "last_event_seq": {"type": "integer"}, "existing": {"type": "boolean"},
            "num_faults": {"type": "integer", "description": "times the job was on devices that failed"},
            "last_fault": _STR_OR_NULL,
            "links": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "Event": {
        "description": "One NDJSON line of an event stream.",
        "type": "object", "required": ["type"],
        "properties": {
            "type": {"enum": ["ping", "queued", "placed", "step", "waiting", "requeued", "cancelling", "finished",
                              "failed", "cancelled", "model_loading", "model_loaded", "model_failed", "lease_expired",
                              "service_stopping", "executor_fault", "executor_draining", "executor_restarting",
                              "executor_restarted", "executor_restart_failed", "executor_broken", "executor_stalled",
                              "jobs_lost_in_restart"]},
            "seq": {"type": "integer"}, "at": {"type": "number"}, "job_id": {"type": "string"},
            "gpu_ids": {"type": "array", "items": {"type": "integer"}}, "sp_degree": {"type": "integer"},
            "num_steps": {"type": "integer"}, "step": {"type": "integer"}, "step_s": {"type": "number"},
            "steps_done": {"type": "integer"}, "predicted_finish_at": _NUM_OR_NULL, "deadline_at": _NUM_OR_NULL,
            "feasible": {"type": ["boolean", "null"]}, "met_deadline": {"type": ["boolean", "null"]},
            "error": _STR_OR_NULL, "reason": _STR_OR_NULL, "model": {"type": "string"},
            "workers_loaded": {"type": "integer"}, "num_workers": {"type": "integer"},
            "steps_lost": {"type": "integer"}, "num_faults": {"type": "integer"}, "max_faults": {"type": "integer"},
            "message": {"type": "string"},
        },
    },
    "LeaseRequest": {"type": "object", "additionalProperties": False,
                     "properties": {"tenant": _TOKEN, "ttl_s": {"type": "number", "minimum": 0.1}}},
    "Lease": {"type": "object", "required": ["lease", "tenant", "ttl_s", "expires_at"],
              "properties": {"lease": {"type": "string"}, "tenant": {"type": "string"}, "ttl_s": {"type": "number"},
                             "expires_at": {"type": "number"}, "num_jobs": {"type": "integer"},
                             "cancelled": {"type": "array", "items": {"type": "string"}}}},
    "ModelLoadRequest": {"type": "object", "required": ["model"], "additionalProperties": False,
                         "properties": {"model": {"type": "string"}, "dtype": {"enum": list(WEIGHT_DTYPES)}}},
    "Model": {"type": "object", "required": ["name", "status", "origin"],
              "properties": {"name": {"type": "string"}, "origin": {"enum": ["configured", "directory"]},
                             "status": {"enum": ["available", "loading", "loaded", "failed"]},
                             "family": {"type": "string"}, "num_heads": {"type": "integer"},
                             "in_channels": {"type": "integer"}, "context_dim": {"type": "integer"},
                             "pooled_dim": {"type": "integer"}, "guidance_embeds": {"type": "boolean"},
                             "dtype": {"type": "string"}, "error": {"type": "string"},
                             "storage": {"type": "string", "description": "how the weights are held (bf16, "
                                         "fp8_e4m3fn, gguf Q8_0, ...)"},
                             "resident_bytes": {"type": "object", "additionalProperties": {"type": "integer"},
                                                "description": "bytes of weights held, per worker device id"}}},
    "Health": {"type": "object", "required": ["status", "boot_id", "version"],
               "properties": {"status": {"enum": ["ok", "stopping"]}, "version": {"type": "string"},
                              "api": {"type": "string"}, "boot_id": {"type": "string"},
                              "simulated": {"type": "boolean"}, "policy": {"type": "string"},
                              "num_gpus": {"type": "integer"}, "auth": {"type": "boolean"},
                              "executor": {"type": "string"}, "executor_error": _STR_OR_NULL,
                              "executor_state": {"enum": ["ok", "degraded", "draining", "restarting", "broken"]},
                              "num_healthy_gpus": {"type": "integer"}}},
    "Executor": {"type": "object", "required": ["state", "gpu_ids", "healthy_gpu_ids"],
                 "properties": {"executor": {"type": "string"},
                                "state": {"enum": ["ok", "degraded", "draining", "restarting", "broken"]},
                                "recoverable": {"type": "boolean"}, "num_faults": {"type": "integer"},
                                "num_restarts": {"type": "integer"}, "last_fault": _STR_OR_NULL,
                                "error": _STR_OR_NULL, "degraded_since_at": _NUM_OR_NULL,
                                "last_restart_s": _NUM_OR_NULL,
                                "gpu_ids": {"type": "array", "items": {"type": "integer"}},
                                "healthy_gpu_ids": {"type": "array", "items": {"type": "integer"}},
                                "unavailable_gpu_ids": {"type": "array", "items": {"type": "integer"}},
                                "quarantined": {"type": "object", "additionalProperties": {"type": "string"}},
                                "busy_gpu_ids": {"type": "array", "items": {"type": "integer"}},
                                "workers": {"type": "array", "items": {"type": "object", "properties": {
                                    "gpu_id": {"type": "integer"}, "device": {"type": "string"},
                                    "pid": {"type": ["integer", "null"]}, "alive": {"type": "boolean"}}}}}},
    "Board": {"type": "object", "required": ["now_at", "gpu_ids", "assignments", "jobs", "sar"],
              "properties": {"now_at": {"type": "number"}, "window_s": {"type": "number"},
                             "boot_id": {"type": "string"}, "policy": {"type": "string"},
                             "gpu_ids": {"type": "array", "items": {"type": "integer"}},
                             "healthy_gpu_ids": {"type": "array", "items": {"type": "integer"}},
                             "busy_gpu_ids": {"type": "array", "items": {"type": "integer"}},
                             "round_index": {"type": "integer"},
                             "assignments": {"type": "array", "items": {"type": "object"}},
                             "jobs": {"type": "array", "items": {"type": "object"}},
                             "sar": {"type": "object"}}},
}


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
                           "responses": {"200": {"description": "models", "content": {"application/json": {"schema": {
                               "type": "object", "properties": {"models": {"type": "array", "items": {
                                   "$ref": "#/components/schemas/Model"}}}}}}}, **_err(401)}}},
    "/v1/models/load": {"post": {"operationId": "loadModel", "summary": "Load a model by configured name or file name",
                                 "requestBody": {"required": True, **_json("ModelLoadRequest")},
                                 "responses": {**_ok(200, "already loaded", "Model"), **_ok(202, "loading", "Model"),
                                               **_err(400, 401, 404, 413)}}},
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
                "responses": {"200": {"description": "jobs", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"jobs": {"type": "array", "items": {
                        "$ref": "#/components/schemas/Job"}}}}}}}, **_err(401)}}},
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
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{}, {"bearer": []}],
        "paths": PATHS,
    }


def openapi_document() -> dict:
    return copy.deepcopy(_document())
