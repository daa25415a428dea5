"""A simulated executor: the Executor protocol on the wall clock, without devices or images.

``SimulatedExecutor`` lets the whole service (HTTP API, leases, the round loop, the planner,
the board, metrics) run on a machine without GPUs: ``comfy-tetriserve serve --devices sim:8``.
Each step of an assignment takes the cost model's step time (times ``time_scale``) of real
time, per-step callbacks fire as they would on workers, and ``stop`` ends an assignment after
its current step. It computes nothing: ``fetch_result`` hands back the job's input latent
(model space), and the service marks every job run on it ``simulated`` in its status and
result. It is a mode for trying the scheduler, never a source of images.

Models: ``load_model(name, path)`` reads no weights. ``path`` ``sim:flux`` or ``sim:sd3``
names the family; any other path is only checked to exist, and its family is guessed from its
name ("sd3" in it: SD3, otherwise FLUX). Shapes follow the real models (FLUX.1-dev: 24 heads,
T5 context 4096, pooled 768, guidance; SD3-medium: 24 heads, context 4096, pooled 2048).

Warm-up: with a cost model whose ``capture_steps`` > 0 (a profile measured with CUDA graphs) each
device keeps a graph cache as GPU workers do (core/warmup.py, ``max_graphs`` keys a device): the
first step of an assignment whose key (group, shape) is cold on its group takes ``warmup_time_s``
more, and ``warm_keys()`` reports the keys warm on their whole group (None with ``capture_steps``
0: nothing is captured, nothing to price).

Faults (drills and tests of the service's recovery): ``fail_device(g)`` makes device ``g`` die as
a worker would: the assignment on it ends ``lost`` keeping the steps up to its latest checkpoint
(as on the worker pool: one at the end of each assignment, and one inside it once
``checkpoint_every_s`` of the executor's clock passed since the last), ``on_fault`` hears of it,
and the device stays down until ``restart()`` (which takes ``restart_delay_s``).

Imports neither torch nor diffusers.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..cost import CostModel, priced_size, warmup_time_s
from ..errors import Conflict, InvalidRequest, NotFound, WorkerError
from ..plan import aligned_groups
from ..types import PIXELS_PER_TOKEN, Assignment, AssignmentResult
from .executor import DevicesUnavailable, ModelInfo, SamplingJob, StepCallback, WorkerFault
from .warmup import MAX_GRAPHS, WarmTracker, capture_steps, warm_key

log = logging.getLogger(__name__)

#: The model shapes a simulated load reports, by family.
SIM_MODELS: dict[str, ModelInfo] = {
    "flux": ModelInfo(name="", family="flux", num_heads=24, in_channels=16, context_dim=4096,
                      pooled_dim=768, guidance_embeds=True),
    "sd3": ModelInfo(name="", family="sd3", num_heads=24, in_channels=16, context_dim=4096,
                     pooled_dim=2048, guidance_embeds=False),
}


def sim_family(path: str) -> str:
    """The family a simulated load reports for ``path`` (see the module docstring)."""
    if path.startswith("sim:"):
        family = path[4:]
        if family not in SIM_MODELS:
            raise InvalidRequest(f"unknown simulated model family {family!r} (known: {', '.join(SIM_MODELS)})")
        return family
    return "sd3" if "sd3" in os.path.basename(path.rstrip("/")).lower() else "flux"


@dataclass
class _SimRequest:
    job: SamplingJob
    steps_done: int = 0


class SimulatedExecutor:
    """Runs assignments as timed sleeps; see the module docstring."""

    simulated = True

    def __init__(self, num_gpus: int, cost: CostModel, *, time_scale: float = 1.0,
                 groups: tuple[tuple[int, ...], ...] | None = None, load_delay_s: float = 0.0,
                 restart_delay_s: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 checkpoint_every_s: float | None = 1.0, max_graphs: int = MAX_GRAPHS) -> None:
        if num_gpus < 1:
            raise InvalidRequest("a simulated executor needs at least one device")
        if not time_scale > 0:
            raise InvalidRequest("time_scale must be > 0")
        self._gpu_ids = tuple(range(num_gpus))
        self._groups = groups if groups is not None else aligned_groups(self._gpu_ids)
        self.cost = cost
        self.time_scale = time_scale
        self.load_delay_s = load_delay_s
        self._clock = clock
        self.checkpoint_every_s = checkpoint_every_s
        self._models: dict[str, tuple[str, ModelInfo]] = {}
        self._requests: dict[str, _SimRequest] = {}
        self._stops: dict[tuple[str, ...], asyncio.Event] = {}  # in-flight assignment -> stop flag
        self._running: dict[tuple[str, ...], tuple[tuple[int, ...], asyncio.Event]] = {}  # -> devices, lost flag
        self._lost: dict[tuple[str, ...], str] = {}  # in-flight assignment -> why it was lost
        self._closed = False
        self.restart_delay_s = restart_delay_s
        self._restarting = False
        #: device -> why it is down (until restart)
        self.dead: dict[int, str] = {}
        #: restarts still to fail (drills of a pool that cannot come back)
        self.fail_restarts = 0
        #: devices that hang: assignments on them make no progress until they are killed
        self.stalled: set[int] = set()
        self.num_restarts = 0
        self.on_fault: Callable[[WorkerFault], None] | None = None
        #: (request_ids, gpu_ids, num_steps) of recent assignments (the last 10000), for tests and the demo
        #: the devices' graph caches (only when the cost model prices a capture)
        self.warm = WarmTracker(max_graphs) if capture_steps(cost) > 0 else None
        self.history: deque[tuple[tuple[str, ...], tuple[int, ...], int]] = deque(maxlen=10_000)

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        return self._gpu_ids

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        return self._groups

    async def start(self) -> None:
        self._closed = False

    def warm_keys(self) -> frozenset | None:
        """Keys (group, model, height, width, batch) captured on their whole group; None: no capture."""
        return self.warm.keys() if self.warm is not None else None

    # ------------------------------------------------------------ faults
    @property
    def unavailable_gpu_ids(self) -> frozenset[int]:
        return frozenset(self._gpu_ids) if self._restarting else frozenset(self.dead)

    @property
    def needs_restart(self) -> str | None:
        return None if self._restarting or not self.dead else next(iter(self.dead.values()))

    def fail_device(self, gpu_id: int, reason: str | None = None) -> None:
        """Device ``gpu_id`` dies now (see the module docstring)."""
        if gpu_id not in self._gpu_ids:
            raise InvalidRequest(f"unknown device {gpu_id}")
        reason = reason or f"simulated device {gpu_id} failed"
        self.dead.setdefault(gpu_id, reason)
        collateral = any(gpu_id in gpus and ids in self._lost for ids, (gpus, _) in self._running.items())
        hit: list[str] = []
        for ids, (gpus, lost_flag) in self._running.items():
            if gpu_id in gpus and ids not in self._lost:
                self._lost[ids] = reason
                lost_flag.set()
                hit.extend(ids)
        if self.on_fault is not None:
            self.on_fault(WorkerFault(gpu_ids=(gpu_id,), reason=reason, request_ids=tuple(hit),
                                      collateral=collateral and not hit))

    def kill_workers(self, gpu_ids, reason: str) -> None:
        """As the worker pool's: the devices die (``fail_device``) with ``reason``."""
        for g in gpu_ids:
            if g not in self.dead:
                self.fail_device(g, f"simulated device {g} killed ({reason})")

    async def restart(self) -> None:
        self._restarting = True
        try:
            await asyncio.sleep(self.restart_delay_s)
            if self.fail_restarts > 0:
                self.fail_restarts -= 1
                raise WorkerError("simulated restart failure")
            self.dead.clear()
            self.stalled.clear()
            if self.warm is not None:  # new worker processes: no graph survives
                self.warm.clear()
            self.num_restarts += 1
        finally:
            self._restarting = False
            if self.on_fault is not None:
                self.on_fault(WorkerFault())

    async def load_model(self, name: str, path: str, dtype: str = "bf16",
                         on_progress: Callable[[int, int], None] | None = None) -> ModelInfo:
        known = self._models.get(name)
        if known is not None:
            if known[0] != path:
                raise Conflict(f"model {name!r} is loaded from another file")
            return known[1]
        family = sim_family(path)
        if not path.startswith("sim:") and not os.path.exists(path):
            raise NotFound(f"model file of {name!r} does not exist")
        if self.load_delay_s:
            await asyncio.sleep(self.load_delay_s)
        info = replace(SIM_MODELS[family], name=name, dtype=dtype, source=os.path.basename(path))
        self._models[name] = (path, info)
        if on_progress is not None:
            on_progress(len(self._gpu_ids), len(self._gpu_ids))
        return info

    async def admit(self, job: SamplingJob) -> None:
        if job.model not in self._models:
            raise NotFound(f"model {job.model!r} is not loaded")
        if job.request_id in self._requests:
            raise Conflict(f"request {job.request_id} admitted twice")
        self._requests[job.request_id] = _SimRequest(job)

    def _shape(self, assignment: Assignment) -> tuple[str, int, int, int]:
        job = self._requests[assignment.request_ids[0]].job
        height, width = int(job.latent.shape[-2]) * 8, int(job.latent.shape[-1]) * 8
        height -= height % PIXELS_PER_TOKEN
        width -= width % PIXELS_PER_TOKEN
        height, width = priced_size(height, width, job.num_reference_tokens)  # FLUX Kontext references
        batch = sum(self._requests[r].job.batch for r in assignment.request_ids)
        return job.model, height, width, batch

    def step_time_s(self, assignment: Assignment) -> float:
        model, height, width, batch = self._shape(assignment)
        return self.time_scale * self.cost.step_time_s(model, height, width, batch, assignment.sp_degree)

    def warmup_s(self, assignment: Assignment) -> float:
        """What the assignment's first step adds: the capture when its key is cold on its group."""
        if self.warm is None:
            return 0.0
        model, height, width, batch = self._shape(assignment)
        if self.warm.is_warm(warm_key(assignment.gpu_ids, model, height, width, batch)):
            return 0.0
        return self.time_scale * warmup_time_s(self.cost, model, height, width, batch, assignment.sp_degree)

    async def execute(self, assignment: Assignment, on_step: StepCallback | None = None) -> AssignmentResult:
        if self._closed:
            raise Conflict("executor is closed")
        for rid in assignment.request_ids:
            if rid not in self._requests:
                raise NotFound(f"request {rid} was not admitted")
        bad = set(assignment.gpu_ids) - set(self._gpu_ids)
        if bad:
            raise InvalidRequest(f"unknown devices {sorted(bad)}")
        down = self.unavailable_gpu_ids.intersection(assignment.gpu_ids)
        if down:
            raise DevicesUnavailable(f"devices {sorted(down)} cannot take work: "
                                     + ("restarting" if self._restarting else self.dead[min(down)]))
        ids = assignment.request_ids
        stop = self._stops[ids] = asyncio.Event()
        lost_flag = asyncio.Event()
        self._running[ids] = (assignment.gpu_ids, lost_flag)
        checkpoint = {rid: self._requests[rid].steps_done for rid in ids}
        self.history.append((ids, assignment.gpu_ids, assignment.num_steps))
        step_s = self.step_time_s(assignment)
        warmup_s = self.warmup_s(assignment)
        started_at = self._clock()
        step_times: list[float] = []
        kept, kept_at = 0, started_at  # steps of this assignment up to its latest checkpoint
        try:
            for _ in range(assignment.num_steps):
                if stop.is_set():
                    break
                t0 = self._clock()
                # Sleep to an absolute target so per-step overheads do not accumulate; a stop
                # takes effect at the next step boundary, as on real workers.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(lost_flag.wait(), max(started_at + warmup_s + (len(step_times) + 1) * step_s - t0, 0.0))
                while self.stalled.intersection(assignment.gpu_ids) and ids not in self._lost:  # hangs
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(lost_flag.wait(), 0.05)
                if ids in self._lost:
                    break
                measured = self._clock() - t0
                step_times.append(measured)
                if self.warm is not None and len(step_times) == 1:  # the first step captured the key
                    self.warm.use(warm_key(assignment.gpu_ids, *self._shape(assignment)))
                for rid in assignment.request_ids:
                    req = self._requests.get(rid)
                    if req is None:
                        continue
                    req.steps_done += 1
                    if on_step is not None:
                        on_step(rid, req.steps_done, measured)
                every = self.checkpoint_every_s
                if every is not None and len(step_times) < assignment.num_steps and self._clock() - kept_at >= every:
                    kept, kept_at = len(step_times), self._clock()
        finally:
            self._stops.pop(ids, None)
            self._running.pop(ids, None)
        lost = self._lost.pop(ids, None)
        if lost is not None:  # as on the pool: the steps after the latest checkpoint are gone
            for rid, steps in checkpoint.items():
                if rid in self._requests:
                    self._requests[rid].steps_done = steps + kept
            return AssignmentResult(assignment, started_at, self._clock(), kept, error=lost, lost=True)
        return AssignmentResult(assignment, started_at, self._clock(), len(step_times), tuple(step_times))

    async def stop(self, request_ids: tuple[str, ...]) -> None:
        wanted = set(request_ids)
        for ids, flag in self._stops.items():
            if wanted.intersection(ids):
                flag.set()

    async def fetch_result(self, request_id: str):
        req = self._requests.get(request_id)
        if req is None:
            raise NotFound(f"request {request_id} is unknown to the executor")
        if req.steps_done < req.job.num_steps:
            raise Conflict(f"request {request_id} has {req.job.num_steps - req.steps_done} steps left")
        return req.job.latent

    async def release(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    async def close(self) -> None:
        self._closed = True
        for flag in self._stops.values():
            flag.set()
