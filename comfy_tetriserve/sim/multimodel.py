"""Several models on one box, in simulation: placement, loads and evictions on the virtual clock.

``MultiModelSimulation`` is the ``Simulation`` with a ``PlacementEngine``: every device has a
memory budget in bytes, models start where ``placement`` puts them, and the policy's loads run on
the virtual clock. A load occupies its devices for bytes / ``true_load_bytes_per_s`` (what the box
does); the planner predicts bytes / its ``LoadTimeModel`` estimate, corrected by every load that
ends (the same cost model as the service's loads). Evictions are instant.

``multimodel_trace`` makes the bench's workload: Poisson arrivals in the paper's shape, each request
of one of the models drawn by a popularity mix that changes to a second mix halfway through.
"""
from __future__ import annotations

import dataclasses
import heapq
import random
from collections.abc import Sequence

from ..core.placement_engine import PlacementEngine
from ..core.residency import LoadTimeModel
from ..cost import CostModel
from ..types import AssignmentResult, GenRequest, ModelLoad
from .simulator import SimConfig, SimResult, Simulation, make_groups
from .workload import WorkloadSpec, make_trace


@dataclasses.dataclass(frozen=True)
class ModelBox:
    """Memory of the simulated box: weights per model copy, budget per device, load bandwidths."""

    model_bytes: dict[str, int]
    budget_bytes: int
    load_bytes_per_s: float  # the planner's first estimate
    true_load_bytes_per_s: float  # what a load takes in the simulation
    placement: dict[str, tuple[int, ...]]
    pinned: tuple[str, ...] = ()


class MultiModelSimulation(Simulation):
    """See the module docstring."""

    def __init__(self, trace: Sequence[GenRequest], policy, cost: CostModel, box: ModelBox,
                 config: SimConfig = SimConfig(), *, true_cost: CostModel | None = None) -> None:
        if config.shared_cores > 0:
            raise ValueError("shared cores are not modelled with model placement")
        super().__init__(trace, policy, cost, config, true_cost=true_cost)
        self.box = box
        self.engine = PlacementEngine(policy, cost, range(config.num_gpus), make_groups(config),
                                      model_bytes=box.model_bytes, budget_bytes=box.budget_bytes,
                                      load_time=LoadTimeModel(box.load_bytes_per_s), placement=box.placement,
                                      pinned=box.pinned)

    def _step(self, now: float) -> None:
        engine = self.engine
        while self._ends and self._ends[0][0] <= now:
            end_at, _, item, started = heapq.heappop(self._ends)
            if isinstance(item, ModelLoad):
                engine.finish_load(item, end_at)
            else:
                engine.apply_result(AssignmentResult(item, started, end_at, item.num_steps), end_at)
        while self._next < len(self._arrivals) and self._arrivals[self._next].arrival_at <= now:
            engine.submit(self._arrivals[self._next])
            self._next += 1
        plan = engine.plan(now)
        if plan is not None:
            self.num_plans += 1
            if not plan.is_empty:
                self._start(plan, now)

    def _start(self, plan, now: float) -> None:
        super()._start(plan, now)  # assignments, and the engine applies evictions and loads
        for load in plan.loads:
            dur = self.box.model_bytes[load.model] / self.box.true_load_bytes_per_s
            heapq.heappush(self._ends, (now + dur, self._seq, load, now))
            self._seq += 1

    def result(self, cost_name: str = "") -> SimResult:
        return super().result(cost_name)


def multimodel_trace(spec: WorkloadSpec, models: Sequence[str], mix_before: Sequence[float],
                     mix_after: Sequence[float]) -> tuple[GenRequest, ...]:
    """``spec``'s arrivals, resolutions and deadlines; each request's model drawn from ``mix_before``
    for the first half of the requests and from ``mix_after`` for the second half (seeded)."""
    base = make_trace(spec)
    rng = random.Random(f"models/{spec.seed}/{spec.rate_per_min}")
    half = len(base) // 2
    out = []
    for i, r in enumerate(base):
        mix = mix_before if i < half else mix_after
        out.append(dataclasses.replace(r, model=rng.choices(list(models), weights=list(mix))[0]))
    return tuple(out)


def proportional_partition(models: Sequence[str], mix: Sequence[float], num_gpus: int) -> dict[str, tuple[int, ...]]:
    """Contiguous device ranges per model, sizes proportional to ``mix`` (largest remainder, >= 1 each)."""
    if len(models) > num_gpus:
        raise ValueError(f"{len(models)} models cannot each have one of {num_gpus} devices")
    raw = [num_gpus * w / sum(mix) for w in mix]
    sizes = [max(1, int(x)) for x in raw]
    while sum(sizes) < num_gpus:
        i = max(range(len(raw)), key=lambda j: raw[j] - sizes[j])
        sizes[i] += 1
    while sum(sizes) > num_gpus:
        i = max((j for j in range(len(raw)) if sizes[j] > 1), key=lambda j: sizes[j] - raw[j])
        sizes[i] -= 1
    out, start = {}, 0
    for m, k in zip(models, sizes):
        out[m] = tuple(range(start, start + k))
        start += k
    return out
