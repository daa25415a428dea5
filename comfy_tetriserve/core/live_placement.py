"""Planned model placement on an executor that holds models (the worker pool), for the live service.

``ExecutorPlacementEngine`` is the ``Engine`` whose plans may load and evict models when its policy
places models (``places_models``, e.g. TetriServe) and its executor keeps residency (the worker
pool: ``residency``, ``models()``, ``load_time``, ``pinned_models``, ``loads_in_progress``,
``evict``, ``ensure_resident``). The placement the policy sees is read from the executor at each
plan, so it is what the workers hold (budgets, LRU books, measured bytes); planned loads keep their
devices busy until the driver reports them ended (``finish_load``), which is also how a forecast
sees them (busy devices), and planned evictions go to the executor at once.

Policies that do not place models get plain views (every model everywhere); the pool then loads a
missing model inside the assignment that needs it, as before.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import replace

from ..cost import CostModel
from ..errors import Conflict
from ..types import ModelLoad, PlacementView, RoundPlan, SchedulerView
from .engine import Engine
from .placement_engine import LoadRecord


class ExecutorPlacementEngine(Engine):
    """See the module docstring."""

    def __init__(self, policy, cost: CostModel, gpu_ids, groups=None, *, executor, recent_tau_s: float = 120.0,
                 **kw) -> None:
        super().__init__(policy, cost, gpu_ids, groups, **kw)
        self.executor = executor
        self.recent_tau_s = recent_tau_s
        self._recent: dict[str, float] = {}
        self._recent_at = 0.0
        self._loading: dict[int, tuple[ModelLoad, float]] = {}  # gpu -> (planned load, expected end)
        self.load_records: deque[LoadRecord] = deque(maxlen=1000)

    @property
    def places_models(self) -> bool:
        return bool(getattr(self.policy, "places_models", False)) and getattr(self.executor, "residency", None) is not None

    # ------------------------------------------------------------ occupancy
    @property
    def busy_gpu_ids(self) -> frozenset[int]:
        return frozenset(self._busy) | frozenset(self._loading)

    def submit(self, request):
        state = super().submit(request)
        at = request.arrival_at
        if at > self._recent_at:
            decay = math.exp(-(at - self._recent_at) / self.recent_tau_s)
            self._recent = {m: w * decay for m, w in self._recent.items()}
            self._recent_at = at
        try:
            work = request.num_steps * self.cost.step_time_s(request.model, request.height, request.width,
                                                             request.batch, 1)
        except Exception:  # noqa: BLE001 - a model the cost model cannot price yet counts as one step per step
            work = float(request.num_steps)
        self._recent[request.model] = self._recent.get(request.model, 0.0) + work
        return state

    def view(self, now: float) -> SchedulerView:
        """With a placement when the policy places models (forecasts then see loads and missing models)."""
        v = super().view(now)
        if self._loading:
            v = replace(v, busy_gpu_ids=v.busy_gpu_ids | frozenset(self._loading))
        if self.places_models:
            v = replace(v, placement=self.placement(now))
        return v

    def placement(self, now: float) -> PlacementView:
        ex = self.executor
        res = ex.residency
        models = ex.models()
        model_bytes = {}
        for m, info in models.items():
            size = info.num_bytes
            if not size:
                size = max((res.entry(g, m).num_bytes for g in self.all_gpu_ids if res.entry(g, m)), default=0)
            model_bytes[m] = size
        loading = {g: (load.model, end) for g, (load, end) in self._loading.items()}
        for g, m in ex.loads_in_progress().items():
            loading.setdefault(g, (m, now + ex.load_time.predict_s(model_bytes.get(m, 0))))
        total = sum(self._recent.values())
        return PlacementView(
            holding={m: frozenset(res.ranks_holding(m)) for m in models if res.ranks_holding(m)},
            loading=loading,
            free_bytes={g: res.free_bytes(g) for g in self.all_gpu_ids},
            model_bytes=model_bytes,
            load_s={m: ex.load_time.predict_s(b) for m, b in model_bytes.items()},
            pinned=ex.pinned_models,
            recent_share={m: w / total for m, w in self._recent.items()} if total else {},
        )

    # ------------------------------------------------------------ plans
    def apply_plan(self, plan: RoundPlan, now: float, expected_end_at=None) -> None:
        for ev in plan.evictions:
            try:
                self.executor.evict(ev.model, ev.gpu_ids)
            except Conflict:  # in use again since the view was taken: the load makes room itself or waits
                pass
        for load in plan.loads:
            end = now + load.duration_s
            for g in load.gpu_ids:
                self._loading[g] = (load, end)
            self.load_records.append(LoadRecord(load.model, load.gpu_ids, now, end))
        super().apply_plan(plan, now, expected_end_at)

    def finish_load(self, load: ModelLoad, now: float, error: str | None = None) -> None:
        """A planned load ended (the driver awaited ``executor.ensure_resident``); its devices are free."""
        if self._loading.get(load.gpu_ids[0], (None,))[0] != load:
            raise Conflict(f"no load {load} in flight")
        for g in load.gpu_ids:
            self._loading.pop(g, None)
        for i in range(len(self.load_records) - 1, -1, -1):
            rec = self.load_records[i]
            if rec.model == load.model and rec.gpu_ids == load.gpu_ids and rec.finished_at is None:
                self.load_records[i] = replace(rec, finished_at=now, error=error)
                break
