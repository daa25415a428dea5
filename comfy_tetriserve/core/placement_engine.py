"""The engine with models as a resource: where copies live, loads in flight, evictions.

``PlacementEngine`` is the ``Engine`` plus a ``Residency`` (bytes per device under a budget) and
loads in flight. Its views carry a ``PlacementView``; a plan's evictions free memory at once, its
loads make their devices busy until the driver reports the load ended (``finish_load``), and an
assignment may only run where its model is held (``plan.validate_placement``). The predicted load
time is bytes / bandwidth (``LoadTimeModel``), corrected from every finished load.

The simulator drives it on a virtual clock (sim/multimodel.py); torch-free and clock-free.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..cost import CostModel
from ..errors import Conflict, InvalidRequest
from ..types import ModelLoad, PlacementView, RoundPlan, SchedulerView
from .engine import Engine
from .residency import LoadTimeModel, Residency


@dataclass(frozen=True)
class LoadRecord:
    """One load as the board draws it (devices x time), in its own style."""

    model: str
    gpu_ids: tuple[int, ...]
    started_at: float
    expected_end_at: float
    finished_at: float | None = None
    error: str | None = None


class PlacementEngine(Engine):
    """See the module docstring. ``placement``: model -> devices holding it at start."""

    def __init__(self, policy, cost: CostModel, gpu_ids: Sequence[int], groups: Iterable[tuple[int, ...]] | None = None,
                 *, model_bytes: dict[str, int], budget_bytes: int, load_time: LoadTimeModel,
                 placement: dict[str, Sequence[int]] | None = None, pinned: Iterable[str] = (),
                 recent_tau_s: float = 120.0, **kw) -> None:
        super().__init__(policy, cost, gpu_ids, groups, **kw)
        self.model_bytes = dict(model_bytes)
        self.load_time = load_time
        self.pinned = frozenset(pinned)
        self.residency = Residency({g: budget_bytes for g in self.all_gpu_ids})
        for model, gpus in (placement or {}).items():
            for g in gpus:
                if self.residency.free_bytes(g) < self.model_bytes[model]:
                    raise InvalidRequest(f"initial placement: {model} does not fit GPU {g}")
                self.residency.settle(g, model, self.model_bytes[model], 0.0)
        self._loading: dict[int, tuple[ModelLoad, float, int]] = {}  # gpu -> (load, expected end, record index)
        self.load_records: deque[LoadRecord] = deque(maxlen=10_000)
        self._load_base = 0
        self.num_loads = 0  # device copies loaded
        self.num_evictions = 0  # device copies evicted
        self.load_gpu_seconds = 0.0
        self.recent_tau_s = recent_tau_s
        self._recent: dict[str, float] = {}  # model -> decayed GPU-seconds of arrived work
        self._recent_at = 0.0

    def submit(self, request):
        """As ``Engine.submit``; also folds the request's work into the model's recent share."""
        state = super().submit(request)
        at = request.arrival_at
        if at > self._recent_at:
            decay = math.exp(-(at - self._recent_at) / self.recent_tau_s)
            self._recent = {m: w * decay for m, w in self._recent.items()}
            self._recent_at = at
        work = request.num_steps * self.cost.step_time_s(request.model, request.height, request.width,
                                                         request.batch, 1)
        self._recent[request.model] = self._recent.get(request.model, 0.0) + work
        return state

    # ------------------------------------------------------------ occupancy
    @property
    def busy_gpu_ids(self) -> frozenset[int]:
        return frozenset(self._busy) | frozenset(self._loading)

    def loads_in_flight(self) -> tuple[tuple[ModelLoad, float], ...]:
        seen, out = set(), []
        for load, end, _ in self._loading.values():
            if id(load) not in seen:
                seen.add(id(load))
                out.append((load, end))
        return tuple(out)

    def view(self, now: float) -> SchedulerView:
        v = super().view(now)
        res = self.residency
        holding = {m: frozenset(res.ranks_holding(m)) for m in self.model_bytes}
        placement = PlacementView(
            holding={m: g for m, g in holding.items() if g},
            loading={g: (load.model, end) for g, (load, end, _) in self._loading.items()},
            free_bytes={g: res.free_bytes(g) for g in self.all_gpu_ids},
            model_bytes=self.model_bytes,
            load_s={m: self.load_time.predict_s(b) for m, b in self.model_bytes.items()},
            pinned=self.pinned,
            recent_share={m: w / total for m, w in self._recent.items()} if (total := sum(self._recent.values()))
            else {},
        )
        return SchedulerView(now=v.now, round_index=v.round_index, gpu_ids=v.gpu_ids, groups=v.groups,
                             requests=v.requests, busy_gpu_ids=v.busy_gpu_ids | frozenset(self._loading),
                             placement=placement)

    # ------------------------------------------------------------ plans
    def apply_plan(self, plan: RoundPlan, now: float, expected_end_at: dict[tuple[str, ...], float] | None = None,
                   load_end_at: dict[ModelLoad, float] | None = None) -> None:
        if plan.round_index != self.round_index and not plan.is_empty:
            raise Conflict(f"plan for round {plan.round_index}, engine at round {self.round_index}")
        for ev in plan.evictions:
            for g in ev.gpu_ids:
                if self.residency.remove(g, ev.model) is not None:
                    self.num_evictions += 1
        for load in plan.loads:
            end = (load_end_at or {}).get(load, now + load.duration_s)
            for g in load.gpu_ids:
                self.residency.reserve(g, load.model, self.model_bytes[load.model], now)
            if len(self.load_records) == self.load_records.maxlen:
                self._load_base += 1
            self.load_records.append(LoadRecord(load.model, load.gpu_ids, now, end))
            index = self._load_base + len(self.load_records) - 1
            for g in load.gpu_ids:
                self._loading[g] = (load, end, index)
        for a in plan.assignments:
            model = self.state(a.request_ids[0]).request.model
            for g in a.gpu_ids:
                self.residency.touch(g, model, now)
        super().apply_plan(plan, now, expected_end_at)

    def finish_load(self, load: ModelLoad, now: float, error: str | None = None) -> None:
        """A load ended (``error``: it failed and the copy is not there); its devices are free."""
        entry = self._loading.get(load.gpu_ids[0])
        if entry is None or entry[0] != load:
            raise Conflict(f"no load {load} in flight")
        started = None
        for g in load.gpu_ids:
            _, _, index = self._loading.pop(g)
            pos = index - self._load_base
            if 0 <= pos < len(self.load_records):
                rec = self.load_records[pos]
                started = rec.started_at
                self.load_records[pos] = LoadRecord(rec.model, rec.gpu_ids, rec.started_at, rec.expected_end_at,
                                                    now, error)
            if error is None:
                self.residency.settle(g, load.model, self.model_bytes[load.model], now)
            else:
                self.residency.remove(g, load.model)
        if started is not None:
            elapsed = max(now - started, 0.0)
            self.load_gpu_seconds += elapsed * len(load.gpu_ids)
            if error is None:
                self.num_loads += len(load.gpu_ids)
                self.load_time.observe(self.model_bytes[load.model], elapsed)
