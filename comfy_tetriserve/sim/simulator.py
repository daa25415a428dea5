"""The engine on a virtual clock: the same Engine and policy as the service, a simulated executor.

Event loop: the next event is the earliest of (next arrival, next assignment end). All events at
that instant are applied (ends first, then arrivals), then the engine is asked for one plan, whose
assignments start at once; their ends are computed, not awaited:

    end = start + dispatch_overhead_s [+ migration_s if the group changed] + sum of step times

Warm-up (CUDA-graph capture, core/warmup.py): when the true or the planner's cost model has
``capture_steps`` > 0, the simulation models each device's graph cache (``warm_keys_per_device``
keys, least recently used out): an assignment whose key (group, shape) is cold on its group takes
``warmup_time_s`` of the true cost more, the planner's prediction adds its own cost's warm-up,
and the planner sees the warm keys in its view. With ``capture_steps`` 0 on both nothing changes.

Step times come from ``true_cost`` (default: the planner's own cost model), optionally with
seeded Gaussian jitter of coefficient of variation ``step_jitter_cv`` (the paper measured under
1%). The planner sees running_until_at = its own prediction (dispatch + migration + predicted
steps), as the live service would. Late requests are served to completion (they count as misses).
Every number produced here comes from the cost model named in ``SimResult.cost_name``.

``online_correction`` plans as the service does: the planner's cost model is wrapped in the
service's ``OnlineCostModel`` (cost.py), and every simulated step time of an assignment is fed to
it when the assignment ends (the service feeds the measured step times of each assignment's
result). Without it the planner keeps its profile however wrong it is (a stale profile).

``shared_cores`` models devices that share compute (CPU workers sharing cores): step times are
the true cost's (measured one request at a time, a degree-k step on k busy devices), slowed by
s(B) / s(k) while B devices are busy, s(b) = max(1, b / shared_cores) ** ``shared_exponent``
(processor sharing, rates recomputed at every event). The exponent 1.15 matches the CPU demo's
box (scripts/cpu_contention.py: four busy workers on two cores step 2.2-2.4x slower).
"""
from __future__ import annotations

import heapq
import math
import random
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..cost import CostModel, OnlineCostModel, warmup_time_s
from ..core.engine import Engine
from ..core.warmup import MAX_GRAPHS, WarmTracker, capture_steps, warm_key
from ..plan import aligned_groups, all_subset_groups
from ..types import Assignment, AssignmentResult, GenRequest, RequestState, RequestStatus


@dataclass(frozen=True)
class SimConfig:
    num_gpus: int = 8
    groups: str = "aligned"  # "aligned" power-of-two blocks | "all" subsets of power-of-two size
    dispatch_overhead_s: float = 0.001  # control-plane latency per assignment (plan -> worker -> result)
    latent_bytes_per_token: int = 64 * 4  # 16 channels x 2x2 patch, fp32: moved when the group changes
    link_bytes_per_s: float = 300e9
    link_alpha_s: float = 15e-6
    step_jitter_cv: float = 0.0
    shared_cores: float = 0.0  # > 0: devices share this many cores (see the module docstring)
    shared_exponent: float = 1.15
    seed: int = 0
    warm_keys_per_device: int = MAX_GRAPHS  # graphs a device keeps (worker/graphs.py)
    online_correction: bool = False  # plan with the service's OnlineCostModel, fed every simulated step
    max_events: int = 10_000_000


@dataclass(frozen=True)
class RequestOutcome:
    request: GenRequest
    status: RequestStatus
    finished_at: float | None
    first_step_at: float | None
    gpu_seconds: float

    @property
    def met(self) -> bool:
        d = self.request.deadline_at
        return (d is not None and self.status is RequestStatus.FINISHED and self.finished_at is not None
                and self.finished_at <= d + 1e-9)

    @property
    def latency_s(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.request.arrival_at


@dataclass(frozen=True)
class SimResult:
    policy: str
    cost_name: str
    outcomes: tuple[RequestOutcome, ...]
    decision_times_s: tuple[float, ...]
    num_plans: int
    num_assignments: int
    makespan_s: float
    busy_gpu_seconds: float
    degree_seconds: dict[int, float] = field(default_factory=dict)  # time-weighted use per degree

    def sar(self, outcomes: Iterable[RequestOutcome] | None = None) -> float:
        """SLO attainment: on-time / requests that had a deadline."""
        outs = [o for o in (self.outcomes if outcomes is None else outcomes) if o.request.deadline_at is not None]
        return sum(o.met for o in outs) / len(outs) if outs else float("nan")

    def sar_by_resolution(self) -> dict[int, float]:
        res = sorted({o.request.height for o in self.outcomes})
        return {r: self.sar([o for o in self.outcomes if o.request.height == r]) for r in res}

    def latency_stats(self) -> dict[str, float]:
        lat = sorted(o.latency_s for o in self.outcomes if o.latency_s is not None)
        if not lat:
            return {"mean": float("nan"), "p50": float("nan"), "p95": float("nan")}
        return {"mean": statistics.fmean(lat), "p50": _pct(lat, 50), "p95": _pct(lat, 95)}

    def mean_degree(self) -> float:
        total = sum(self.degree_seconds.values())
        return sum(k * s for k, s in self.degree_seconds.items()) / total if total else 0.0


def _pct(sorted_values: Sequence[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = (len(sorted_values) - 1) * p / 100.0
    lo, hi = math.floor(idx), math.ceil(idx)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (idx - lo)


def make_groups(config: SimConfig) -> tuple[tuple[int, ...], ...]:
    ids = tuple(range(config.num_gpus))
    if config.groups == "aligned":
        return aligned_groups(ids)
    if config.groups == "all":
        return all_subset_groups(ids)
    raise ValueError(f"unknown group set {config.groups!r} (aligned | all)")


class Simulation:
    """A resumable run: ``run(until)`` processes every event up to ``until`` (virtual seconds)."""

    def __init__(self, trace: Sequence[GenRequest], policy, cost: CostModel, config: SimConfig = SimConfig(), *,
                 true_cost: CostModel | None = None, groups: Sequence[tuple[int, ...]] | None = None) -> None:
        self.config = config
        self.true_cost = true_cost or cost
        #: the planner's cost model: ``cost``, or ``cost`` corrected online from the simulated steps
        self.cost = OnlineCostModel(cost) if config.online_correction else cost
        cost = self.cost
        self._step_times: dict[int, tuple[float, ...]] = {}  # online correction: seq -> its steps' times
        self.policy = policy
        #: the devices' graph caches, when either cost model prices warm-up (core/warmup.py)
        self.warm = (WarmTracker(config.warm_keys_per_device)
                     if capture_steps(self.cost) > 0 or capture_steps(self.true_cost) > 0 else None)
        self.engine = Engine(policy, cost, range(config.num_gpus),
                             tuple(groups) if groups is not None else make_groups(config),
                             warm_keys=self.warm.keys if self.warm is not None else None)
        self._rng = random.Random(config.seed)
        self._arrivals = sorted(trace, key=lambda r: (r.arrival_at, r.request_id))
        self._ends: list[tuple[float, int, Assignment, float]] = []  # (end_at, seq, assignment, started_at)
        self._seq = 0
        self._work: dict[int, list] = {}  # shared cores: seq -> [assignment, started_at, alone-seconds left]
        self._last_at = 0.0
        self._next = 0
        self._last_gpus: dict[str, tuple[int, ...]] = {}
        self.num_plans = self.num_assignments = 0
        self.busy_gpu_seconds = 0.0
        self.degree_seconds: dict[int, float] = {}
        self.start_at = self._arrivals[0].arrival_at if self._arrivals else 0.0
        self.now = self._last_at = self.start_at

    def add_arrival(self, request: GenRequest) -> None:
        """One more request, arriving no earlier than every request given so far (a router's choice)."""
        if self._arrivals and request.arrival_at < self._arrivals[-1].arrival_at:
            raise ValueError("arrivals must be added in time order")
        self._arrivals.append(request)

    def migration_s(self, r: GenRequest, a: Assignment) -> float:
        """Moving the requests' latents to ``a``'s devices before it starts (0 when they are there)."""
        return _migration_s(self.config, r, a, self._last_gpus)

    @property
    def done(self) -> bool:
        return self._next >= len(self._arrivals) and not self._ends

    def run(self, until: float = math.inf) -> "Simulation":
        for _ in range(self.config.max_events):
            if self.done:
                return self
            t_arr = self._arrivals[self._next].arrival_at if self._next < len(self._arrivals) else math.inf
            t_end = self._ends[0][0] if self._ends else math.inf
            t = min(t_arr, t_end)
            if t > until:
                return self
            self.now = t
            self._step(t)
        raise RuntimeError("simulation did not finish within max_events")

    def _slowdown(self, busy: int) -> float:
        c = self.config
        return max(1.0, busy / c.shared_cores) ** c.shared_exponent

    def _advance(self, now: float) -> None:
        """Shared cores: progress every running assignment to ``now`` at its current rate."""
        dt = now - self._last_at
        busy = sum(w[0].sp_degree for w in self._work.values())
        if dt > 0 and busy:
            s_busy = self._slowdown(busy)
            for w in self._work.values():
                w[2] -= dt * self._slowdown(w[0].sp_degree) / s_busy
            self.busy_gpu_seconds += dt * busy
        self._last_at = now

    def _rebuild_ends(self, now: float) -> None:
        busy = sum(w[0].sp_degree for w in self._work.values())
        s_busy = self._slowdown(busy) if busy else 1.0
        self._ends = [(now + max(w[2], 0.0) * s_busy / self._slowdown(w[0].sp_degree), seq, w[0], w[1])
                      for seq, w in self._work.items()]
        heapq.heapify(self._ends)

    def _step(self, now: float) -> None:
        engine, config = self.engine, self.config
        shared = config.shared_cores > 0
        if shared:
            self._advance(now)
        while self._ends and self._ends[0][0] <= now + (1e-12 if shared else 0.0):
            end_at, seq, a, started = heapq.heappop(self._ends)
            self._work.pop(seq, None)
            self._observe(seq, a, end_at - started)
            engine.apply_result(AssignmentResult(a, started, end_at, a.num_steps), end_at)
        while self._next < len(self._arrivals) and self._arrivals[self._next].arrival_at <= now:
            engine.submit(self._arrivals[self._next])
            self._next += 1
        plan = engine.plan(now)
        if plan is not None:
            self.num_plans += 1
            if not plan.is_empty:
                self._start(plan, now)
        if shared:
            self._rebuild_ends(now)

    def _observe(self, seq: int, a: Assignment, elapsed_s: float) -> None:
        """Online correction: what the service does with an assignment's measured step times (on
        shared cores, the steps' share of the elapsed time, slowed as they ran)."""
        times = self._step_times.pop(seq, None)
        if times is None:
            return
        if self.config.shared_cores > 0 and times:
            per_step = max(elapsed_s - self.config.dispatch_overhead_s, 0.0) / len(times)
            times = (per_step,) * len(times)
        r = self.engine.state(a.request_ids[0]).request
        batch = r.batch * len(a.request_ids)
        for t in times:
            self.cost.observe(r.model, r.height, r.width, batch, a.sp_degree, t)

    def _start(self, plan, now: float) -> None:
        engine, config = self.engine, self.config
        expected: dict[tuple[str, ...], float] = {}
        actual: list[tuple[Assignment, float]] = []
        for a in plan.assignments:
            r = engine.state(a.request_ids[0]).request
            batch = r.batch * len(a.request_ids)
            overhead = config.dispatch_overhead_s + self.migration_s(r, a)
            predicted = a.num_steps * self.cost.step_time_s(r.model, r.height, r.width, batch, a.sp_degree)
            t_step = self.true_cost.step_time_s(r.model, r.height, r.width, batch, a.sp_degree)
            if config.step_jitter_cv > 0:
                cv = config.step_jitter_cv
                steps = tuple(max(t_step * (1 + self._rng.gauss(0.0, cv)), 0.0) for _ in range(a.num_steps))
                run = sum(steps)
            else:
                steps = (t_step,) * a.num_steps
                run = a.num_steps * t_step
            if self.warm is not None and not self.warm.use(warm_key(a.gpu_ids, r.model, r.height, r.width, batch)):
                predicted += warmup_time_s(self.cost, r.model, r.height, r.width, batch, a.sp_degree)
                run += warmup_time_s(self.true_cost, r.model, r.height, r.width, batch, a.sp_degree)
            expected[a.request_ids] = now + overhead + predicted
            actual.append((a, overhead + run, steps))
            for rid in a.request_ids:
                self._last_gpus[rid] = a.gpu_ids
        engine.apply_plan(plan, now, expected)
        for a, dur, steps in actual:
            if config.online_correction:
                self._step_times[self._seq] = steps
            if config.shared_cores > 0:
                self._work[self._seq] = [a, now, dur]  # its end follows from the rates (_rebuild_ends)
            else:
                heapq.heappush(self._ends, (now + dur, self._seq, a, now))
                self.busy_gpu_seconds += dur * a.sp_degree
            self._seq += 1
            self.degree_seconds[a.sp_degree] = self.degree_seconds.get(a.sp_degree, 0.0) + dur
            self.num_assignments += 1

    def result(self, cost_name: str = "") -> SimResult:
        return SimResult(
            policy=getattr(self.policy, "name", type(self.policy).__name__), cost_name=cost_name,
            outcomes=tuple(_outcome(st) for st in self.engine.states()),
            decision_times_s=tuple(self.engine.decision_times_s), num_plans=self.num_plans,
            num_assignments=self.num_assignments, makespan_s=self.now - self.start_at,
            busy_gpu_seconds=self.busy_gpu_seconds, degree_seconds=dict(self.degree_seconds),
        )


def simulate(trace: Sequence[GenRequest], policy, cost: CostModel, config: SimConfig = SimConfig(), *,
             true_cost: CostModel | None = None, cost_name: str = "") -> SimResult:
    """Run ``trace`` through ``policy`` on a virtual clock; every request runs to its end."""
    return Simulation(trace, policy, cost, config, true_cost=true_cost).run().result(cost_name)


def _migration_s(config: SimConfig, r: GenRequest, a: Assignment,
                 last_gpus: dict[str, tuple[int, ...]]) -> float:
    """Moving the latent point to point when a request's group changes (the paper: under 0.05% of a step)."""
    moved = [rid for rid in a.request_ids if last_gpus.get(rid) not in (None, a.gpu_ids)]
    if not moved:
        return 0.0
    nbytes = r.num_image_tokens * r.batch * config.latent_bytes_per_token
    return config.link_alpha_s + nbytes / config.link_bytes_per_s


def _outcome(st: RequestState) -> RequestOutcome:
    return RequestOutcome(request=st.request, status=st.status, finished_at=st.finished_at,
                          first_step_at=st.first_step_at, gpu_seconds=st.gpu_seconds)
