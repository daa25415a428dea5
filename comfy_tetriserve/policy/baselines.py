"""Baselines the paper compares against, as policies over the same event-driven engine.

- ``sp1`` .. ``sp8`` (FixedDegreePolicy): every request holds k GPUs from its first step to its
  last, first come first served, non-preemptive: one assignment of all its steps, as xDiT
  serves. A request starts as soon as a free group of k GPUs exists (no round quantisation).
- ``rssp`` (ResolutionDegreePolicy): one fixed degree per resolution, chosen from the cost
  model as the degree of least GPU time whose 50-step (the request's steps) service time
  meets that resolution's base deadline alone (the fastest degree when none does). Otherwise
  like sp-k. ``rssp-paper``: the paper's map 256/512/1024/2048 -> 1/1/2/8.
- ``edf`` (EdfPolicy): the RSSP degree, earliest deadline first, preempting at chunk boundaries
  (``chunk_steps`` steps per assignment; a request keeps its GPUs if it is still among the
  first). Stronger than the paper's baselines: requests that cannot meet their deadline at
  their degree any more go behind every request that still can (avoids EDF's domino effect
  under overload), and best-effort requests come last.

Where a request's model does not allow the degree, the largest allowed degree below it is used.
Where no free group of the wanted size exists, ``backfill`` decides: later requests that fit may
start (default), or everybody waits for the head of the queue (strict FCFS).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..cost import CostModel
from ..types import Assignment, RequestSnapshot, RoundPlan, SchedulerView
from .common import (
    widest_group,
    PAPER_BASE_DEADLINE_S,
    Placer,
    Urgency,
    classify,
    fcfs_order,
    nearest_resolution,
    usable_degrees,
)

PAPER_RSSP_DEGREES: dict[int, int] = {256: 1, 512: 1, 1024: 2, 2048: 8}


def _capped_degree(cost: CostModel, model: str, want: int, num_gpus: int) -> int:
    ks = usable_degrees(cost, model, num_gpus) or cost.allowed_degrees(model)[:1]
    below = [k for k in ks if k <= want]
    return below[-1] if below else ks[0]


def _plan(view: SchedulerView, cost: CostModel, order: list[RequestSnapshot], degree_of, steps_of,
          backfill: bool) -> RoundPlan:
    placer = Placer(view)
    out = []
    longest = 0.0
    for snap in order:
        k = degree_of(snap)
        g = placer.place(k, snap.gpu_ids)
        if g is None:
            if backfill:
                continue
            break
        n = steps_of(snap)
        r = snap.request
        longest = max(longest, n * cost.step_time_s(r.model, r.height, r.width, r.batch, k))
        out.append(Assignment((snap.request_id,), g, n))
    return RoundPlan(view.round_index, longest, tuple(out))


@dataclass(frozen=True)
class FixedDegreePolicy:
    sp_degree: int
    backfill: bool = True
    name: str = ""

    def plan_round(self, view: SchedulerView, cost: CostModel) -> RoundPlan:
        n = widest_group(view)
        return _plan(view, cost, fcfs_order(view.plannable),
                     lambda s: _capped_degree(cost, s.request.model, self.sp_degree, n),
                     lambda s: s.steps_left, self.backfill)


@dataclass(frozen=True)
class ResolutionDegreePolicy:
    """RSSP: ``degrees`` fixes the degree per resolution; None derives it from the cost model."""

    degrees: Mapping[int, int] | None = None
    base_deadline_s: Mapping[int, float] = field(default_factory=lambda: dict(PAPER_BASE_DEADLINE_S))
    backfill: bool = True
    name: str = "rssp"

    def degree_for(self, snap: RequestSnapshot, cost: CostModel, num_gpus: int) -> int:
        r = snap.request
        if self.degrees is not None:
            want = self.degrees[nearest_resolution(r.height, r.width, self.degrees)]
            return _capped_degree(cost, r.model, want, num_gpus)
        return rssp_degree(cost, r.model, r.height, r.width, r.batch, r.num_steps, num_gpus,
                           self.base_deadline_s[nearest_resolution(r.height, r.width, self.base_deadline_s)])

    def plan_round(self, view: SchedulerView, cost: CostModel) -> RoundPlan:
        n = widest_group(view)
        return _plan(view, cost, fcfs_order(view.plannable), lambda s: self.degree_for(s, cost, n),
                     lambda s: s.steps_left, self.backfill)


def rssp_degree(cost: CostModel, model: str, height: int, width: int, batch: int, num_steps: int,
                num_gpus: int, base_deadline_s: float) -> int:
    """Least-GPU-time degree whose ``num_steps`` steps fit ``base_deadline_s`` alone (else the fastest)."""
    ks = usable_degrees(cost, model, num_gpus)
    times = {k: cost.step_time_s(model, height, width, batch, k) for k in ks}
    fits = [k for k in ks if num_steps * times[k] <= base_deadline_s]
    if fits:
        return min(fits, key=lambda k: (k * times[k], k))
    return min(ks, key=lambda k: (times[k], k))


@dataclass(frozen=True)
class EdfPolicy:
    chunk_steps: int = 5
    rssp: ResolutionDegreePolicy = field(default_factory=ResolutionDegreePolicy)
    backfill: bool = True
    name: str = "edf"

    def plan_round(self, view: SchedulerView, cost: CostModel) -> RoundPlan:
        n = widest_group(view)
        now = view.now
        degree: dict[str, int] = {}
        keyed = []
        for snap in view.plannable:
            r = snap.request
            k = degree[snap.request_id] = self.rssp.degree_for(snap, cost, n)
            urgency = classify(snap, now, cost.step_time_s(r.model, r.height, r.width, r.batch, k))
            rank = (0 if urgency is Urgency.LIVE else 1 if urgency is Urgency.LATE else 2)
            deadline = r.deadline_at if r.deadline_at is not None else float("inf")
            keyed.append(((rank, deadline, r.arrival_at, snap.request_id), snap))
        keyed.sort(key=lambda t: t[0])
        return _plan(view, cost, [s for _, s in keyed], lambda s: degree[s.request_id],
                     lambda s: min(self.chunk_steps, s.steps_left), self.backfill)


def make_fixed(sp_degree: int, **options) -> FixedDegreePolicy:
    return FixedDegreePolicy(sp_degree=sp_degree, name=options.pop("name", f"sp{sp_degree}"), **options)


def make_sp1(**o): return make_fixed(1, **o)
def make_sp2(**o): return make_fixed(2, **o)
def make_sp4(**o): return make_fixed(4, **o)
def make_sp8(**o): return make_fixed(8, **o)


def make_rssp(**options) -> ResolutionDegreePolicy:
    return ResolutionDegreePolicy(**options)


def make_rssp_paper(**options) -> ResolutionDegreePolicy:
    return ResolutionDegreePolicy(degrees=dict(PAPER_RSSP_DEGREES), name=options.pop("name", "rssp-paper"), **options)


def make_edf(**options) -> EdfPolicy:
    rssp_options = {k: options.pop(k) for k in ("degrees", "base_deadline_s") if k in options}
    return EdfPolicy(rssp=ResolutionDegreePolicy(**rssp_options), **options)
