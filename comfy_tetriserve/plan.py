"""Placement arithmetic and plan validation: pure functions, no torch, no clock.

Placements are realised by process groups, which are expensive to create (about 0.7 s for the
first collective on gloo, far more under NCCL), so the executor creates a fixed set of groups
at start-up and the planner may only name those. The default set is the aligned power-of-two
blocks of the GPU ids: {0..7}, {0..3}, {4..7}, {0,1}, {2,3}, ..., {0}, ..., {7} on 8 GPUs
(2N - 1 groups), the same shape xDiT and the TetriServe paper use.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import combinations

from .errors import PlanError
from .types import RoundPlan, SchedulerView

Group = tuple[int, ...]


def power_of_two_degrees(num_gpus: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to num_gpus."""
    out, k = [], 1
    while k <= num_gpus:
        out.append(k)
        k *= 2
    return tuple(out)


def aligned_groups(gpu_ids: Sequence[int]) -> tuple[Group, ...]:
    """Aligned power-of-two blocks over positions in ``gpu_ids`` (largest first, then by position).

    Blocks are aligned on positions 0..n-1 of the sorted ids, so with 6 GPUs the blocks are
    {0-3}, {0,1}, {2,3}, {4,5} and the singles; a block never straddles an alignment boundary.
    """
    ids = tuple(sorted(gpu_ids))
    n = len(ids)
    out: list[Group] = []
    for size in reversed(power_of_two_degrees(n)):
        for start in range(0, n - size + 1, size):
            out.append(ids[start:start + size])
    return tuple(out)


def all_subset_groups(gpu_ids: Sequence[int], degrees: Iterable[int] | None = None) -> tuple[Group, ...]:
    """Every subset of the given sizes (power-of-two by default): the unconstrained alternative."""
    ids = tuple(sorted(gpu_ids))
    sizes = tuple(degrees) if degrees is not None else power_of_two_degrees(len(ids))
    out: list[Group] = []
    for size in sorted(sizes, reverse=True):
        out.extend(combinations(ids, size))
    return tuple(out)


def validate_plan(
    view: SchedulerView,
    plan: RoundPlan,
    allowed_degrees: Callable[[str], Sequence[int]],
) -> None:
    """Raise PlanError unless ``plan`` can run as it stands on ``view``.

    Checks: every GPU free and healthy and used once; every placement one of ``view.groups``;
    the degree allowed for the model; each request plannable (exists, not running, not done)
    and in at most one assignment; 1 <= num_steps <= steps left of every member; batched
    members share model, resolution and batch. Also: when nothing is running and requests
    are waiting, the plan must not be empty (otherwise the engine would stall forever).
    """
    if plan.round_index != view.round_index:
        raise PlanError(f"plan for round {plan.round_index} given to round {view.round_index}")
    free = set(view.free_gpu_ids)
    groups = set(view.groups)
    snapshots = {r.request_id: r for r in view.requests}
    used_gpus: set[int] = set()
    used_requests: set[str] = set()
    for a in plan.assignments:
        if not a.request_ids:
            raise PlanError("assignment without requests")
        if tuple(sorted(a.gpu_ids)) != a.gpu_ids or not a.gpu_ids:
            raise PlanError(f"gpu_ids must be a non-empty sorted tuple, got {a.gpu_ids}")
        if a.gpu_ids not in groups:
            raise PlanError(f"placement {a.gpu_ids} is not one of the executor's groups")
        for g in a.gpu_ids:
            if g not in free:
                raise PlanError(f"GPU {g} is busy or unavailable")
            if g in used_gpus:
                raise PlanError(f"GPU {g} booked twice")
            used_gpus.add(g)
        if a.num_steps < 1:
            raise PlanError(f"num_steps must be >= 1, got {a.num_steps}")
        first = None
        for rid in a.request_ids:
            snap = snapshots.get(rid)
            if snap is None:
                raise PlanError(f"unknown request {rid}")
            if snap.is_running:
                raise PlanError(f"request {rid} is still running")
            if rid in used_requests:
                raise PlanError(f"request {rid} assigned twice")
            used_requests.add(rid)
            if a.num_steps > snap.steps_left:
                raise PlanError(f"request {rid}: {a.num_steps} steps planned, {snap.steps_left} left")
            if a.sp_degree not in allowed_degrees(snap.request.model):
                raise PlanError(f"degree {a.sp_degree} not allowed for model {snap.request.model}")
            if first is None:
                first = snap.request.shape_key
            elif snap.request.shape_key != first:
                raise PlanError(f"batched requests differ in shape: {first} vs {snap.request.shape_key}")
    if view.placement is not None:
        validate_placement(view, plan, used_gpus)
    elif plan.loads or plan.evictions:
        raise PlanError("the plan places models but the executor does not place them (no placement in the view)")
    running = any(r.is_running for r in view.requests) or bool(view.placement and view.placement.loading)
    if not running and view.plannable and free and plan.is_empty:
        raise PlanError("empty plan while GPUs are free, nothing runs and requests wait")


def node_groups(node_gpu_ids: Sequence[Sequence[int]]) -> tuple[Group, ...]:
    """The placements of a cluster: each node's aligned blocks, never one that spans two nodes.

    ``node_gpu_ids`` lists each node's GPU ids (disjoint). Sequence-parallel collectives need the
    node's fast links (NVLink), so a group lives inside one node; largest first, then by node order.
    """
    seen: set[int] = set()
    per_node: list[tuple[Group, ...]] = []
    for ids in node_gpu_ids:
        if not ids:
            raise PlanError("a node without devices")
        if seen.intersection(ids):
            raise PlanError(f"GPU ids {sorted(seen.intersection(ids))} belong to two nodes")
        seen.update(ids)
        per_node.append(aligned_groups(ids))
    out = [g for blocks in per_node for g in blocks]
    return tuple(sorted(out, key=lambda g: -len(g)))
def validate_placement(view: SchedulerView, plan: RoundPlan, assigned_gpus: set[int]) -> None:
    """The model dimension of a plan: evictions, then loads, then every assignment's devices hold its model.

    Evictions: the model is held on those devices, not pinned, not in use by an assignment in
    flight there. Loads: on free, healthy devices that no assignment of this plan uses, each device
    in one load, the model not already there, and the copy fits the device's free bytes after
    this plan's evictions. Assignments: every device holds the model (a load in this plan does
    not count: it has not finished).
    """
    p = view.placement
    assert p is not None
    holding = {m: set(g) for m, g in p.holding.items()}
    free_bytes = dict(p.free_bytes)
    running_models: dict[int, set[str]] = {}
    for snap in view.requests:
        if snap.is_running:
            for g in snap.gpu_ids:
                running_models.setdefault(g, set()).add(snap.request.model)
    for ev in plan.evictions:
        if ev.model in p.pinned:
            raise PlanError(f"model {ev.model} is pinned and cannot be evicted")
        for g in ev.gpu_ids:
            if g not in holding.get(ev.model, ()):
                raise PlanError(f"eviction of {ev.model} from GPU {g}, which does not hold it")
            if ev.model in running_models.get(g, ()):
                raise PlanError(f"eviction of {ev.model} from GPU {g} while an assignment uses it there")
            holding[ev.model].discard(g)
            free_bytes[g] = free_bytes.get(g, 0) + p.model_bytes.get(ev.model, 0)
    free = set(view.free_gpu_ids)
    loading: set[int] = set()
    for load in plan.loads:
        if load.model not in p.model_bytes:
            raise PlanError(f"load of unknown model {load.model}")
        if load.duration_s < 0:
            raise PlanError(f"load of {load.model} with a negative duration")
        for g in load.gpu_ids:
            if g not in free or g in p.loading:
                raise PlanError(f"load on GPU {g}, which is busy or unavailable")
            if g in assigned_gpus or g in loading:
                raise PlanError(f"GPU {g} booked twice (load)")
            if g in holding.get(load.model, ()):
                raise PlanError(f"load of {load.model} on GPU {g}, which holds it already")
            if free_bytes.get(g, 0) < p.model_bytes[load.model]:
                raise PlanError(f"load of {load.model} on GPU {g}: {p.model_bytes[load.model]} bytes do not fit "
                                f"its {free_bytes.get(g, 0)} free bytes")
            free_bytes[g] -= p.model_bytes[load.model]
            loading.add(g)
    models = {r.request_id: r.request.model for r in view.requests}
    for a in plan.assignments:
        model = models[a.request_ids[0]]
        missing = [g for g in a.gpu_ids if g not in holding.get(model, ())]
        if missing:
            raise PlanError(f"assignment of {model} on GPUs {list(missing)}, which do not hold it")
