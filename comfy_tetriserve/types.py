"""Data objects shared by the planner, the engine, the simulator and the service.

Everything here is a frozen dataclass or an enum, free of torch and of any clock: a value
describes a request, what the planner sees, what it decides and what came of it.

Units: absolute clock times end in ``_at`` (seconds on whatever clock the engine runs: wall
or virtual), durations in ``_s``. GPU ids are small ints; a placement is a sorted tuple of them.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .errors import InvalidRequest

#: Pixels per latent token side for FLUX and SD3 (VAE factor 8 x patch 2).
PIXELS_PER_TOKEN = 16


class RequestStatus(enum.Enum):
    """Life cycle of one request inside the engine."""

    QUEUED = "queued"  # admitted, no step run yet, not on any GPU
    RUNNING = "running"  # an assignment of it is in flight
    WAITING = "waiting"  # some steps done, not on GPUs right now
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.CANCELLED, RequestStatus.FAILED)


@dataclass(frozen=True)
class GenRequest:
    """What was asked: immutable once admitted.

    ``batch`` is the number of sequences one denoising step pushes through the DiT
    (images per request times CFG branches); the cost model prices a step by it.
    ``deadline_at`` of None means best effort: served with GPUs no deadline needs.
    """

    request_id: str
    model: str
    height: int
    width: int
    num_steps: int
    arrival_at: float
    deadline_at: float | None = None
    batch: int = 1
    sampler: str = "euler"
    tenant: str = "default"
    priority: int = 0
    adapter: str = ""  # the LoRA stack's identity; only requests with equal stacks share a batched step

    def __post_init__(self) -> None:
        if not self.request_id:
            raise InvalidRequest("request_id must not be empty")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value <= 0 or value % PIXELS_PER_TOKEN:
                raise InvalidRequest(f"{name} must be a positive multiple of {PIXELS_PER_TOKEN}, got {value}")
        if self.num_steps < 1:
            raise InvalidRequest(f"num_steps must be >= 1, got {self.num_steps}")
        if self.batch < 1:
            raise InvalidRequest(f"batch must be >= 1, got {self.batch}")
        if self.deadline_at is not None and self.deadline_at < self.arrival_at:
            raise InvalidRequest("deadline_at lies before arrival_at")

    @property
    def num_image_tokens(self) -> int:
        return (self.height // PIXELS_PER_TOKEN) * (self.width // PIXELS_PER_TOKEN)

    @property
    def has_deadline(self) -> bool:
        return self.deadline_at is not None

    @property
    def shape_key(self) -> tuple[str, int, int, int]:
        """Requests with equal keys can share one batched step."""
        return (self.model, self.height, self.width, self.batch) + ((self.adapter,) if self.adapter else ())


@dataclass(frozen=True)
class RequestState:
    """What became of a request so far; owned and replaced (never mutated) by the engine."""

    request: GenRequest
    status: RequestStatus = RequestStatus.QUEUED
    steps_done: int = 0
    gpu_ids: tuple[int, ...] = ()  # placement of the latest assignment
    busy_until_at: float | None = None  # expected end of the assignment in flight
    first_step_at: float | None = None
    finished_at: float | None = None
    gpu_seconds: float = 0.0
    error: str | None = None
    cancel_requested: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def steps_left(self) -> int:
        return self.request.num_steps - self.steps_done

    @property
    def met_deadline(self) -> bool | None:
        """True/False once finished with a deadline; None while open or best effort."""
        if self.request.deadline_at is None or self.status is not RequestStatus.FINISHED:
            return None
        assert self.finished_at is not None
        return self.finished_at <= self.request.deadline_at + 1e-9


@dataclass(frozen=True)
class RequestSnapshot:
    """One unfinished request as the planner sees it."""

    request: GenRequest
    steps_done: int
    gpu_ids: tuple[int, ...] = ()  # latest placement, kept if possible (placement preservation)
    running_until_at: float | None = None  # set while an assignment of it is in flight
    steps_in_flight: int = 0  # steps of that assignment (counted in steps_done only when it ends)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def steps_left(self) -> int:
        return self.request.num_steps - self.steps_done

    @property
    def is_running(self) -> bool:
        return self.running_until_at is not None


@dataclass(frozen=True)
class PlacementView:
    """Where models live, for a model-affine policy (None on a view: every model is everywhere).

    ``holding``: model -> GPUs whose memory holds it now; ``loading``: GPU -> (model, expected end
    of its load) for loads in flight (those GPUs are in ``busy_gpu_ids`` too); ``free_bytes``: per
    GPU, budget minus what it holds or is loading; ``model_bytes``: weights of one copy;
    ``load_s``: predicted seconds to load a model onto a device (bytes / load bandwidth);
    ``pinned``: never evicted. ``last_used_at``: model -> GPU -> last use (eviction tie-breaks).
    """

    holding: dict[str, frozenset[int]]
    loading: dict[int, tuple[str, float]]
    free_bytes: dict[int, int]
    model_bytes: dict[str, int]
    load_s: dict[str, float]
    pinned: frozenset[str] = frozenset()
    #: model -> its share of the work that arrived lately (decaying), a memory the pure policy lacks
    recent_share: dict[str, float] = field(default_factory=dict)

    def models_on(self, gpu: int) -> tuple[str, ...]:
        return tuple(m for m, gpus in self.holding.items() if gpu in gpus)


@dataclass(frozen=True)
class SchedulerView:
    """Everything a policy may look at when it plans: a value, no clock, no I/O.

    ``gpu_ids`` are the healthy GPUs; ``busy_gpu_ids`` those still running an earlier
    assignment (not plannable now). ``groups`` are the placements the executor can run
    (process groups that exist), each a sorted tuple of GPU ids. ``warm``: the keys
    (group, model, height, width, batch) the executor has captured (core/warmup.py); None when
    the executor does not report them (then no warm-up is priced).
    """

    now: float
    round_index: int
    gpu_ids: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    requests: tuple[RequestSnapshot, ...]
    busy_gpu_ids: frozenset[int] = frozenset()
    placement: PlacementView | None = None
    warm: frozenset | None = None

    @property
    def free_gpu_ids(self) -> tuple[int, ...]:
        return tuple(g for g in self.gpu_ids if g not in self.busy_gpu_ids)

    @property
    def plannable(self) -> tuple[RequestSnapshot, ...]:
        """Requests that may receive an assignment now (not running, steps left)."""
        return tuple(r for r in self.requests if not r.is_running and r.steps_left > 0)

    def free_groups(self, size: int | None = None) -> tuple[tuple[int, ...], ...]:
        busy = self.busy_gpu_ids
        healthy = set(self.gpu_ids)
        return tuple(
            g for g in self.groups
            if (size is None or len(g) == size) and healthy.issuperset(g) and busy.isdisjoint(g)
        )


@dataclass(frozen=True)
class Assignment:
    """Run ``num_steps`` steps of the request(s) on ``gpu_ids``; several ids = one batched step."""

    request_ids: tuple[str, ...]
    gpu_ids: tuple[int, ...]
    num_steps: int

    @property
    def sp_degree(self) -> int:
        return len(self.gpu_ids)


@dataclass(frozen=True)
class ModelLoad:
    """Load ``model``'s weights onto each of ``gpu_ids`` (a copy per device); the devices are busy
    for about ``duration_s`` (the planner's prediction)."""

    model: str
    gpu_ids: tuple[int, ...]
    duration_s: float


@dataclass(frozen=True)
class ModelEviction:
    """Free ``model``'s weights on ``gpu_ids`` (at once, before the plan's loads)."""

    model: str
    gpu_ids: tuple[int, ...]


@dataclass(frozen=True)
class RoundPlan:
    """A policy's decision for one planning round. ``duration_s`` is the round length it aimed at.

    Besides assignments a plan may place models (when the view has a ``placement``): evictions
    happen first, then loads start on their (free) devices, which stay busy until the load ends.
    """

    round_index: int
    duration_s: float
    assignments: tuple[Assignment, ...] = ()
    note: str = ""
    loads: tuple[ModelLoad, ...] = ()
    evictions: tuple[ModelEviction, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.assignments and not self.loads and not self.evictions


@dataclass(frozen=True)
class AssignmentResult:
    """What an executor reports when an assignment ends (completely, stopped early, or failed)."""

    assignment: Assignment
    started_at: float
    finished_at: float
    steps_done: int
    step_times_s: tuple[float, ...] = field(default=())
    error: str | None = None
    #: the work was lost to a fault outside the requests (a worker died, ran out of memory): they
    #: may resume from their last checkpoint (``steps_done`` steps of this assignment are kept)
    lost: bool = False

    @property
    def elapsed_s(self) -> float:
        return self.finished_at - self.started_at
