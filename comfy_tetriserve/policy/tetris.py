"""TetriServe: the round-based, deadline-aware step-level sequence-parallel planner (pure).

One call of ``plan_round`` is one planning round. The paper's steps, with our decisions (the
option that controls each is in brackets; docs/planner.md measures them):

1. Classify the plannable requests: LIVE (the fastest degree can still meet the deadline),
   LATE (no schedule can: best effort), BEST_EFFORT (no deadline).
2. Allocation, least GPU time: for each LIVE request the cheapest plan (GPU time = degree x step
   time) that meets its deadline with its remaining steps: one degree, or two degrees whose mix
   just meets it (policy.common.plan_allocation). Re-planned every round from the budget left,
   keeping ``plan_margin_frac`` x c of the budget in reserve, c = min(1, (live requests -
   ``margin_free_live``) / GPUs) the *contention*: under contention a plan that just meets its
   deadline breaks at the first delay (our addition; zero with up to two live requests, as in
   most rounds of the paper's load).
3. Admission [``admission``]: Moore-Hodgson over GPU time decides which LIVE requests can finish
   *together* (deadline order; when the work due by a deadline exceeds N GPUs x the time to it x
   (1 - ``admit_margin_frac`` x c), the request with the most work is *doomed* for this round).
   Doomed requests only get GPUs the admitted ones leave idle, and are reconsidered next round.
   Not in the paper; without it the per-request survival test below lets the box chase requests
   that cannot all finish. The capacity margin: the test pools GPU time as a fluid, but a request
   pushed back by earlier deadlines needs faster, costlier degrees later, and rounds leave GPUs
   idle at their ends; both grow with the number of requests sharing the box, and without the
   margin the box spends GPU time on requests it later drops or that miss by a few steps.
   The admission margin's contention counts a *burst* once [``burst_window_s``]: live requests
   whose arrivals follow each other within that window (requests submitted together) are one
   arrival for it, so a burst that fits the whole box is admitted whole, while sustained
   contention (requests arriving apart) keeps the margin. The plan margin counts every request.
4. Round length tau = ``granularity_steps`` x the fastest step of the slowest LIVE request
   [``tau_rule``]: a 2048 px request runs about 5 steps per round at 8 GPUs, smaller ones more.
   Option (off by default, measured worse): ``tau_slack_frac`` caps tau at that share of the
   tightest slack of a LIVE request at its fastest degree (never below one such step).
5. Packing (the paper's group knapsack over GPUs): each admitted request offers "run nothing" or
   q = min(steps planned at k, floor(tau / T_k)) steps at a degree k of its allocation
   [``mix_order``: only the slower, cheaper degree of a two-degree plan first; the re-plan moves
   steps to the faster degree as the budget shrinks]. *Stagger* [``stagger``]: in a fresh round,
   when the plans' projected GPU demand (each plan's phases back to back from now) peaks above the
   free GPUs, some two-degree plans run their fast share first, earliest deadline first, so that
   the requests of a burst do not all need their fast degree at the end at once. When a step at k outlasts the round, the
   smallest faster degree whose step fits is offered instead. A request *survives* an option if
   it can still finish at its fastest degree from the round's end (a request that finishes within
   the option is judged by its own end). A DP over capacity maximises survivors; ties
   [``tie_break``] go to the earliest deadlines, lexicographically (the option of the request of
   deadline rank r is worth 2^(n - r), less than one survivor in total).
6. Placement: concrete groups from the executor's set, largest first; a request keeps its previous
   group when free [``placement``], else best fit: the block whose enclosing larger blocks are
   most occupied, keeping large blocks whole [``placement_fit``] (policy.common.Placer).
7. Elastic scale-up [``scale_up``]: idle GPUs double the degree of admitted requests, best
   parallel efficiency first, when the step gets ``min_speedup`` faster; then doomed requests
   get what is still idle. On a box whose devices share hardware, the cost model's
   ``parallel_capacity`` (devices that step at profiled speed at once) bounds scale-up: a grant
   never makes more devices busy than that [``use_parallel_capacity``]; a busy CPU worker on
   shared cores is not free capacity, and growing a group then slows every running step. Planned
   work is not bounded (a loaded profile prices it at the busy box's speed). Two arrival-aware
   limits exist as options and are off by default
   (docs/planner.md measures them: both cost deadlines): ``scale_up_reserve`` GPUs are never
   granted by scale-up, and a grant beyond the planned degree runs at most
   ``scale_up_commit_s`` (then its GPUs return to the pool and the gap is re-planned).
8. LATE and BEST_EFFORT requests get at most ``late_max_gpus`` GPU each from what is still idle
   (oldest first), in pieces that end within the round, then are scaled up with whatever is idle
   after that: they never take a GPU a deadline request was given. With no deadline work at all
   rounds are ``background_round_s`` long, so an arrival waits at most that (or one step).
9. Selective batching [``batching``]: LIVE requests of identical shape and at most
   ``batch_max_tokens`` image tokens are paired into one item (one batched step) when the pair
   meets the earlier deadline with ``batch_margin_frac`` of its budget in reserve and needs less
   GPU time than the two apart (pairs form in bursts; a pair planned to end just at its deadline
   loses both requests at the first delay).
10. Round alignment [``align_rounds``]: every assignment runs as many steps as end by a common
   round end E, chosen among whole-step ends between the longest single step and
   ``align_max_frac`` x tau to minimise idle GPU time (plus ``round_overhead_s`` per assignment).

11. Warm-up [``warmup_allocation``] (only when the cost model has ``capture_steps`` > 0 and the view
   carries warm keys; policy/warmup.py): the first step at a shape a group has not captured costs the
   capture. Feasibility (LIVE) and the survival tests count it; a request asks for a free warm group
   of its size first (scale-up too); background pieces only take a degree whose step and expected
   warm-up fit the round; a cold group runs the steps that fit the round after its capture. The
   option also charges it in the allocation and the round's options (measured worse, docs/planner.md).

0. Model placement (only when the executor places models: the view has a ``placement``): demand
   per model decides loads (replication) and evictions, and the steps below run once per model on
   the devices holding it (policy/placement.py).

Synchronous rounds on an event-driven engine: while assignments run, the round ends at the latest
running_until_at; the planner then only fills free GPUs with work that ends by then (*gap mode*),
and the next round starts when all are done. Busy GPUs are simply not offered.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..cost import CostModel, parallel_capacity
from ..types import Assignment, RequestSnapshot, RoundPlan, SchedulerView
from .common import EPS, Placer, plan_allocation, usable_degrees, widest_group
from .packing import admit_by_deadline, choose_round_end, group_knapsack
from .placement import plan_with_placement
from .warmup import WarmPricing, plan_allocation_warm

#: knapsack value of one survivor; the tie-break adds less than this over all requests of a round
SURVIVE = 1_000_000_000
TAU_RULES = ("plan-max", "plan-median", "plan-min", "fast-max", "fast-median", "fast-min")
TIE_BREAKS = ("count-slack", "gpus-slack", "slack", "edf", "none")
MIX_ORDERS = ("both", "fast-first", "cheap-first")


@dataclass
class _Item:
    """A knapsack item: one request, or a batch of identical requests sharing each step."""

    snaps: tuple[RequestSnapshot, ...]
    times: dict[int, float]  # step time per usable degree (batched when several members)
    t_min: float
    left: int  # steps left (the fewest among members)
    deadline: float
    plan: tuple[tuple[int, int], ...] = ()  # allocation (degree, steps)
    slack_s: float = 0.0
    options: list[tuple[int, int, int]] = field(default_factory=list)  # (gpus, steps, value)
    none_value: int = 0
    work_s: float = 0.0  # GPU seconds of the allocation
    rank: int = 0
    chosen: tuple[int, int] | None = None  # (degree, steps)
    scaled: bool = False  # granted a degree beyond its plan by elastic scale-up
    fast_first: bool = False  # its two-degree plan runs the fast share first (stagger)
    group: tuple[int, ...] = ()
    #: warm-up (policy/warmup.py), empty unless priced: per degree, what a cold group's first step
    #: adds (cold_s) and what the planner expects to pay (warm_s: 0 where a group of that size is warm)
    cold_s: dict[int, float] = field(default_factory=dict)
    warm_s: dict[int, float] = field(default_factory=dict)
    warm_groups: frozenset = frozenset()

    def finish_s(self, steps: int | None = None, warm: int = 0) -> float:
        """Time to run ``steps`` (default: all left) at the fastest degree, warm-up included
        (degree ``warm`` counted as warm: this round runs it)."""
        steps = self.left if steps is None else steps
        if not self.warm_s:
            return steps * self.t_min
        return min(steps * t + (0.0 if k == warm else self.warm_s.get(k, 0.0)) for k, t in self.times.items())

    def warmup(self, k: int) -> float:
        """The warm-up expected at degree ``k`` (0 when a group of that size is warm or not priced)."""
        return self.warm_s.get(k, 0.0) if self.warm_s else 0.0

    def group_warmup_s(self, group: tuple[int, ...]) -> float:
        """What the first step on ``group`` adds (0 when warm or not priced)."""
        if not self.cold_s or group in self.warm_groups:
            return 0.0
        return self.cold_s.get(len(group), 0.0)

    @property
    def prefer(self) -> tuple[int, ...]:
        return self.snaps[0].gpu_ids

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(s.request_id for s in self.snaps)


@dataclass(frozen=True)
class TetriServePolicy:
    """The planner's configuration (see the module docstring for what each option decides)."""

    name: str = "tetriserve"
    granularity_steps: int = 5
    tau_rule: str = "fast-max"
    tie_break: str = "edf"
    mix_order: str = "cheap-first"
    placement: bool = True
    placement_fit: str = "best"
    scale_up: bool = True
    min_speedup: float = 1.05
    batching: bool = True
    batch_max_tokens: int = 1024
    batch_margin_frac: float = 0.2
    late_max_gpus: int = 1
    align_rounds: bool = True
    align_max_frac: float = 1.5
    round_overhead_s: float = 0.001
    admission: bool = True
    plan_margin_frac: float = 0.2
    admit_margin_frac: float = 0.45
    margin_free_live: int = 2
    burst_window_s: float = 0.001
    background_round_s: float = 0.15
    scale_up_reserve: int = 0
    scale_up_commit_s: float = 0.0
    tau_slack_frac: float = 0.0
    use_parallel_capacity: bool = True
    warmup_allocation: bool = False
    stagger: bool = True

    def __post_init__(self) -> None:
        if self.tau_rule not in TAU_RULES and not self.tau_rule.startswith("fixed:"):
            raise ValueError(f"tau_rule must be one of {TAU_RULES} or fixed:<seconds>")
        if self.tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break must be one of {TIE_BREAKS}")
        if self.mix_order not in MIX_ORDERS:
            raise ValueError(f"mix_order must be one of {MIX_ORDERS}")
        if self.granularity_steps < 1:
            raise ValueError("granularity_steps must be >= 1")
        for name in ("plan_margin_frac", "admit_margin_frac", "batch_margin_frac"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1)")
        if min(self.scale_up_reserve, self.scale_up_commit_s, self.tau_slack_frac, self.burst_window_s) < 0:
            raise ValueError("scale_up_reserve, scale_up_commit_s, tau_slack_frac and burst_window_s must be >= 0")

    def for_forecast(self) -> "TetriServePolicy":
        """The same planner for a world without further arrivals (sim.forecast): background work
        (late or without deadline) runs in long pieces, as no arrival can need its GPUs."""
        return dataclasses.replace(self, background_round_s=max(self.background_round_s, 2.0))

    # ------------------------------------------------------------------ the round
    #: handles ``view.placement`` (stage 0): the engine may hand it views where models are not everywhere
    places_models = True

    def plan_round(self, view: SchedulerView, cost: CostModel) -> RoundPlan:
        if view.placement is not None:  # stage 0, model placement: loads, evictions, per-model sub-views
            return plan_with_placement(self, view, cost)
        now = view.now
        n = len(view.gpu_ids)
        round_end = max((r.running_until_at for r in view.requests if r.running_until_at is not None), default=None)
        window = round_end - now if round_end is not None and round_end > now + EPS else None
        live: list[_Item] = []
        background: list[_Item] = []
        degrees_of: dict[str, tuple[int, ...]] = {}
        shapes: dict[tuple, tuple[dict[int, float], float]] = {}
        pricing = WarmPricing(view, cost)
        for snap in view.plannable:
            r = snap.request
            shape = shapes.get(r.shape_key)
            if shape is None:
                ks = degrees_of.get(r.model)
                if ks is None:
                    ks = degrees_of[r.model] = usable_degrees(cost, r.model, widest_group(view))
                times = {k: cost.step_time_s(r.model, r.height, r.width, r.batch, k) for k in ks}
                shape = shapes[r.shape_key] = (times, min(times.values()))
            times, t_min = shape
            deadline = r.deadline_at if r.deadline_at is not None else math.inf
            item = _Item((snap,), times, t_min, snap.steps_left, deadline)
            if pricing.active:
                self._price_warmup(item, pricing, r.shape_key)
            if r.deadline_at is not None and now + item.finish_s() <= deadline + EPS:  # LIVE
                live.append(item)
            else:  # LATE or BEST_EFFORT
                background.append(item)
        # contention (live requests per GPU beyond the first few) scales two margins: a share of
        # each budget kept in reserve (a plan that just meets its deadline breaks at the first
        # delay) and a share of the GPU time admission may count on
        contention = min(1.0, max(len(live) - self.margin_free_live, 0) / max(n, 1))
        # the admission margin counts a burst (arrivals within burst_window_s of each other) once
        admit_contention = min(1.0, max(self._num_contending(live) - self.margin_free_live, 0) / max(n, 1))
        margin = self.plan_margin_frac * contention
        for item in live:
            budget = item.deadline - now
            allocate = plan_allocation if not (item.warm_s and self.warmup_allocation) else \
                (lambda t, n, b, w=item.warm_s: plan_allocation_warm(t, w, n, b))
            alloc = allocate(item.times, item.left, budget * (1.0 - margin)) or allocate(item.times, item.left, budget)
            item.plan = alloc.steps
            item.slack_s = budget - alloc.time_s
            item.work_s = alloc.gpu_time_s
        if self.batching and len(live) > 1:
            live = self._batch(live, cost, now, n, pricing)
        doomed: list[_Item] = []
        if self.admission and live:
            live, doomed = self._admit(live, self._running_work(view, cost, n), now, n,
                                       1.0 - self.admit_margin_frac * admit_contention)
        if window is not None:
            tau = window
        elif live:
            tau = self._tau(live)
            if self.tau_slack_frac > 0:
                tight = min(x.deadline - now - x.left * x.t_min for x in live)
                tau = max(min(tau, self.tau_slack_frac * tight), max(x.t_min for x in live))
        else:
            tau = self.background_round_s
        placer = Placer(view, preserve=self.placement, fit=self.placement_fit)
        capacity = parallel_capacity(cost) if self.use_parallel_capacity else None
        chosen = self._pack(live, placer.num_free, now, tau, fresh=window is None)
        chosen = self._place(chosen, placer, view, now, tau, fresh=window is None)
        if self.scale_up:
            self._scale_up(chosen, placer, view, tau, capacity)
        if doomed and placer.num_free > 0:  # after scale-up: GPUs go to the admitted first
            extra = self._pack(doomed, placer.num_free, now, tau, fresh=window is None)
            extra = self._place(extra, placer, view, now, tau, fresh=window is None)
            if self.scale_up:
                self._scale_up(extra, placer, view, tau, capacity)
            chosen += extra
        bg = self._background(background, placer, view, tau, fresh=window is None, capacity=capacity)
        if self.scale_up:
            self._scale_up(bg, placer, view, tau, capacity)
        out = chosen + bg
        self._fill(out, {id(x) for x in chosen}, tau, window is None)
        assignments = tuple(Assignment(x.ids, x.group, x.chosen[1]) for x in out)
        longest = max((x.chosen[1] * x.times[x.chosen[0]] for x in out), default=0.0)
        if not assignments and window is None and view.plannable:
            return self._fallback(view, cost, background + live)
        kind = "gap" if window is not None else "round"
        return RoundPlan(view.round_index, longest, assignments,
                         note=f"{kind} tau={tau:.3f}s admitted={len(live)} doomed={len(doomed)}")

    # ------------------------------------------------------------------ pieces
    def _num_contending(self, live: list[_Item]) -> int:
        """Live requests counted for the contention: with ``burst_window_s`` > 0, requests whose
        arrivals lie within that window of the previous one count once (a burst, not sustained load)."""
        if self.burst_window_s <= 0:
            return len(live)
        arrivals = sorted(s.request.arrival_at for x in live for s in x.snaps)
        count, last = 0, -math.inf
        for a in arrivals:
            if a - last > self.burst_window_s:
                count += 1
            last = a
        return count

    def _running_work(self, view: SchedulerView, cost: CostModel, n: int) -> list[tuple[float, float]]:
        """(deadline, GPU seconds still needed) of running requests that can still make it:
        the rest of the assignment in flight plus the least GPU time of the steps after it."""
        out = []
        for r in view.requests:
            if r.running_until_at is None or r.request.deadline_at is None:
                continue
            q = r.request
            times = {k: cost.step_time_s(q.model, q.height, q.width, q.batch, k)
                     for k in usable_degrees(cost, q.model, n)}
            after = max(r.steps_left - r.steps_in_flight, 0)
            start = max(r.running_until_at, view.now)
            if start + after * min(times.values()) > q.deadline_at + EPS:
                continue
            busy = len(r.gpu_ids) * (start - view.now)
            alloc = plan_allocation(times, after, q.deadline_at - start) if after else None
            rest = alloc.gpu_time_s if alloc is not None else 0.0
            out.append((q.deadline_at, busy + rest))
        return out

    def _admit(self, live: list[_Item], running: list[tuple[float, float]], now: float, n: int,
               capacity_frac: float = 1.0) -> tuple[list[_Item], list[_Item]]:
        """Which LIVE requests can finish together (packing.admit_by_deadline: Moore-Hodgson over
        GPU time on n x ``capacity_frac`` GPUs; running requests are never dropped). The dropped
        (*doomed*) requests only get GPUs the admitted ones leave idle this round, and are
        reconsidered next round."""
        jobs = [(x.deadline, x.work_s, True) for x in live] + [(d, w, False) for d, w in running]
        dropped = admit_by_deadline(jobs, capacity_frac * n, now)
        if not dropped:
            return live, []
        return ([x for i, x in enumerate(live) if i not in dropped],
                sorted((live[i] for i in dropped), key=lambda x: x.deadline))

    def _tau(self, live: list[_Item]) -> float:
        if self.tau_rule.startswith("fixed:"):
            return float(self.tau_rule.split(":", 1)[1])
        if self.tau_rule.startswith("fast"):
            ref = [x.t_min for x in live]
        else:
            ref = [x.times[x.plan[-1][0]] for x in live]
        if self.tau_rule.endswith("max"):
            t = max(ref)
        elif self.tau_rule.endswith("min"):
            t = min(ref)
        else:
            t = sorted(ref)[len(ref) // 2]
        return self.granularity_steps * t

    def _options(self, x: _Item, now: float, tau: float, fresh: bool, free: int, num_items: int) -> None:
        """Fill x.options with (gpus, steps, value) and x.none_value (see the module docstring)."""
        horizon = now + tau
        survive_none = horizon + x.finish_s() <= x.deadline + EPS
        members = len(x.snaps)
        urgency = min(int(1000.0 / (1.0 + 20.0 * max(x.slack_s, 0.0))), 999)
        # the tie-break must never outweigh one survivor: "edf" weighs rank r by 2^(num_items - r)
        unit = SURVIVE if self.tie_break != "edf" else 1 << (num_items + 4)
        x.none_value = members * unit * survive_none
        plan = x.plan
        if self.mix_order == "fast-first":
            plan = plan[-1:]
        elif self.mix_order == "cheap-first":
            plan = plan[-1:] if x.fast_first else plan[:1]
        x.options = []
        seen = set()
        for k, s_k in plan:
            t = x.times[k]
            q = min(s_k, int(tau / t + EPS))
            if q < 1:
                # the planned degree's step outlasts the round: the smallest faster degree whose
                # step fits runs instead (keeps rounds about tau long); none fits: one step at the fastest
                fits = [k2 for k2 in sorted(x.times) if k2 > k and x.times[k2] <= tau + EPS]
                if fits:
                    k = fits[0]
                    t = x.times[k]
                    q = min(x.left, int(tau / t + EPS))
                elif fresh:
                    k = max(x.times, key=lambda k2: (-x.times[k2], k2))
                    t, q = x.times[k], 1
                else:
                    continue
            if k > free or k in seen:
                continue
            seen.add(k)
            w = x.warm_s.get(k, 0.0) if x.warm_s and self.warmup_allocation else 0.0
            if w > 0:  # a cold degree: its capture comes out of the round (at least one step runs)
                q = max(1, min(q, int((tau - w) / t + EPS)))
                if q >= x.left:
                    survive = now + q * t + w <= x.deadline + EPS
                else:
                    survive = now + max(tau, q * t + w) + x.finish_s(x.left - q, k) <= x.deadline + EPS
            elif q >= x.left:  # finishes in this round: judged by its own end, not the round's
                survive = now + q * t <= x.deadline + EPS
            elif x.warm_s:
                survive = now + max(tau, q * t) + x.finish_s(x.left - q, k) <= x.deadline + EPS
            else:
                survive = now + max(tau, q * t) + (x.left - q) * x.t_min <= x.deadline + EPS
            value = members * unit * survive
            if self.tie_break == "count-slack":
                value += members * 1000 + urgency
            elif self.tie_break == "gpus-slack":
                value += k * 1000 + urgency
            elif self.tie_break == "slack":
                value += urgency
            elif self.tie_break == "edf":
                value += 1 << (num_items - x.rank)
            x.options.append((k, q, value))

    def _pack(self, items: list[_Item], capacity: int, now: float, tau: float, fresh: bool) -> list[_Item]:
        """The round's group knapsack over this round's options of ``items``; returns the chosen ones."""
        if not items or capacity <= 0:
            return []
        if self.tie_break == "edf":
            for rank, x in enumerate(sorted(items, key=lambda x: (x.deadline, x.ids))):
                x.rank = rank
        if self.stagger and fresh and self.mix_order == "cheap-first":
            self._stagger(items, capacity)
        for x in items:
            self._options(x, now, tau, fresh, capacity, len(items))
        picks = group_knapsack([(x.none_value, [(k, v) for k, _, v in x.options]) for x in items], capacity)
        chosen = []
        for x, oi in zip(items, picks):
            if oi >= 0:
                k, q, _ = x.options[oi]
                x.chosen = (k, q)
                chosen.append(x)
        return chosen

    def _stagger(self, items: list[_Item], capacity: int) -> None:
        """Mark the two-degree plans that run their fast share first (``x.fast_first``).

        Cheap-first makes every two-degree plan of a burst want its fast degree at the same time,
        at the end, when the deadlines leave no slack: four 256 px requests on one GPU each all
        need two each 0.9 s later. The plans' GPU demand over time (each phase at its planned
        degree, back to back from now) is projected; while its peak exceeds ``capacity``, plans
        are flipped to fast-first, earliest deadline first, when the flip lowers the peak and
        the demand now still fits. Nothing changes when the peak fits (most rounds).
        """
        def phases(x: _Item, flipped: bool) -> list[tuple[int, float]]:
            out = [(k, s * x.times[k]) for k, s in x.plan]
            return out[::-1] if flipped and len(out) > 1 else out

        def demand(flips: set[int]) -> tuple[int, int]:
            """(peak demand over the plans, demand now)"""
            events = []
            now_demand = 0
            for x in items:
                t = 0.0
                ph = phases(x, id(x) in flips)
                now_demand += ph[0][0] if ph else 0
                for k, d in ph:
                    events += [(t, k), (t + d, -k)]
                    t += d
            cur = peak = 0
            for _, k in sorted(events):  # at one instant ends (negative) come before starts
                cur += k
                peak = max(peak, cur)
            return peak, now_demand

        flips: set[int] = set()
        peak, _ = demand(flips)
        if peak <= capacity:
            return
        for x in sorted((x for x in items if len(x.plan) > 1), key=lambda x: (x.deadline, x.slack_s)):
            trial = flips | {id(x)}
            trial_peak, now_demand = demand(trial)
            if now_demand <= capacity and trial_peak < peak:
                flips, peak = trial, trial_peak
                if peak <= capacity:
                    break
        for x in items:
            x.fast_first = id(x) in flips

    def _place(self, chosen: list[_Item], placer: Placer, view: SchedulerView, now: float, tau: float,
               fresh: bool) -> list[_Item]:
        """Concrete groups, largest first (then least slack). An item whose group size is not free
        (busy GPUs fragment the aligned blocks) falls back to the largest smaller free group whose
        steps fit the round, else waits. If keeping previous groups placed fewer items than
        ignoring them would, previous groups are ignored this round."""
        order = sorted(chosen, key=lambda x: (-x.chosen[0], x.slack_s))
        wanted = [x.chosen for x in order]
        saved = set(placer.occupied)
        placed = self._place_in_order(order, placer, tau, fresh, prefer=True)
        if len(placed) < len(order) and self.placement:
            first = [(x, x.chosen, x.group) for x in placed]
            used = set(placer.occupied)
            placer.occupied = set(saved)
            for x, w in zip(order, wanted):
                x.chosen = w
            again = self._place_in_order(order, placer, tau, fresh, prefer=False)
            if len(again) > len(placed):
                return again
            placer.occupied = used
            for x in order:
                x.chosen = None
            for x, c, g in first:
                x.chosen, x.group = c, g
        return placed

    def _place_in_order(self, order: list[_Item], placer: Placer, tau: float, fresh: bool,
                        prefer: bool) -> list[_Item]:
        placed = []
        for x in order:
            pref = x.prefer if prefer else ()
            g = placer.place(x.chosen[0], self._warm_prefer(x, placer, x.chosen[0], pref))
            if g is None:
                for k in sorted((k for k in x.times if k < x.chosen[0]), reverse=True):
                    q = min(x.left, int(tau / x.times[k] + EPS))
                    if q < 1 and not fresh:
                        continue
                    g = placer.place(k, self._warm_prefer(x, placer, k, pref))
                    if g is not None:
                        x.chosen = (k, max(q, 1))
                        break
            if g is None:
                x.chosen = None
                continue
            x.group = g
            placed.append(x)
        return placed

    def _scale_up(self, items: list[_Item], placer: Placer, view: SchedulerView, tau: float,
                  capacity: int | None = None) -> None:
        """Double degrees with idle GPUs, best parallel efficiency first, if the doubled group is
        placeable; ``scale_up_reserve`` GPUs are never granted, and no grant makes more than
        ``capacity`` GPUs busy."""
        spare = placer.num_free - self.scale_up_reserve
        if capacity is not None:
            spare = min(spare, capacity - len(placer.occupied))
        while spare > 0:
            best = None
            for x in items:
                k = x.chosen[0]
                k2 = 2 * k
                if k2 not in x.times or k > spare:
                    continue
                speedup = x.times[k] / x.times[k2]
                if speedup < self.min_speedup:
                    continue
                key = (speedup / 2.0, -x.slack_s)
                if best is None or key > best[0]:
                    best = (key, x)
            if best is None:
                return
            x = best[1]
            k = x.chosen[0]
            # re-place x at 2k: free its group, try a 2k group (prefer one containing the old group)
            placer.occupied.difference_update(x.group)
            cands = [g for g in placer.free_groups(2 * k) if set(x.group) <= set(g)] or placer.free_groups(2 * k)
            if not cands:
                placer.take(x.group)
                x.times = dict(x.times)
                x.times.pop(2 * k)  # not placeable: do not try this item again at 2k
                continue
            g = max(cands, key=lambda c: (c in x.warm_groups, set(x.group) <= set(c), placer._fit_score(c)))
            placer.take(g)
            t2 = x.times[2 * k]
            steps_time = x.chosen[1] * x.times[k]
            q = min(x.left, max(x.chosen[1], int(max(tau, steps_time) / t2 + EPS)))
            x.chosen = (2 * k, q)
            x.group = g
            x.scaled = True
            spare -= k

    def _background(self, items: list[_Item], placer: Placer, view: SchedulerView, tau: float,
                    fresh: bool, capacity: int | None = None) -> list[_Item]:
        """LATE and BEST_EFFORT requests on leftover GPUs, oldest first, in pieces that end within tau.

        First at most ``late_max_gpus`` GPUs each; a request whose step is too long for that
        waits for a second pass, which gives it the smallest idle group whose step fits. A piece
        never outlasts the round, so background work cannot delay the next round's deadlines
        (with no deadline work at all, rounds are ``background_round_s`` long). Nor does it make
        more than ``capacity`` GPUs busy (shared hardware: it would slow the deadline work).
        """
        def room() -> int:
            return placer.num_free if capacity is None else min(placer.num_free, capacity - len(placer.occupied))

        out, waiting = [], []
        items = sorted(items, key=lambda x: (x.snaps[0].request.arrival_at, x.snaps[0].request_id))
        for x in items:
            if room() <= 0:
                return out
            small = [k for k in x.times if k <= min(self.late_max_gpus, room()) and x.times[k] + x.warmup(k) <= tau + EPS]
            if not small:
                waiting.append(x)
                continue
            k = max(small)
            g = placer.place(k, self._warm_prefer(x, placer, k, x.prefer))
            if g is None:
                waiting.append(x)
                continue
            x.chosen, x.group, x.slack_s = (k, min(x.left, int(tau / x.times[k] + EPS))), g, math.inf
            out.append(x)
        for x in waiting:
            for k in sorted(x.times):
                if x.times[k] + x.warmup(k) > tau + EPS or k > room():
                    continue
                g = placer.place(k, self._warm_prefer(x, placer, k, x.prefer))
                if g is not None:
                    x.chosen, x.group, x.slack_s = (k, min(x.left, int(tau / x.times[k] + EPS))), g, math.inf
                    out.append(x)
                    break
        return out

    def _fill(self, items: list[_Item], live_ids: set[int], tau: float, fresh: bool) -> None:
        """Set every assignment's steps so that all end together, at the round end E.

        In gap mode E is the running round's end. In a fresh round E is chosen (when
        ``align_rounds``) among the ends of whole steps of the slow-step assignments between
        the longest single step and 1.5 tau, minimising idle GPU time (GPUs that finish early
        and wait for the round's last assignment) plus ``round_overhead_s`` per assignment,
        per second of round: a request stepping 0.22 s in a 0.58 s round would otherwise idle
        a quarter of it. A slower planned degree keeps its planned share of steps. A scale-up
        grant runs at most ``scale_up_commit_s`` when that is set (at least one step).
        """
        if not items:
            return
        rows = []
        for x in items:
            k = x.chosen[0]
            cap = x.left
            if id(x) in live_ids and x.plan and k != x.plan[-1][0]:
                planned = dict(x.plan).get(k)
                if planned is not None:
                    cap = min(cap, planned)
            rows.append((x, k, x.times[k], max(cap, x.chosen[1])))
        if not fresh:
            end = tau
        elif self.align_rounds:
            end = choose_round_end([(k, t, cap) for _, k, t, cap in rows], tau, self.align_max_frac,
                                   self.round_overhead_s)
        else:
            end = max(x.chosen[1] * x.times[x.chosen[0]] for x in items)
        commit = self.scale_up_commit_s
        for x, k, t, cap in rows:
            if x.scaled and commit > 0:
                cap = min(cap, max(1, int(commit / t + EPS)))
            w = x.group_warmup_s(x.group) if x.cold_s else 0.0  # a cold group's capture comes first
            x.chosen = (k, max(1, min(cap, int((end - w) / t + EPS) if w > 0 else int(end / t + EPS))))

    def _batch(self, live: list[_Item], cost: CostModel, now: float, n: int,
               pricing: WarmPricing | None = None) -> list[_Item]:
        """Pair identical small requests into one item when the pair meets both deadlines and saves GPU time."""
        groups: dict[tuple, list[_Item]] = {}
        for x in live:
            r = x.snaps[0].request
            if r.num_image_tokens <= self.batch_max_tokens:
                groups.setdefault(r.shape_key, []).append(x)
        if not any(len(g) > 1 for g in groups.values()):
            return live
        merged: set[int] = set()
        out_extra = []
        for key, xs in groups.items():
            if len(xs) < 2:
                continue
            xs = sorted(xs, key=lambda x: x.deadline)
            i = 0
            while i + 1 < len(xs):
                a, b = xs[i], xs[i + 1]
                pair = self._try_pair(a, b, cost, now, pricing)
                if pair is not None:
                    merged.update((id(a), id(b)))
                    out_extra.append(pair)
                    i += 2
                else:
                    i += 1
        return [x for x in live if id(x) not in merged] + out_extra

    def _try_pair(self, a: _Item, b: _Item, cost: CostModel, now: float,
                  pricing: WarmPricing | None = None) -> _Item | None:
        """The pair as one item, or None. Its plan keeps ``batch_margin_frac`` of the budget in
        reserve: a pair exists only when several identical requests are live at once (a burst), and
        a pair planned to end just at the earlier deadline loses both requests at the first delay."""
        r = a.snaps[0].request
        times = {k: cost.step_time_s(r.model, r.height, r.width, r.batch * 2, k) for k in a.times}
        left = max(a.left, b.left)
        deadline = min(a.deadline, b.deadline)
        budget = (deadline - now) * (1.0 - self.batch_margin_frac)
        probe = _Item(a.snaps + b.snaps, times, min(times.values()), min(a.left, b.left), deadline)
        if pricing is not None and pricing.active:
            self._price_warmup(probe, pricing, (r.model, r.height, r.width, r.batch * 2))
        alloc = (plan_allocation_warm(times, probe.warm_s, left, budget)
                 if probe.warm_s and self.warmup_allocation else plan_allocation(times, left, budget))
        if alloc is None:
            return None
        alone = (a.left * sum(k * a.times[k] * s for k, s in a.plan) / max(a.left, 1)
                 + b.left * sum(k * b.times[k] * s for k, s in b.plan) / max(b.left, 1))
        if alloc.gpu_time_s >= alone - EPS:
            return None
        item = probe
        item.plan = tuple((k, min(s, item.left)) for k, s in alloc.steps)
        item.slack_s = deadline - now - alloc.time_s
        item.work_s = alloc.gpu_time_s
        return item

    @staticmethod
    def _price_warmup(item: _Item, pricing: WarmPricing, shape: tuple) -> None:
        """Fill the item's warm-up fields (policy/warmup.py); left empty when every degree is warm."""
        cold = pricing.cold_s(shape, item.times)
        if not any(cold.values()):
            return
        item.cold_s = cold
        item.warm_groups = pricing.warm_groups(shape)
        warm_s = pricing.degree_warmup_s(shape, cold)
        item.warm_s = warm_s if any(warm_s.values()) else {}

    @staticmethod
    def _warm_prefer(x: _Item, placer: Placer, k: int, prefer: tuple[int, ...]) -> tuple[int, ...]:
        """The group to ask the placer for at degree ``k``: ``prefer`` when it is warm (or warm-up
        is not priced), else a free warm group of size k, the one overlapping ``prefer`` most."""
        if not x.cold_s or (len(prefer) == k and prefer in x.warm_groups):
            return prefer
        warm = [g for g in placer.free_groups(k) if g in x.warm_groups]
        if not warm:
            return prefer
        pset = set(prefer)
        return max(warm, key=lambda g: (len(pset.intersection(g)), -placer.pos[g[0]]))

    def _fallback(self, view: SchedulerView, cost: CostModel, items: list[_Item]) -> RoundPlan:
        """Never stall an idle engine: the oldest request gets one step on the largest free group."""
        placer = Placer(view, preserve=self.placement, fit=self.placement_fit)
        for x in sorted(items, key=lambda x: (x.snaps[0].request.arrival_at, x.snaps[0].request_id)):
            for k in sorted(x.times, reverse=True):
                g = placer.place(k, x.prefer)
                if g is not None:
                    return RoundPlan(view.round_index, x.times[k], (Assignment(x.ids, g, 1),), note="fallback")
        return RoundPlan(view.round_index, 0.0)


def make_tetriserve(**options) -> TetriServePolicy:
    return TetriServePolicy(**options)
