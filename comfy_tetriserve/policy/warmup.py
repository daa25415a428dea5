"""Warm-up priced in the planner: the first step at a step shape a device group has not captured
costs ``cost.warmup_time_s`` more (core/warmup.py says where the view's warm keys come from).

``WarmPricing(view, cost)`` is built once per round. It is ``active`` only when the cost model has
``capture_steps`` > 0 and the view carries warm keys; inactive, every policy plans exactly as
without it. For a request shape it gives

- ``warm_groups(shape)``: the groups holding the shape (every member captured it);
- ``cold_s(shape, times)``: per degree, what a cold group's first step adds;
- ``degree_warmup_s(shape, cold)``: per degree, the warm-up the planner expects: 0 when some
  group of that size holds the shape (placement picks a warm group when one is free; a busy one
  frees within the round), else the cold cost.

``plan_allocation_warm`` is ``common.plan_allocation`` with a one-off warm-up per degree used: a
plan at degrees {k} takes sum(steps_k x T_k + W_k) and costs sum(k x (steps_k x T_k + W_k)) GPU
seconds, so a warm degree wins when a cold one's capture eats its gain.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

from ..cost import CostModel, warmup_time_s
from ..types import SchedulerView
from .common import EPS, Allocation, Group

Shape = tuple[str, int, int, int]  # model, height, width, batch


class WarmPricing:
    """What cold step shapes cost this round (see the module docstring)."""

    def __init__(self, view: SchedulerView, cost: CostModel) -> None:
        self.cost = cost
        self.active = view.warm is not None and float(getattr(cost, "capture_steps", 0.0) or 0.0) > 0
        self._by_shape: dict[Shape, frozenset[Group]] = {}
        if self.active:
            index: dict[Shape, set[Group]] = {}
            for group, model, height, width, batch in view.warm:
                index.setdefault((model, height, width, batch), set()).add(tuple(group))
            self._by_shape = {s: frozenset(gs) for s, gs in index.items()}

    def warm_groups(self, shape: Shape) -> frozenset[Group]:
        return self._by_shape.get(shape, frozenset())

    def cold_s(self, shape: Shape, degrees: Iterable[int]) -> dict[int, float]:
        model, height, width, batch = shape
        return {k: warmup_time_s(self.cost, model, height, width, batch, k) for k in degrees}

    def degree_warmup_s(self, shape: Shape, cold: dict[int, float]) -> dict[int, float]:
        warm_sizes = {len(g) for g in self.warm_groups(shape)}
        return {k: (0.0 if k in warm_sizes else w) for k, w in cold.items()}


def plan_allocation_warm(times: dict[int, float], warmup_s: dict[int, float], steps_left: int,
                         budget_s: float) -> Allocation | None:
    """The plan of least GPU time that finishes ``steps_left`` steps within ``budget_s`` when the
    first step at degree k costs ``warmup_s[k]`` more (one degree, or two whose mix just meets the
    budget); None when no degree makes it. Ties: fewer GPUs, then the shorter plan."""
    degrees = sorted(times)
    budget = budget_s + EPS
    best: tuple[tuple[int, int], ...] | None = None
    best_gpu = best_time = math.inf

    def offer(steps: tuple[tuple[int, int], ...]) -> None:
        nonlocal best, best_gpu, best_time
        dur = sum(s * times[k] + warmup_s.get(k, 0.0) for k, s in steps)
        gpu = sum(k * (s * times[k] + warmup_s.get(k, 0.0)) for k, s in steps)
        if dur > budget:
            return
        fewer = best is not None and max(k for k, _ in steps) < max(k for k, _ in best)
        if gpu < best_gpu - EPS or (gpu <= best_gpu + EPS and (fewer or dur < best_time)):
            best, best_gpu, best_time = steps, gpu, dur

    for k in degrees:
        offer(((k, steps_left),))
    for i, lo in enumerate(degrees):
        t_lo, w_lo = times[lo], warmup_s.get(lo, 0.0)
        for hi in degrees[i + 1:]:
            t_hi, w_hi = times[hi], warmup_s.get(hi, 0.0)
            if t_hi >= t_lo:
                continue
            room = budget_s - w_lo - w_hi - steps_left * t_hi
            s_lo = min(int(room / (t_lo - t_hi) + EPS), steps_left - 1) if room > 0 else 0
            if s_lo >= 1:
                offer(((lo, s_lo), (hi, steps_left - s_lo)))
    if best is None:
        return None
    return Allocation(best, best_gpu, best_time)
