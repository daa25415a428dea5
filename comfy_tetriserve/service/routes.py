"""HTTP handlers of API version 1 (docs/api.md; the OpenAPI document is openapi.py).

Handlers validate, call the service's parts and shape JSON; they never pick HTTP statuses for
errors: they raise the package's errors and app.py's middleware maps each class to its status.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import contextlib
import math
import time
from pathlib import Path

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from .. import __version__
from ..errors import Conflict, InvalidRequest, PayloadTooLarge, RequestTimeout, ServiceUnavailable, TooManyRequests
from ..types import GenRequest
from .board import DEFAULT_WINDOW_S, MAX_WINDOW_S, board_json, device_labels
from .catalog import ModelStatus, check_model_name
from .api_models import LeaseRequest, ModelLoadRequest, parse_request
from .encoding import decode_body
from .events import stream_ndjson
from .jobs import Job, JobStatus
from .openapi import AFTER, NDJSON, SAFETENSORS, TOKEN, documented, header, json_body, openapi_document, query
from .loras import with_loras
from .image_inputs import priced_size
from .schemas import check_tensors, check_token, parse_body, resolve_job
from .state import SERVICE, Service
from . import usage

MAX_JSON_BYTES = 64 * 1024
LEASE_HEADER = "X-TetriServe-Lease"
KEY_HEADER = "Idempotency-Key"
STATIC_DIR = Path(__file__).parent / "static"

routes = web.RouteTableDef()


# ----------------------------------------------------------------- helpers
async def read_body(request: web.Request, svc: Service) -> bytes:
    if request.content_length is not None and request.content_length > svc.config.max_body_bytes:
        raise PayloadTooLarge(f"request body larger than the limit of {svc.config.max_body_mb:g} MiB "
                              f"(Content-Length {request.content_length})")
    try:
        raw = await asyncio.wait_for(request.read(), svc.config.body_timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"request body not received within {svc.config.body_timeout_s:g} s") from None
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body larger than the limit of {svc.config.max_body_mb:g} MiB") from None
    except (ConnectionError, aiohttp.ClientPayloadError, aiohttp.http_exceptions.HttpProcessingError,
            RequestPayloadError) as exc:
        raise InvalidRequest(f"request body cut short ({type(exc).__name__}: {exc})") from None
    return decode_body(raw, request.headers.get("Content-Encoding"), svc.config.max_body_bytes)


async def read_json(request: web.Request, svc: Service, allowed: tuple[str, ...]) -> dict:
    if request.content_length is not None and request.content_length > MAX_JSON_BYTES:
        raise PayloadTooLarge(f"JSON body larger than {MAX_JSON_BYTES} bytes")
    body = await read_body(request, svc)
    if len(body) > MAX_JSON_BYTES:
        raise PayloadTooLarge(f"JSON body larger than {MAX_JSON_BYTES} bytes")
    if not body.strip():
        data: object = {}
    else:
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidRequest(f"body is not valid JSON: {exc}") from None
        except RecursionError:
            raise InvalidRequest("body is not acceptable JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)} (known: {', '.join(allowed)})")
    return data


def query_number(request: web.Request, name: str, default: float, lo: float, hi: float, integer: bool = False) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise InvalidRequest(f"query parameter {name} must be {'an integer' if integer else 'a number'}") from None
    if not (math.isfinite(value) and lo <= value <= hi):
        raise InvalidRequest(f"query parameter {name} must be between {lo:g} and {hi:g}")
    return value


def job_json(svc: Service, job: Job) -> dict:
    out = job.to_json(svc.clock, svc.store.boot_id)
    out["links"] = {name: f"/v1/jobs/{job.job_id}{suffix}"
                    for name, suffix in (("status", ""), ("events", "/events"), ("result", "/result"),
                                         ("cancel", "/cancel"))}
    return out


# ------------------------------------------------------------------ service
@routes.get("/v1/health")
@documented("health", "Liveness, version and boot id", ok={200: ("alive", "Health")})
async def health(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    return web.json_response({
        "status": "ok" if svc.loop.accepting else "stopping", "version": __version__, "api": "v1",
        "boot_id": svc.store.boot_id, "simulated": svc.loop.simulated, "policy": svc.policy_name,
        "num_gpus": len(svc.engine.all_gpu_ids), "auth": bool(svc.config.token),
        "executor": type(svc.executor).__name__, "executor_error": svc.loop.executor_fault(),
        "executor_state": svc.loop.recovery.state.value, "num_healthy_gpus": len(svc.engine.healthy_gpu_ids),
    })


@routes.get("/v1/executor")
@documented("executorStatus", "The devices' health: recovery state, faults, restarts, workers",
            ok={200: ("executor", "Executor")}, errors=(401,))
async def executor_status(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    return web.json_response(svc.executor_json())


@routes.get("/v1/openapi.json")
@documented("openapi", "This document",
            ok={200: ("OpenAPI document", {"application/json": {"schema": {"type": "object"}}})})
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


@routes.get("/v1/metrics")
@documented("metrics", "Prometheus metrics (text format 0.0.4)",
            ok={200: ("metrics", {"text/plain": {"schema": {"type": "string"}}})})
async def metrics(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    text = svc.render_metrics()
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Format": "prometheus-text-0.0.4"})


@routes.get("/v1/board")
@documented("board", "Recent and current assignments, jobs, SAR", ok={200: ("board", "Board")}, errors=(400, 401),
            query=(query("window_s", {"type": "number", "minimum": 1, "maximum": 3600}),))
async def board(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    window = query_number(request, "window_s", DEFAULT_WINDOW_S, 1.0, MAX_WINDOW_S)
    return web.json_response(board_json(svc.engine, svc.store, svc.metrics, svc.clock, window_s=window,
                                        policy=svc.policy_name, nodes=svc.nodes_json(), executor=svc.executor,
                                        labels=device_labels(svc.executor, svc.engine.all_gpu_ids)))


@contextlib.contextmanager
def stream_slot(svc: Service):
    """One of the ``max_event_streams`` open event streams (429 when none is left)."""
    if svc.open_streams >= svc.config.max_event_streams:
        raise TooManyRequests(f"{svc.open_streams} event streams are open, the limit; close some or poll the status")
    svc.open_streams += 1
    try:
        yield
    finally:
        svc.open_streams -= 1


@routes.get("/v1/events")
@documented("serviceEvents", "Service-wide NDJSON event stream", ok={200: ("stream", NDJSON)},
            errors=(400, 401, 429), query=(AFTER,))
async def service_events(request: web.Request) -> web.StreamResponse:
    svc: Service = request.app[SERVICE]
    after = int(query_number(request, "after", 0, 0, 2**62, integer=True))
    with stream_slot(svc):
        return await stream_ndjson(request, svc.hub, after, svc.config.events_ping_s, done=lambda e: False)


# ------------------------------------------------------------------- models
@routes.get("/v1/models")
@documented("listModels", "Configured, loadable and loaded models", ok={200: ("models", "ModelList")},
            errors=(401,))
async def list_models(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    return web.json_response({"models": svc.catalog.listing()})


@routes.post("/v1/models/load")
@documented("loadModel", "Load a model by configured name or file name", body=json_body("ModelLoadRequest"),
            ok={200: ("already loaded", "Model"), 202: ("loading", "Model")}, errors=(400, 401, 404, 413))
async def load_model(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    body = parse_request(ModelLoadRequest, await read_json(request, svc, tuple(ModelLoadRequest.model_fields)))
    name = check_model_name(body.model)
    dtype = body.dtype or svc.config.dtype
    entry = svc.catalog.start_load(name, dtype)
    return web.json_response(entry.to_json(), status=200 if entry.status is ModelStatus.LOADED else 202)


@routes.post("/v1/models/unload")
@documented("unloadModel", "Free a loaded model's weights on every worker (a later job loads it again)",
            body=json_body("ModelUnloadRequest"), ok={200: ("unloaded", "Model")}, errors=(400, 401, 404, 409, 413))
async def unload_model(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    data = await read_json(request, svc, ("model",))
    return web.json_response(await svc.catalog.unload(check_model_name(data.get("model"))))


@routes.get("/v1/models/{name:.+}")
@documented("modelStatus", "One model's load state", ok={200: ("model", "Model")}, errors=(400, 401, 404))
async def model_status(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    return web.json_response(svc.catalog.describe(request.match_info["name"]))


# ------------------------------------------------------------------- leases
@routes.post("/v1/leases")
@documented("createLease", "Open a lease (heartbeat it or its jobs are cancelled)",
            body=json_body("LeaseRequest", required=False), ok={201: ("lease", "Lease")}, errors=(400, 401, 413, 429))
async def create_lease(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    body = parse_request(LeaseRequest, await read_json(request, svc, tuple(LeaseRequest.model_fields)))
    ttl = body.ttl_s
    if ttl is not None and ttl > 10 * svc.config.lease_s:
        raise InvalidRequest(f"ttl_s must be a number between 0.1 and {10 * svc.config.lease_s:g}")
    lease = svc.store.create_lease(body.tenant, ttl)
    return web.json_response(lease.to_json(svc.clock), status=201)


@routes.post("/v1/leases/{lease_id}/heartbeat")
@documented("heartbeat", "Renew a lease", ok={200: ("renewed", "Lease")}, errors=(401, 404))
async def heartbeat(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    return web.json_response(svc.store.renew(request.match_info["lease_id"]).to_json(svc.clock))


@routes.delete("/v1/leases/{lease_id}")
@documented("releaseLease", "Close a lease and cancel its unfinished jobs", ok={200: ("released", "Lease")},
            errors=(401, 404))
async def release_lease(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    lease = svc.store.drop_lease(request.match_info["lease_id"])
    cancelled = []
    for job_id in sorted(lease.job_ids):
        job = svc.store.jobs.get(job_id)
        if job is not None and not job.status.is_terminal and job.cancel_reason is None:
            try:
                await svc.loop.cancel(job, "lease released")
                cancelled.append(job_id)
            except Conflict:
                pass
    return web.json_response({**lease.to_json(svc.clock), "cancelled": cancelled})


# --------------------------------------------------------------------- jobs
def _digest_and_parse(body: bytes, config):
    """Off the event loop: the body's digest (idempotency-key reuse check; hashing a 1024 px body of
    about 9 MB takes milliseconds) and its settings and tensors."""
    return hashlib.sha256(body).hexdigest(), parse_body(body, config)


@routes.post("/v1/jobs")
@documented("submitJob", "Submit a job: a safetensors body, settings (JobSettings) as JSON in metadata key 'tetriserve'",
            headers=(header(KEY_HEADER, TOKEN), header(LEASE_HEADER, TOKEN)),
            body={"required": True, "content": SAFETENSORS},
            ok={202: ("accepted", "Job"), 200: ("existing job with this key", "Job")},
            errors=(400, 401, 404, 408, 409, 413, 429, 503))
async def submit(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    if not svc.loop.accepting:
        raise ServiceUnavailable("the service is shutting down")
    body = await read_body(request, svc)
    received_at = svc.clock.now()
    digest, (settings, tensors) = await asyncio.get_running_loop().run_in_executor(None, _digest_and_parse, body,
                                                                                     svc.config)
    del body
    if request.headers.get(KEY_HEADER) and settings.job_key is None:
        settings = dataclasses.replace(settings, job_key=check_token(request.headers[KEY_HEADER], KEY_HEADER))
    if request.headers.get(LEASE_HEADER) and settings.lease is None:
        settings = dataclasses.replace(settings, lease=check_token(request.headers[LEASE_HEADER], LEASE_HEADER))
    lease = svc.store.lease(settings.lease) if settings.lease else None
    tenant = settings.tenant or (lease.tenant if lease else "default")
    existing = svc.store.find_by_key(tenant, settings.job_key)
    if existing is not None:
        svc.store.check_key_reuse(existing, digest)
        return web.json_response({**job_json(svc, existing), "existing": True}, status=200)
    info = svc.catalog.info(settings.model)
    check_tensors(settings, tensors, info, svc.config)
    if settings.expert_model is not None:  # a two-expert job: both experts loaded and interchangeable
        from ..core.experts import check_experts
        check_experts(info, svc.catalog.info(settings.expert_model))
    svc.store.check_capacity(tenant)
    job_id = svc.store.new_job_id()
    sampling_job = await asyncio.get_running_loop().run_in_executor(None, resolve_job, job_id, settings, tensors, info)
    sampling_job, adapter = with_loras(sampling_job, settings, svc.config.lora_dir)
    height, width = (int(d) * 8 for d in tensors["latent"].shape[-2:])
    if tensors["latent"].ndim == 5:  # video: frames fold into the height, so the cost model sees the token count
        height *= int(tensors["latent"].shape[2])
    height, width = priced_size(height, width, sampling_job.num_reference_tokens)  # Kontext: + reference tokens
    gen = GenRequest(
        request_id=job_id, model=settings.model, height=height, width=width, num_steps=sampling_job.num_steps,
        arrival_at=received_at,
        deadline_at=None if settings.deadline_s is None else received_at + settings.deadline_s,
        batch=sampling_job.batch, sampler=settings.sampler, tenant=tenant, priority=settings.priority,
        adapter=adapter,
    )
    job = Job(job_id=job_id, settings=settings, request=gen, tenant=tenant,
              lease_id=lease.lease_id if lease else None, body_digest=digest, submitted_at=received_at,
              simulated=svc.loop.simulated, family=info.family)
    existing = svc.store.find_by_key(tenant, settings.job_key)  # a twin may have landed while we parsed
    if existing is not None:
        svc.store.check_key_reuse(existing, digest)
        return web.json_response({**job_json(svc, existing), "existing": True}, status=200)
    if lease is not None and lease.lease_id not in svc.store.leases:
        svc.store.lease(lease.lease_id)  # expired while we parsed: NotFound
    await svc.loop.admit(job, sampling_job)
    return web.json_response({**job_json(svc, job), "existing": False}, status=202,
                             headers={"Location": f"/v1/jobs/{job_id}"})


@routes.get("/v1/jobs")
@documented("listJobs", "Jobs the service holds", ok={200: ("jobs", "JobList")}, errors=(401,),
            query=(query("tenant", {"type": "string"}), query("lease", {"type": "string"})))
async def list_jobs(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    tenant = request.query.get("tenant")
    lease = request.query.get("lease")
    jobs = [job_json(svc, j) for j in svc.store.jobs.values()
            if (tenant is None or j.tenant == tenant) and (lease is None or j.lease_id == lease)]
    return web.json_response({"jobs": jobs})


@routes.get("/v1/jobs/{job_id}")
@documented("jobStatus", "A job's status", ok={200: ("status", "Job")}, errors=(401, 404, 410))
async def job_status(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    return web.json_response(job_json(svc, svc.store.get(request.match_info["job_id"])))


@routes.get("/v1/jobs/{job_id}/events")
@documented("jobEvents", "A job's NDJSON event stream (ends after its terminal event)",
            ok={200: ("stream", NDJSON)}, errors=(400, 401, 404, 410, 429), query=(AFTER,))
async def job_events(request: web.Request) -> web.StreamResponse:
    svc: Service = request.app[SERVICE]
    job = svc.store.get(request.match_info["job_id"])
    after = int(query_number(request, "after", 0, 0, 2**62, integer=True))
    with stream_slot(svc):
        return await stream_ndjson(request, job.events, after, svc.config.events_ping_s)


@routes.get("/v1/jobs/{job_id}/result")
@documented("jobResult", "The result: safetensors with tensor 'latent'", ok={200: ("result", SAFETENSORS)},
            errors=(401, 404, 409, 410))
async def job_result(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    job = svc.store.get(request.match_info["job_id"])
    if job.status is not JobStatus.FINISHED or job.result is None:
        detail = f": {job.error}" if job.error else ""
        raise Conflict(f"job {job.job_id} is {job.status.value}{detail}; a result exists only once it finished")
    if job.fetched_at is None:
        job.fetched_at = svc.clock.now()
    return web.Response(body=job.result, content_type="application/octet-stream",
                        headers={"X-TetriServe-Simulated": "true" if job.simulated else "false"})


@routes.post("/v1/jobs/{job_id}/cancel")
@documented("cancelJob", "Cancel a job (frees its devices by the next step boundary)",
            ok={202: ("cancelling or cancelled", "Job")}, errors=(401, 404, 409, 410))
async def cancel_job(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    job = svc.store.get(request.match_info["job_id"])
    await svc.loop.cancel(job, "cancelled by client")
    return web.json_response(job_json(svc, job), status=202)


# -------------------------------------------------------------------- usage
@routes.get("/v1/usage")
@documented("usage", "GPU-hours, SAR and latency by tenant or model and by day (job history)",
            ok={200: ("usage", "Usage")}, errors=(400, 401),
            query=(query("since", {"type": "string"}, "unix seconds or ISO 8601 date (default: until minus 7 days)"),
                   query("until", {"type": "string"}, "unix seconds or ISO 8601 date (default: now)"),
                   query("by", {"enum": ["tenant", "model"]})))
async def usage_report(request: web.Request) -> web.Response:
    svc: Service = request.app[SERVICE]
    now = time.time()
    until = usage.parse_time(request.query.get("until"), now, "until")
    since = usage.parse_time(request.query.get("since"), until - usage.DEFAULT_SPAN_S, "since")
    by = request.query.get("by", "tenant")
    path = str(svc.store.history.path) if svc.store.history.enabled else None
    return web.json_response(await asyncio.to_thread(usage.report, path, since, until, by))


@routes.get("/usage")
async def usage_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "usage.html")


# -------------------------------------------------------------- dashboard
@routes.get("/")
async def root(request: web.Request) -> web.Response:
    raise web.HTTPFound("/dashboard")


@routes.get("/dashboard")
async def dashboard(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


routes.static("/static", STATIC_DIR)
