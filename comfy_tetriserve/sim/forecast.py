"""Predicted finish times: the view's requests played forward on a virtual clock, no new arrivals.

The service asks this at submit time ("when will it finish, can it meet its deadline?"): it puts
the new request into the view and reads the forecast. The loop is the engine's bookkeeping in
miniature (running assignments end at ``running_until_at`` with their ``steps_in_flight``; the
policy plans whenever GPUs are free and work waits; each new assignment lasts its steps times
the cost model's step time) and it validates every plan like the engine does. It assumes the
cost model is right and no request is cancelled; it is a forecast, not a promise. When the view has
warm keys (core/warmup.py), an assignment at a key cold on its group also takes ``warmup_time_s``
and the key is warm from then on (no eviction within the forecast).
"""
from __future__ import annotations

import dataclasses
import heapq
import math

from ..cost import CostModel, warmup_time_s
from ..plan import validate_plan
from ..types import RequestSnapshot, SchedulerView


def forecast_finish(view: SchedulerView, policy, cost: CostModel, *, max_plans: int = 100_000,
                    horizon_s: float = math.inf, exact: bool = False) -> dict[str, float]:
    """Absolute predicted finish time of every request in ``view`` (same clock as ``view.now``).

    Requests still unfinished ``horizon_s`` after ``view.now`` (or after ``max_plans`` planning
    rounds) are reported as ``inf``. Unless ``exact``, a policy's ``for_forecast()`` variant plans
    (if it has one): TetriServe cuts work that has no deadline left to meet into short pieces so
    that arrivals find GPUs quickly; with no arrivals to come it may use long pieces, which
    changes nothing for requests that can still meet their deadline and saves most rounds.
    """
    if not exact and hasattr(policy, "for_forecast"):
        policy = policy.for_forecast()
    now = view.now
    snaps: dict[str, RequestSnapshot] = {s.request_id: s for s in view.requests}
    finish: dict[str, float] = {}
    ends: list[tuple[float, int, tuple[str, ...], tuple[int, ...], int]] = []
    busy: dict[int, tuple[str, ...]] = {}
    seq = 0
    for s in view.requests:
        if s.running_until_at is not None:
            key = (s.request_id,)
            heapq.heappush(ends, (max(s.running_until_at, now), seq, key, s.gpu_ids, s.steps_in_flight))
            seq += 1
            for g in s.gpu_ids:
                busy[g] = key
    held: list[tuple[float, RequestSnapshot]] = []  # requests waiting for their model's load
    p = view.placement
    if p is not None:  # models as a resource: loads in flight keep devices busy; a model without a copy loads first
        for g, (_, end_at) in p.loading.items():
            heapq.heappush(ends, (max(end_at, now), seq, (), (g,), 0))
            seq += 1
            busy[g] = ()
        ready_at = {m: min(e for g, (mm, e) in p.loading.items() if mm == m)
                    for m in {mm for mm, _ in p.loading.values()}}
        for rid, s in list(snaps.items()):
            m = s.request.model
            if s.running_until_at is None and not p.holding.get(m):
                at = max(ready_at.get(m, now + p.load_s.get(m, 0.0)), now)
                held.append((at, s))
                del snaps[rid]
                heapq.heappush(ends, (at, seq, (), (), 0))
                seq += 1
    round_index = view.round_index
    stop_at = now + horizon_s
    warm = view.warm
    for _ in range(max_plans):
        v = SchedulerView(now=now, round_index=round_index, gpu_ids=view.gpu_ids, groups=view.groups,
                          requests=tuple(snaps.values()), busy_gpu_ids=frozenset(busy), warm=warm)
        if v.free_gpu_ids and v.plannable:
            plan = policy.plan_round(v, cost)
            validate_plan(v, plan, cost.allowed_degrees)
            if plan.assignments:
                round_index += 1
            for a in plan.assignments:
                r = snaps[a.request_ids[0]].request
                batch = r.batch * len(a.request_ids)
                dur = a.num_steps * cost.step_time_s(r.model, r.height, r.width, batch, a.sp_degree)
                key = (a.gpu_ids, r.model, r.height, r.width, batch)
                if warm is not None and key not in warm:  # the first step at a cold key captures it
                    dur += warmup_time_s(cost, r.model, r.height, r.width, batch, a.sp_degree)
                    warm = warm | {key}
                heapq.heappush(ends, (now + dur, seq, a.request_ids, a.gpu_ids, a.num_steps))
                seq += 1
                for g in a.gpu_ids:
                    busy[g] = a.request_ids
                for rid in a.request_ids:
                    snaps[rid] = dataclasses.replace(snaps[rid], gpu_ids=a.gpu_ids, running_until_at=now + dur,
                                                     steps_in_flight=a.num_steps)
        if not ends:
            break
        now = ends[0][0]
        if now > stop_at:
            break
        while ends and ends[0][0] <= now:
            end_at, _, rids, gpus, steps = heapq.heappop(ends)
            for g in gpus:
                busy.pop(g, None)
            for at, s in [h for h in held if h[0] <= now]:
                held.remove((at, s))
                snaps[s.request_id] = s
            for rid in rids:
                s = snaps[rid]
                done = min(s.steps_done + steps, s.request.num_steps)
                if done >= s.request.num_steps:
                    finish[rid] = end_at
                    del snaps[rid]
                else:
                    snaps[rid] = dataclasses.replace(s, steps_done=done, running_until_at=None, steps_in_flight=0)
    for rid in snaps:
        finish.setdefault(rid, math.inf)
    return {s.request_id: finish.get(s.request_id, math.inf) for s in view.requests}
