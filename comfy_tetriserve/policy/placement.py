"""Model placement: the plan's model dimension (where copies live), around any round policy.

When the view has a ``placement`` (the executor places models), ``plan_with_placement`` decides
per round, in this order:

1. **Demand.** Per model, the GPU-seconds its open requests still need at degree 1 (steps left x
   step time); its *target* is that share of the box's devices. ``copies`` = devices holding or
   loading it.
2. **Replication** (``replicate``): a model with waiting requests and no copy, or at least one
   device under its target, gets a load on a free aligned block (largest power of two within the
   deficit; one device for a model without a copy). Where a device of the block lacks memory, a
   model there is evicted: the copy whose loss costs least, cost = its demand per copy, and only a
   model that keeps its own target plus ``HYSTERESIS_GPUS`` after losing it (or has no demand at all); pinned
   models never. The cheapest block wins. A load makes its devices busy for the predicted load time
   (bytes / load bandwidth), so the round planner treats them like running work, and the requests
   of the model are planned on the new copies once the load ended.
3. **Assignments, by placement** (most urgent deadline first): models held on the same devices
   form one sub-view (every model everywhere: exactly the plain round); the inner policy
   (TetriServe) plans its requests on those devices and the groups lying entirely on them, minus
   devices already given this round; the assignments are joined. A request therefore only runs on
   groups whose devices all hold its model.

Without replication (``replicate=False``) the placement is static: whatever was loaded at start.
A last resort keeps the engine from stalling: if nothing runs or loads and requests wait, a model
without a copy is loaded even if that evicts below a target (never a pinned model).
"""
from __future__ import annotations

import math

from ..cost import CostModel
from ..types import Assignment, ModelEviction, ModelLoad, PlacementView, RequestSnapshot, RoundPlan, SchedulerView


#: a model keeps this many devices beyond its share before one of its copies may be evicted
HYSTERESIS_GPUS = 2.0
#: a model with copies gets another only when its share exceeds its copies by this many devices
MIN_DEFICIT_GPUS = 1.0


def model_demand_s(view: SchedulerView, cost: CostModel) -> dict[str, float]:
    """GPU-seconds at degree 1 that each model's open requests still need."""
    out: dict[str, float] = {}
    for snap in view.requests:
        r = snap.request
        left = snap.steps_left - snap.steps_in_flight
        if left > 0:
            out[r.model] = out.get(r.model, 0.0) + left * cost.step_time_s(r.model, r.height, r.width, r.batch, 1)
    return out


def plan_with_placement(inner, view: SchedulerView, cost: CostModel, *, replicate: bool = True) -> RoundPlan:
    """A plan with loads, evictions and model-affine assignments (see the module docstring)."""
    p = view.placement
    assert p is not None
    demand = model_demand_s(view, cost)
    loads: list[ModelLoad] = []
    evictions: list[ModelEviction] = []
    taken: set[int] = set(view.busy_gpu_ids)
    if replicate:
        _replicate(view, p, demand, loads, evictions, taken, strict=True)
    assignments, note = _assign(inner, view, p, cost, taken, evictions)
    if replicate and not assignments and not loads and not p.loading and view.free_gpu_ids \
            and not any(s.is_running for s in view.requests) and view.plannable:
        _replicate(view, p, demand, loads, evictions, taken, strict=False)
    return RoundPlan(view.round_index, 0.0, tuple(assignments), note=note, loads=tuple(loads),
                     evictions=tuple(evictions))


def _copies(p: PlacementView, model: str) -> int:
    return len(p.holding.get(model, ())) + sum(1 for m, _ in p.loading.values() if m == model)


def _replicate(view: SchedulerView, p: PlacementView, demand: dict[str, float], loads: list[ModelLoad],
               evictions: list[ModelEviction], taken: set[int], *, strict: bool) -> None:
    n = len(view.gpu_ids)
    total = sum(demand.values())
    if total <= 0:
        return
    target = {m: n * d / total for m, d in demand.items()}
    # a copy is protected by the larger of its share now and its share of recent arrivals
    keep = {m: n * max(demand.get(m, 0.0) / total, p.recent_share.get(m, 0.0)) for m in p.model_bytes}
    copies = {m: _copies(p, m) for m in set(p.model_bytes)}
    waiting = {s.request.model for s in view.plannable}
    free_bytes = dict(p.free_bytes)
    holding = {m: set(g) for m, g in p.holding.items()}
    # most under-served first: no copy at all, then the largest deficit
    order = sorted(waiting, key=lambda m: (copies.get(m, 0) > 0, copies.get(m, 0) - target.get(m, 0.0)))
    for m in order:
        if m not in p.model_bytes:
            continue
        have = copies.get(m, 0)
        deficit = target.get(m, 0.0) - have
        if have > 0 and deficit < MIN_DEFICIT_GPUS:
            continue  # near its share: no load
        size = 1
        while size * 2 <= max(deficit, 1.0) and size * 2 <= n:
            size *= 2
        best = None
        for block in view.groups:
            if len(block) != size or not taken.isdisjoint(block) or any(g in holding.get(m, ()) for g in block):
                continue
            if not set(block) <= set(view.gpu_ids):
                continue
            cost, victims = 0.0, []
            for g in block:
                need = p.model_bytes[m] - free_bytes.get(g, 0)
                if need <= 0:
                    continue
                got = _victim(g, need, m, holding, p, demand, keep, copies, strict)
                if got is None:
                    cost = math.inf
                    break
                cost += got[0]
                victims.extend((v, g) for v in got[1])
            if cost < math.inf and (best is None or cost < best[0]):
                best = (cost, block, victims)
        if best is None:
            continue
        _, block, victims = best
        for v, g in victims:
            evictions.append(ModelEviction(v, (g,)))
            holding[v].discard(g)
            copies[v] -= 1
            free_bytes[g] += p.model_bytes[v]
        for g in block:
            free_bytes[g] -= p.model_bytes[m]
        loads.append(ModelLoad(m, tuple(block), p.load_s.get(m, 0.0)))
        copies[m] = have + len(block)
        taken.update(block)


def _victim(g: int, need: int, model: str, holding: dict[str, set[int]], p: PlacementView, demand: dict[str, float],
            keep: dict[str, float], copies: dict[str, int], strict: bool) -> tuple[float, list[str]] | None:
    """The cheapest models to evict from device ``g`` to free ``need`` bytes: (cost, models) or None.

    Cost of a copy: its model's share (now or recent, the larger) per copy it has; a model may
    only lose a copy that leaves it its protected share plus ``HYSTERESIS_GPUS`` devices."""
    options = []
    for v, gpus in holding.items():
        if g not in gpus or v == model or v in p.pinned:
            continue
        d = demand.get(v, 0.0)
        left = copies.get(v, 0) - 1
        if strict and keep.get(v, 0.0) > 0 and left < keep[v] + HYSTERESIS_GPUS:
            continue  # it would fall below its own share (with a margin against ping-pong)
        lose_all = left == 0 and d > 0
        options.append((keep.get(v, 0.0) / max(copies.get(v, 1), 1) + (1e9 if lose_all else 0.0), v))
    options.sort()
    cost, out, freed = 0.0, [], 0
    for c, v in options:
        out.append(v)
        cost += c
        freed += p.model_bytes[v]
        if freed >= need:
            return cost, out
    return None


def _assign(inner, view: SchedulerView, p: PlacementView, cost: CostModel, taken: set[int],
            evictions: list[ModelEviction]) -> tuple[list[Assignment], str]:
    by_model: dict[str, list[RequestSnapshot]] = {}
    urgency: dict[str, float] = {}  # earliest deadline of a plannable request; absent: nothing plannable
    for snap in view.requests:
        m = snap.request.model
        by_model.setdefault(m, []).append(snap)
        if snap.running_until_at is None and snap.steps_done < snap.request.num_steps:
            d = snap.request.deadline_at
            urgency[m] = min(urgency.get(m, math.inf), math.inf if d is None else d)
    evicted = {(e.model, g) for e in evictions for g in e.gpu_ids}
    healthy = set(view.gpu_ids)
    # models held on the same devices are planned together (one sub-view, one joint round)
    together: dict[frozenset[int], list[str]] = {}
    for m in urgency:
        gpus = frozenset(g for g in p.holding.get(m, ()) if g in healthy and (m, g) not in evicted)
        if gpus:
            together.setdefault(gpus, []).append(m)
    out: list[Assignment] = []
    notes = []
    for gpus, models in sorted(together.items(), key=lambda kv: min(urgency[m] for m in kv[1])):
        groups = tuple(grp for grp in view.groups if gpus.issuperset(grp))
        busy = frozenset(taken & gpus)
        if not groups or busy >= gpus:
            continue
        if set(models) >= set(by_model):  # every model with requests is here: the view's own order
            requests = view.requests
        else:
            requests = tuple(s for m in models for s in by_model[m])
        sub = SchedulerView(now=view.now, round_index=view.round_index, gpu_ids=tuple(sorted(gpus)), groups=groups,
                            requests=requests, busy_gpu_ids=busy)
        plan = inner.plan_round(sub, cost)
        for a in plan.assignments:
            out.append(a)
            taken.update(a.gpu_ids)
        if plan.note:
            notes.append(f"{'+'.join(models)}: {plan.note}")
    return out, "; ".join(notes)


class ModelAffinePolicy:
    """Any round policy made model-affine: ``plan_with_placement`` around ``inner`` (see above).

    ``replicate=False``: a static placement (no loads, no evictions), e.g. a fixed partition of the
    devices per model. Views without a placement go to ``inner`` unchanged.
    """

    places_models = True

    def __init__(self, inner, *, replicate: bool = True, name: str | None = None) -> None:
        self.inner = inner
        self.replicate = replicate
        self.name = name or f"{getattr(inner, 'name', 'policy')}+{'placement' if replicate else 'static'}"

    def plan_round(self, view: SchedulerView, cost: CostModel) -> RoundPlan:
        if view.placement is None:
            return self.inner.plan_round(view, cost)
        return plan_with_placement(self.inner, view, cost, replicate=self.replicate)
