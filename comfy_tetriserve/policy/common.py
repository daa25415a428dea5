"""Helpers shared by the policies: step-time tables, deadline classes, least-GPU-time allocation
and placement of GPU-count demands onto the executor's groups. All pure, no torch, no clock.
"""
from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..cost import CostModel
from ..types import RequestSnapshot, SchedulerView

Group = tuple[int, ...]
EPS = 1e-9


class Urgency(enum.Enum):
    """How a deadline-aware policy sees a request this round."""

    LIVE = "live"  # has a deadline that the fastest degree can still meet
    LATE = "late"  # has a deadline that no schedule can meet any more: best effort
    BEST_EFFORT = "best_effort"  # no deadline


def usable_degrees(cost: CostModel, model: str, num_gpus: int) -> tuple[int, ...]:
    """Degrees the model allows that fit on ``num_gpus`` (ascending; at least degree 1 if allowed)."""
    return tuple(k for k in cost.allowed_degrees(model) if k <= num_gpus)


def step_times(cost: CostModel, snap: RequestSnapshot, degrees: Sequence[int], members: int = 1) -> dict[int, float]:
    r = snap.request
    return {k: cost.step_time_s(r.model, r.height, r.width, r.batch * members, k) for k in degrees}


@dataclass(frozen=True)
class Allocation:
    """Least-GPU-time plan for a request's remaining steps: ``steps`` at each degree (fastest last)."""

    steps: tuple[tuple[int, int], ...]  # ((degree, steps), ...) ascending degree, steps > 0
    gpu_time_s: float
    time_s: float

    @property
    def degrees(self) -> tuple[int, ...]:
        return tuple(k for k, _ in self.steps)


def plan_allocation(times: dict[int, float], steps_left: int, budget_s: float) -> Allocation | None:
    """The plan of least GPU time (degree x step time, summed) that finishes ``steps_left`` steps
    within ``budget_s``: one degree, or two degrees whose mix just meets the budget (the
    fractional optimum of this two-constraint LP uses at most two degrees; all pairs are tried,
    so non-adjacent pairs are covered when a degree is dominated). None when even the fastest
    degree cannot make it. Ties: fewer GPUs, then the shorter plan.
    """
    degrees = sorted(times)
    budget = budget_s + EPS
    # single degree: least GPU time, ties to fewer GPUs
    single = None  # (gpu, k)
    cheapest = None  # degree of least per-step GPU time overall
    for k in degrees:
        g = k * times[k]
        if cheapest is None or g < cheapest[0] - EPS:
            cheapest = (g, k)
        if steps_left * times[k] <= budget and (single is None or g < single[0] - EPS):
            single = (g, k)
    if single is not None and single[1] == cheapest[1]:
        best = ((single[1], steps_left),)  # nothing beats the cheapest degree when it is fast enough
        best_gpu, best_time = steps_left * single[0], steps_left * times[single[1]]
    else:
        best = None
        best_gpu = best_time = math.inf
        if single is not None:
            best = ((single[1], steps_left),)
            best_gpu, best_time = steps_left * single[0], steps_left * times[single[1]]
        for i, lo in enumerate(degrees):
            t_lo = times[lo]
            if steps_left * t_lo <= budget:
                continue  # lo alone fits: a mix with a faster degree only costs more
            for hi in degrees[i + 1:]:
                t_hi = times[hi]
                if t_hi >= t_lo or steps_left * t_hi > budget or hi * t_hi <= lo * t_lo:
                    continue
                s_lo = min(int((budget_s - steps_left * t_hi) / (t_lo - t_hi) + EPS), steps_left - 1)
                if s_lo <= 0:
                    continue
                s_hi = steps_left - s_lo
                gpu = s_lo * lo * t_lo + s_hi * hi * t_hi
                dur = s_lo * t_lo + s_hi * t_hi
                if gpu < best_gpu - EPS or (gpu <= best_gpu + EPS and dur < best_time):
                    best, best_gpu, best_time = ((lo, s_lo), (hi, s_hi)), gpu, dur
        if best is None:
            return None
    return Allocation(best, best_gpu, best_time)


def widest_group(view: SchedulerView) -> int:
    """Devices in the largest placement of healthy devices: the highest degree that can run at all.

    Not ``len(view.gpu_ids)``: in a cluster a group never spans two nodes, and on one box a dead
    device leaves no aligned block around it (0 when no group is healthy)."""
    healthy = set(view.gpu_ids)
    return max((len(g) for g in view.groups if healthy.issuperset(g)), default=0)


# ------------------------------------------------------------------------------ placement
class Placer:
    """Maps GPU-count demands onto ``view.groups`` among the free GPUs.

    Choice of GPU ids (decided here for every policy): a request keeps its previous group when
    that group is free and of the wanted size (placement preservation); otherwise the group that
    overlaps its previous one most; then *best fit*: the candidate whose enclosing aligned blocks
    (2k, 4k, ... GPUs) are already the most occupied, so whole large blocks stay free for large
    requests (buddy allocation); then the lowest ids.
    """

    def __init__(self, view: SchedulerView, *, preserve: bool = True, fit: str = "best") -> None:
        if fit not in ("best", "first"):
            raise ValueError(f"fit must be 'best' or 'first', got {fit!r}")
        self.preserve = preserve
        self.fit = fit
        self.ids = tuple(view.gpu_ids)
        self.pos = {g: i for i, g in enumerate(self.ids)}
        self.n = len(self.ids)
        self.occupied: set[int] = set(view.busy_gpu_ids)
        self.by_size: dict[int, list[Group]] = {}
        healthy = set(view.gpu_ids)
        for g in view.groups:
            if healthy.issuperset(g):
                self.by_size.setdefault(len(g), []).append(g)

    @property
    def num_free(self) -> int:
        return self.n - len(self.occupied)

    def free_groups(self, size: int) -> list[Group]:
        occ = self.occupied
        return [g for g in self.by_size.get(size, ()) if occ.isdisjoint(g)]

    def _fit_score(self, g: Group) -> tuple[int, ...]:
        k = len(g)
        first = self.pos[g[0]]
        out = []
        s = 2 * k
        while s <= self.n:
            start = (first // s) * s
            out.append(sum(1 for i in self.ids[start:start + s] if i in self.occupied))
            s *= 2
        return tuple(out)

    def choose(self, size: int, prefer: Group = ()) -> Group | None:
        cands = self.free_groups(size)
        if not cands:
            return None
        if self.preserve and prefer:
            if prefer in cands:
                return prefer
            pset = set(prefer)
            best_overlap = max(len(pset.intersection(g)) for g in cands)
            if best_overlap:
                cands = [g for g in cands if len(pset.intersection(g)) == best_overlap]
        if len(cands) == 1 or self.fit == "first":
            return min(cands, key=lambda g: tuple(self.pos[i] for i in g))
        return max(cands, key=lambda g: (self._fit_score(g), -self.pos[g[0]]))

    def take(self, group: Group) -> None:
        self.occupied.update(group)

    def place(self, size: int, prefer: Group = ()) -> Group | None:
        g = self.choose(size, prefer)
        if g is not None:
            self.take(g)
        return g

    def can_place_all(self, sizes: Iterable[int]) -> bool:
        """Whether the sizes fit together (largest first, best fit), without taking anything."""
        saved = set(self.occupied)
        try:
            for s in sorted(sizes, reverse=True):
                if self.place(s) is None:
                    return False
            return True
        finally:
            self.occupied = saved


def fcfs_order(snaps: Iterable[RequestSnapshot]) -> list[RequestSnapshot]:
    """Arrival order, ties by id (deterministic)."""
    return sorted(snaps, key=lambda s: (s.request.arrival_at, s.request_id))


#: The paper's base deadline per square resolution (deadline = arrival + scale x base).
PAPER_BASE_DEADLINE_S: dict[int, float] = {256: 1.5, 512: 2.0, 1024: 3.0, 2048: 5.0}


def nearest_resolution(height: int, width: int, table: Iterable[int]) -> int:
    """The square resolution of ``table`` whose token count is closest (in log) to height x width."""
    import math

    area = math.log(height * width)
    return min(table, key=lambda res: (abs(math.log(res * res) - area), res))


def classify(snap: RequestSnapshot, now: float, fastest_step_s: float) -> Urgency:
    deadline = snap.request.deadline_at
    if deadline is None:
        return Urgency.BEST_EFFORT
    if now + snap.steps_left * fastest_step_s > deadline + EPS:
        return Urgency.LATE
    return Urgency.LIVE
