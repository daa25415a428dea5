"""Typed bodies of API v1 (pydantic v2): the JSON requests the service validates and the responses it
sends. ``openapi.py`` generates ``/v1/openapi.json`` from these models and from ``JobSettings``
(schemas.py), so the document and the validation have one source.

Response models describe what handlers send (they are not instantiated on the hot path); their
optional fields may be absent, and extra fields are allowed so that a newer service stays
readable by older clients.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictStr, ValidationError
from typing_extensions import NotRequired, TypedDict

from ..errors import InvalidRequest

TOKEN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"
Token = Annotated[StrictStr, Field(pattern=TOKEN_PATTERN)]
ExecutorState = Literal["ok", "degraded", "draining", "restarting", "broken"]
JobState = Literal["queued", "running", "waiting", "finished", "failed", "cancelled"]
EVENT_TYPES = ("ping", "queued", "placed", "step", "waiting", "requeued", "cancelling", "finished", "failed",
               "cancelled", "model_loading", "model_loaded", "model_failed", "model_unloaded", "model_resident",
               "model_load_failed", "lease_expired", "service_stopping",
               "executor_fault", "executor_draining", "executor_restarting", "executor_restarted",
               "executor_restart_failed", "executor_broken", "executor_stalled", "jobs_lost_in_restart")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ------------------------------------------------------------------ requests
class LeaseRequest(_Request):
    tenant: Token = "default"
    ttl_s: Annotated[StrictFloat, Field(ge=0.1)] | None = None


class ModelLoadRequest(_Request):
    model: StrictStr
    dtype: Literal["bf16", "fp16", "fp32"] | None = None


class ModelUnloadRequest(_Request):
    model: StrictStr


def validation_message(exc: ValidationError, what: str, known: tuple[str, ...] = ()) -> str:
    """One line naming every field that is wrong, for an InvalidRequest."""
    unknown = [str(e["loc"][0]) for e in exc.errors() if e["type"] in ("extra_forbidden", "unexpected_keyword_argument")]
    if unknown:
        listed = f" (known: {', '.join(known)})" if known else ""
        return f"unknown {what}(s): {', '.join(unknown)}{listed}"
    parts = []
    for e in exc.errors():
        field = ".".join(str(p) for p in e["loc"])
        if e["type"] == "missing":
            parts.append(f"{what} {field!r} is required")
        else:
            parts.append(f"{what} {field}: {e['msg']}" if field else f"{what}: {e['msg']}")
    return "; ".join(parts)


def parse_request(model: type[_Request], data: object) -> _Request:
    """A JSON request body as its model; InvalidRequest naming the wrong fields."""
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc, "field", tuple(model.model_fields))) from None


# ----------------------------------------------------------------- responses
class ErrorDetail(TypedDict):
    code: str
    message: str
    status: int


class Error(TypedDict):
    error: ErrorDetail


class Job(TypedDict):
    job_id: str
    status: JobState
    boot_id: str
    steps_done: int
    num_steps: int
    simulated: bool
    job_key: NotRequired[str | None]
    model: NotRequired[str]
    tenant: NotRequired[str]
    lease: NotRequired[str | None]
    height: NotRequired[int]
    width: NotRequired[int]
    batch: NotRequired[int]
    priority: NotRequired[int]
    gpu_ids: NotRequired[list[int]]
    sp_degree: NotRequired[int]
    submitted_at: NotRequired[float]
    deadline_at: NotRequired[float | None]
    predicted_finish_at: NotRequired[float | None]
    feasible: NotRequired[bool | None]
    first_step_at: NotRequired[float | None]
    ended_at: NotRequired[float | None]
    met_deadline: NotRequired[bool | None]
    error: NotRequired[str | None]
    error_code: NotRequired[str | None]
    cancel_reason: NotRequired[str | None]
    result_ready: NotRequired[bool]
    last_event_seq: NotRequired[int]
    existing: NotRequired[bool]
    num_faults: NotRequired[Annotated[int, Field(description="times the job was on devices that failed")]]
    last_fault: NotRequired[str | None]
    links: NotRequired[dict[str, str]]


class JobList(TypedDict):
    jobs: list[Job]


class Event(TypedDict):
    """One NDJSON line of an event stream."""

    type: Literal[EVENT_TYPES]  # type: ignore[valid-type]
    seq: NotRequired[int]
    at: NotRequired[float]
    job_id: NotRequired[str]
    gpu_ids: NotRequired[list[int]]
    sp_degree: NotRequired[int]
    num_steps: NotRequired[int]
    step: NotRequired[int]
    step_s: NotRequired[float]
    steps_done: NotRequired[int]
    predicted_finish_at: NotRequired[float | None]
    deadline_at: NotRequired[float | None]
    feasible: NotRequired[bool | None]
    met_deadline: NotRequired[bool | None]
    error: NotRequired[str | None]
    reason: NotRequired[str | None]
    model: NotRequired[str]
    workers_loaded: NotRequired[int]
    num_workers: NotRequired[int]
    steps_lost: NotRequired[int]
    num_faults: NotRequired[int]
    max_faults: NotRequired[int]
    message: NotRequired[str]
    load_s: NotRequired[Annotated[float, Field(description="model_loaded: seconds the load took")]]


class Lease(TypedDict):
    lease: str
    tenant: str
    ttl_s: float
    expires_at: float
    num_jobs: NotRequired[int]
    cancelled: NotRequired[list[str]]


class Model(TypedDict):
    name: str
    origin: Literal["configured", "directory"]
    status: Literal["available", "loading", "loaded", "failed"]
    family: NotRequired[str]
    num_heads: NotRequired[int]
    in_channels: NotRequired[int]
    context_dim: NotRequired[int]
    pooled_dim: NotRequired[int]
    guidance_embeds: NotRequired[bool]
    concat_channels: NotRequired[Annotated[int, Field(description="FLUX Fill: extra input channels (80)")]]
    dtype: NotRequired[str]
    error: NotRequired[str]
    priced_as: NotRequired[str]
    modelled: NotRequired[Annotated[bool, Field(description="priced by a FLOP ratio, not a measured profile")]]
    flop_ratio_1024: NotRequired[float]
    resident_on: NotRequired[list[int]]
    loading_on: NotRequired[list[int]]
    unloaded_from: NotRequired[list[int]]
    bytes_per_worker: NotRequired[int]
    last_used_at: NotRequired[float | None]
    pinned: NotRequired[bool]
    load_s_predicted: NotRequired[float]


class ModelList(TypedDict):
    models: list[Model]


class Health(TypedDict):
    status: Literal["ok", "stopping"]
    version: str
    boot_id: str
    api: NotRequired[str]
    simulated: NotRequired[bool]
    policy: NotRequired[str]
    num_gpus: NotRequired[int]
    auth: NotRequired[bool]
    executor: NotRequired[str]
    executor_error: NotRequired[str | None]
    executor_state: NotRequired[ExecutorState]
    num_healthy_gpus: NotRequired[int]


class Worker(TypedDict):
    gpu_id: NotRequired[int]
    device: NotRequired[str]
    pid: NotRequired[int | None]
    alive: NotRequired[bool]


class Node(TypedDict):
    """Cluster mode (serve --cluster ray): one node, its GPU ids and whether it is up."""

    node: NotRequired[int]
    node_id: NotRequired[str]
    address: NotRequired[str]
    gpu_ids: NotRequired[list[int]]
    alive: NotRequired[bool]
    error: NotRequired[str | None]


class Executor(TypedDict):
    state: ExecutorState
    gpu_ids: list[int]
    healthy_gpu_ids: list[int]
    executor: NotRequired[str]
    recoverable: NotRequired[bool]
    num_faults: NotRequired[int]
    num_restarts: NotRequired[int]
    last_fault: NotRequired[str | None]
    error: NotRequired[str | None]
    degraded_since_at: NotRequired[float | None]
    last_restart_s: NotRequired[float | None]
    unavailable_gpu_ids: NotRequired[list[int]]
    quarantined: NotRequired[dict[str, str]]
    busy_gpu_ids: NotRequired[list[int]]
    workers: NotRequired[list[Worker]]
    nodes: NotRequired[list[Node]]
    moves: NotRequired[dict]


class Board(TypedDict):
    now_at: float
    gpu_ids: list[int]
    device_labels: NotRequired[Annotated[dict[str, str], Field(description="device id -> 'GPU 3', 'CPU 1', 'sim 0'")]]
    assignments: list[dict]
    jobs: list[dict]
    sar: dict
    window_s: NotRequired[float]
    boot_id: NotRequired[str]
    policy: NotRequired[str]
    healthy_gpu_ids: NotRequired[list[int]]
    busy_gpu_ids: NotRequired[list[int]]
    round_index: NotRequired[int]
    nodes: NotRequired[list[Node]]
    loads: NotRequired[Annotated[list[dict], Field(description="model loads in the window (devices x time)")]]


class Latency(TypedDict):
    """Nearest-rank percentiles of submission-to-finish seconds of finished jobs (null: none)."""

    p50_s: float | None
    p90_s: float | None
    p99_s: float | None


class UsageGroup(TypedDict):
    key: str
    num_jobs: int
    num_finished: int
    num_failed: int
    num_cancelled: int
    num_lost: int
    num_open: int
    gpu_hours: float
    num_deadline_jobs: int
    num_met: int
    sar: float | None
    latency: Latency


class UsageDay(TypedDict):
    day: Annotated[str, Field(description="UTC day of submission, YYYY-MM-DD")]
    num_jobs: int
    gpu_hours: Annotated[dict[str, float], Field(description="device-hours by group key")]
    num_deadline_jobs: int
    num_met: int
    sar: float | None
    latency: Latency


class Usage(TypedDict):
    """Jobs submitted in [since, until) from the job history, by tenant or model and by day."""

    since: float
    until: float
    by: Literal["tenant", "model"]
    history: Annotated[bool, Field(description="false: the service keeps no history (--journal off)")]
    num_jobs: int
    gpu_hours: float
    sar: float | None
    latency: Latency
    groups: list[UsageGroup]
    days: list[UsageDay]


#: every model the document lists under components/schemas (JobSettings comes from schemas.py)
COMPONENTS: tuple[type, ...] = (Error, Job, JobList, Event, LeaseRequest, Lease, ModelLoadRequest, ModelUnloadRequest,
                                Model,
                                           ModelList, Health, Executor, Board, Usage)
