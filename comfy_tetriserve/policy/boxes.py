"""One planner over several boxes, each box on its own round cadence (pure).

A round-based planner over the whole cluster (TetriServe on every GPU) starts a new round only when
every assignment in flight has ended: while one box still runs, a box that went idle only fills its
GPUs with work that ends by the other box's round end (*gap mode*). One planner per box has no such
coupling, but each sees only the jobs routed to it. ``BoxRoundsPolicy`` keeps both advantages: it
plans box by box, each with its own sub-view (that box's GPUs, groups and running jobs), over one
shared queue of waiting jobs, so each box's rounds end when that box's assignments end, and every
waiting job can go to whichever box plans next (a move between boxes at a step boundary).

Boxes are the connected parts of the view's groups (groups never span a box, ``plan.node_groups``).
A view with a model placement (stage 0) goes to the inner policy whole.
Boxes with nothing running plan first (a fresh round, first pick of the queue), then the others by
free GPUs; a job assigned on one box is not offered to the next. On a view with one box it is the
inner policy unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..cost import CostModel
from ..types import Assignment, RoundPlan, SchedulerView


def boxes_of(groups: Sequence[tuple[int, ...]]) -> tuple[tuple[int, ...], ...]:
    """The connected parts of ``groups`` (GPUs linked by sharing a group), each sorted, by first id."""
    parent: dict[int, int] = {}

    def find(g: int) -> int:
        while parent.setdefault(g, g) != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for grp in groups:
        for g in grp[1:]:
            a, b = find(grp[0]), find(g)
            if a != b:
                parent[b] = a
        find(grp[0])
    parts: dict[int, list[int]] = {}
    for g in parent:
        parts.setdefault(find(g), []).append(g)
    return tuple(sorted(tuple(sorted(p)) for p in parts.values()))


class BoxRoundsPolicy:
    """``inner`` planned box by box over one queue (see the module docstring)."""

    def __init__(self, inner, name: str | None = None) -> None:
        self.inner = inner
        self.name = name or f"{getattr(inner, 'name', 'policy')}-boxes"
        self._boxes: dict[tuple, tuple[tuple[int, ...], ...]] = {}

    @property
    def places_models(self) -> bool:
        return bool(getattr(self.inner, "places_models", False))

    def for_forecast(self) -> "BoxRoundsPolicy":
        """The inner policy's forecast variant, planned box by box as well (sim.forecast)."""
        inner = self.inner.for_forecast() if hasattr(self.inner, "for_forecast") else self.inner
        return BoxRoundsPolicy(inner, name=self.name)

    def plan_round(self, view: SchedulerView, cost: CostModel) -> RoundPlan:
        if view.placement is not None:  # model placement (stage 0) plans its own sub-views: the inner whole
            return self.inner.plan_round(view, cost)
        boxes = self._boxes.get(view.groups)
        if boxes is None:
            boxes = self._boxes[view.groups] = boxes_of(view.groups)
        if len(boxes) <= 1:
            return self.inner.plan_round(view, cost)
        healthy = set(view.gpu_ids)
        busy = view.busy_gpu_ids
        running_on = {}
        for snap in view.requests:
            if snap.is_running and snap.gpu_ids:
                running_on.setdefault(snap.gpu_ids[0], []).append(snap)
        order = []
        for box in boxes:
            ids = tuple(g for g in box if g in healthy)
            free = [g for g in ids if g not in busy]
            if not free:
                continue
            running = [s for g in box for s in running_on.get(g, ())]
            order.append((bool(running), -len(free), ids, running))
        order.sort(key=lambda t: (t[0], t[1], t[2]))
        taken: set[str] = set()
        out: list[Assignment] = []
        notes = []
        for _, _, ids, running in order:
            waiting = tuple(s for s in view.plannable if s.request_id not in taken)
            if not waiting:
                break
            box = set(ids)
            sub = SchedulerView(now=view.now, round_index=view.round_index, gpu_ids=ids,
                                groups=tuple(grp for grp in view.groups if box.issuperset(grp)),
                                requests=tuple(running) + waiting, busy_gpu_ids=frozenset(busy & box))
            plan = self.inner.plan_round(sub, cost)
            for a in plan.assignments:
                out.append(a)
                taken.update(a.request_ids)
            if plan.note:
                notes.append(f"box {ids[0]}-{ids[-1]}: {plan.note}")
        return RoundPlan(view.round_index, 0.0, tuple(out), note="; ".join(notes))


def make_tetriserve_boxes(**options) -> BoxRoundsPolicy:
    from .tetris import make_tetriserve

    return BoxRoundsPolicy(make_tetriserve(**options), name="tetriserve-boxes")
