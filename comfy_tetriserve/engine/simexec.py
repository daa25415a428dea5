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

Imports neither torch nor diffusers.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..cost import CostModel
from ..errors import Conflict, InvalidRequest, NotFound
from ..plan import aligned_groups
from ..types import PIXELS_PER_TOKEN, Assignment, AssignmentResult
from .executor import ModelInfo, SamplingJob, StepCallback

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
                 clock: Callable[[], float] = time.monotonic) -> None:
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
        self._models: dict[str, tuple[str, ModelInfo]] = {}
        self._requests: dict[str, _SimRequest] = {}
        self._stops: dict[tuple[str, ...], asyncio.Event] = {}  # in-flight assignment -> stop flag
        self._closed = False
        #: (request_ids, gpu_ids, num_steps) of every assignment run, for tests and the demo
        self.history: list[tuple[tuple[str, ...], tuple[int, ...], int]] = []

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        return self._gpu_ids

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        return self._groups

    async def start(self) -> None:
        self._closed = False

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

    def step_time_s(self, assignment: Assignment) -> float:
        job = self._requests[assignment.request_ids[0]].job
        height, width = int(job.latent.shape[-2]) * 8, int(job.latent.shape[-1]) * 8
        height -= height % PIXELS_PER_TOKEN
        width -= width % PIXELS_PER_TOKEN
        batch = sum(self._requests[r].job.batch for r in assignment.request_ids)
        return self.time_scale * self.cost.step_time_s(job.model, height, width, batch, assignment.sp_degree)

    async def execute(self, assignment: Assignment, on_step: StepCallback | None = None) -> AssignmentResult:
        if self._closed:
            raise Conflict("executor is closed")
        for rid in assignment.request_ids:
            if rid not in self._requests:
                raise NotFound(f"request {rid} was not admitted")
        bad = set(assignment.gpu_ids) - set(self._gpu_ids)
        if bad:
            raise InvalidRequest(f"unknown devices {sorted(bad)}")
        stop = self._stops[assignment.request_ids] = asyncio.Event()
        self.history.append((assignment.request_ids, assignment.gpu_ids, assignment.num_steps))
        step_s = self.step_time_s(assignment)
        started_at = self._clock()
        step_times: list[float] = []
        try:
            for _ in range(assignment.num_steps):
                if stop.is_set():
                    break
                t0 = self._clock()
                # Sleep to an absolute target so per-step overheads do not accumulate; a stop
                # takes effect at the next step boundary, as on real workers.
                await asyncio.sleep(max(started_at + (len(step_times) + 1) * step_s - t0, 0.0))
                measured = self._clock() - t0
                step_times.append(measured)
                for rid in assignment.request_ids:
                    req = self._requests.get(rid)
                    if req is None:
                        continue
                    req.steps_done += 1
                    if on_step is not None:
                        on_step(rid, req.steps_done, measured)
        finally:
            self._stops.pop(assignment.request_ids, None)
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
