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

Admission variants (``sp1-admit`` .. ``sp8-admit``, ``rssp-admit``, ``edf-admit``; option ``admit``):
the same degree and order, but a request that can no longer finish by its deadline at its degree
(now + steps left x its step time > deadline) is never started while a request that still can is
waiting: such requests, and those without a deadline, run after all feasible ones, as best
effort, in pieces of ``deferred_steps`` steps (default 1), so that they never hold GPUs for long
when a feasible request arrives. A fixed degree that does not run hopeless requests to completion is a much stronger
baseline than the paper's (docs/planner.md, *Baselines*).

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
    EPS,
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
          backfill: bool, deferred: list[RequestSnapshot] | None = None, deferred_steps: int = 0) -> RoundPlan:
    """Place ``order`` (backfill: later requests that fit may pass one that does not); then
    ``deferred`` in its order, only if every request of ``order`` was placed, in pieces of at
    most ``deferred_steps`` steps (0: all steps of ``steps_of``)."""
    placer = Placer(view)
    out = []
    longest = 0.0
    waiting = False
    for queue, cap in ((order, 0), (deferred or [], deferred_steps)):
        if waiting:
            break
        for snap in queue:
            k = degree_of(snap)
            g = placer.place(k, snap.gpu_ids)
            if g is None:
                waiting = True
                if backfill:
                    continue
                break
            n = min(steps_of(snap), cap) if cap else steps_of(snap)
            r = snap.request
            longest = max(longest, n * cost.step_time_s(r.model, r.height, r.width, r.batch, k))
            out.append(Assignment((snap.request_id,), g, n))
    return RoundPlan(view.round_index, longest, tuple(out))


def can_finish(snap: RequestSnapshot, now: float, step_s: float) -> bool:
    """Whether ``snap`` has a deadline that its remaining steps at ``step_s`` each still meet."""
    deadline = snap.request.deadline_at
    return deadline is not None and now + snap.steps_left * step_s <= deadline + EPS


def _split_feasible(view: SchedulerView, cost: CostModel, order: list[RequestSnapshot], degree_of
                    ) -> tuple[list[RequestSnapshot], list[RequestSnapshot]]:
    """(requests that can still finish by their deadline at their degree, the rest), order kept."""
    feasible, rest = [], []
    for snap in order:
        r = snap.request
        t = cost.step_time_s(r.model, r.height, r.width, r.batch, degree_of(snap))
        (feasible if can_finish(snap, view.now, t) else rest).append(snap)
    return feasible, rest


@dataclass(frozen=True)
class FixedDegreePolicy:
    sp_degree: int
    backfill: bool = True
    admit: bool = False
    deferred_steps: int = 1
    name: str = ""

    def plan_round(self, view: SchedulerView, cost: CostModel) -> RoundPlan:
        n = widest_group(view)
        degree_of = lambda s: _capped_degree(cost, s.request.model, self.sp_degree, n)  # noqa: E731
        return _plan_fcfs(view, cost, degree_of, self.backfill, self.admit, self.deferred_steps)


def _plan_fcfs(view: SchedulerView, cost: CostModel, degree_of, backfill: bool, admit: bool,
               deferred_steps: int) -> RoundPlan:
    """First come first served, all remaining steps in one assignment; with ``admit`` the requests
    that cannot finish by their deadline at their degree (and best effort) wait for all others."""
    order = fcfs_order(view.plannable)
    if not admit:
        return _plan(view, cost, order, degree_of, lambda s: s.steps_left, backfill)
    feasible, rest = _split_feasible(view, cost, order, degree_of)
    return _plan(view, cost, feasible, degree_of, lambda s: s.steps_left, backfill, rest, deferred_steps)


@dataclass(frozen=True)
class ResolutionDegreePolicy:
    """RSSP: ``degrees`` fixes the degree per resolution; None derives it from the cost model."""

    degrees: Mapping[int, int] | None = None
    base_deadline_s: Mapping[int, float] = field(default_factory=lambda: dict(PAPER_BASE_DEADLINE_S))
    backfill: bool = True
    admit: bool = False
    deferred_steps: int = 1
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
        return _plan_fcfs(view, cost, lambda s: self.degree_for(s, cost, n), self.backfill, self.admit,
                          self.deferred_steps)


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
    admit: bool = False
    deferred_steps: int = 1
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
        order = [s for _, s in keyed]
        deferred = None
        if self.admit:  # LATE and best effort only once every LIVE request has its GPUs
            live = sum(1 for (rank, *_), _ in keyed if rank == 0)
            order, deferred = order[:live], order[live:]
        return _plan(view, cost, order, lambda s: degree[s.request_id],
                     lambda s: min(self.chunk_steps, s.steps_left), self.backfill, deferred, self.deferred_steps)


def make_fixed(sp_degree: int, **options) -> FixedDegreePolicy:
    return FixedDegreePolicy(sp_degree=sp_degree, name=options.pop("name", f"sp{sp_degree}"), **options)


def make_sp1(**o): return make_fixed(1, **o)
def make_sp2(**o): return make_fixed(2, **o)
def make_sp4(**o): return make_fixed(4, **o)
def make_sp8(**o): return make_fixed(8, **o)


def make_sp1_admit(**o): return make_fixed(1, admit=True, name=o.pop("name", "sp1-admit"), **o)
def make_sp2_admit(**o): return make_fixed(2, admit=True, name=o.pop("name", "sp2-admit"), **o)
def make_sp4_admit(**o): return make_fixed(4, admit=True, name=o.pop("name", "sp4-admit"), **o)
def make_sp8_admit(**o): return make_fixed(8, admit=True, name=o.pop("name", "sp8-admit"), **o)


def make_rssp_admit(**options) -> ResolutionDegreePolicy:
    return ResolutionDegreePolicy(admit=True, name=options.pop("name", "rssp-admit"), **options)


def make_edf_admit(**options) -> EdfPolicy:
    return make_edf(admit=True, name=options.pop("name", "edf-admit"), **options)


def make_rssp(**options) -> ResolutionDegreePolicy:
    return ResolutionDegreePolicy(**options)


def make_rssp_paper(**options) -> ResolutionDegreePolicy:
    return ResolutionDegreePolicy(degrees=dict(PAPER_RSSP_DEGREES), name=options.pop("name", "rssp-paper"), **options)


def make_edf(**options) -> EdfPolicy:
    rssp_options = {k: options.pop(k) for k in ("degrees", "base_deadline_s") if k in options}
    return EdfPolicy(rssp=ResolutionDegreePolicy(**rssp_options), **options)
