"""``comfy-tetriserve bench --sections multimodel``: three FLUX-size models on 8 simulated H200s.

Setup (every number here is the ``h200`` cost model's, modelled): three models ``flux-a/b/c`` of
FLUX.1-dev's architecture (priced by ``FlopScaledCostModel`` from the measured flux-dev rows, ratio
1), 23.8 GB of bf16 weights each (11.9 B parameters); a weights budget of 2.2 copies per device, so
two fit and the third does not; loads at 8 GB/s per device in the simulation (3.0 s) while the
planner starts from a 10 GB/s guess and corrects it from each load. Poisson arrivals with the
paper's uniform resolution mix and deadlines (``sweep_scale``), the model drawn 60/30/10 for the
first half of the requests and 10/30/60 for the second.

Policies: ``placement`` (TetriServe with loads and evictions, starting from the static partition),
``static`` (TetriServe on a fixed partition of the devices proportional to the first mix: 5/2/1,
never loading), ``everywhere`` (plain TetriServe with every model on every device: it needs three
copies per device, more than the budget, so it is reported with the memory it would need).
"""
from __future__ import annotations

import math
import random
import time
from typing import Any

from ..cost import FlopScaledCostModel, load_cost_model
from ..policy import make_policy
from ..policy.placement import ModelAffinePolicy
from ..types import PlacementView, RequestSnapshot, SchedulerView
from .multimodel import ModelBox, MultiModelSimulation, multimodel_trace, proportional_partition
from .simulator import SimConfig, simulate
from .workload import WorkloadSpec, make_random_view

MODELS = ("flux-a", "flux-b", "flux-c")
MIX_BEFORE = (0.6, 0.3, 0.1)
MIX_AFTER = (0.1, 0.3, 0.6)
MODEL_BYTES = 23_800_000_000  # FLUX.1-dev transformer, 11.9 B parameters in bf16
BUDGET_COPIES = 2.2
PLANNER_LOAD_BYTES_PER_S = 10e9
TRUE_LOAD_BYTES_PER_S = 8e9
POLICIES = ("placement", "static", "everywhere")


def multimodel_cost(profile: str) -> FlopScaledCostModel:
    base = load_cost_model(profile)
    cost = FlopScaledCostModel(base, base.model_profile)
    for m in MODELS:
        cost.add(m, "flux-dev", base.model_profile("flux-dev"))
    return cost


def box(num_gpus: int) -> ModelBox:
    return ModelBox(model_bytes={m: MODEL_BYTES for m in MODELS}, budget_bytes=int(BUDGET_COPIES * MODEL_BYTES),
                    load_bytes_per_s=PLANNER_LOAD_BYTES_PER_S, true_load_bytes_per_s=TRUE_LOAD_BYTES_PER_S,
                    placement=proportional_partition(MODELS, MIX_BEFORE, num_gpus))


def run_multimodel_task(args: tuple[str, WorkloadSpec, str, int]) -> dict[str, Any]:
    """One policy on one trace (runs in a worker process)."""
    policy, spec, profile, num_gpus = args
    cost = multimodel_cost(profile)
    trace = multimodel_trace(spec, MODELS, MIX_BEFORE, MIX_AFTER)
    half_at = trace[len(trace) // 2].arrival_at if trace else 0.0
    config = SimConfig(num_gpus=num_gpus)
    loads = evictions = 0
    load_s = 0.0
    if policy == "everywhere":
        res = simulate(trace, make_policy("tetriserve"), cost, config)
    else:
        inner = make_policy("tetriserve")
        pol = inner if policy == "placement" else ModelAffinePolicy(inner, replicate=False)
        sim = MultiModelSimulation(trace, pol, cost, box(num_gpus), config).run()
        res = sim.result()
        loads, evictions, load_s = sim.engine.num_loads, sim.engine.num_evictions, sim.engine.load_gpu_seconds
    after = [o for o in res.outcomes if o.request.arrival_at >= half_at]
    before = [o for o in res.outcomes if o.request.arrival_at < half_at]
    dec = sorted(res.decision_times_s)
    return {"sar": res.sar(), "sar_before_shift": res.sar(before), "sar_after_shift": res.sar(after),
            "loads": loads, "evictions": evictions, "load_s": load_s,
            "decision_p99_ms": 1e3 * dec[min(len(dec) - 1, int(0.99 * len(dec)))] if dec else 0.0}


def random_placement_view(num_active: int, seed: int, num_gpus: int, num_steps: int) -> SchedulerView:
    """A planner's-eye view of the multimodel box: requests of the three models, copies placed at
    random within the budget (two per device at most), one model often without a copy (so the plan
    loads), a load in flight on some views."""
    base = make_random_view(num_active, seed=seed, num_gpus=num_gpus, num_steps=num_steps)
    rng = random.Random(f"placement/{seed}/{num_active}")
    mix = MIX_BEFORE if seed % 2 else MIX_AFTER
    requests = []
    for s in base.requests:
        model = rng.choices(MODELS, weights=mix)[0]
        requests.append(RequestSnapshot(
            s.request.__class__(**{**s.request.__dict__, "model": model}), s.steps_done, s.gpu_ids,
            s.running_until_at, s.steps_in_flight))
    holding: dict[str, set[int]] = {m: set() for m in MODELS}
    for g in range(num_gpus):
        for m in rng.sample(MODELS, rng.choice((1, 2))):
            holding[m].add(g)
    if seed % 3 == 0:  # a model without a copy: the plan must load it
        gone = rng.choice(MODELS)
        holding[gone] = set()
    for r in requests:  # a running request runs where its model is
        if r.is_running:
            for g in r.gpu_ids:
                holding[r.request.model].add(g)
    budget = int(BUDGET_COPIES * MODEL_BYTES)
    used = {g: sum(MODEL_BYTES for m in MODELS if g in holding[m]) for g in range(num_gpus)}
    placement = PlacementView(
        holding={m: frozenset(g) for m, g in holding.items() if g}, loading={},
        free_bytes={g: budget - used[g] for g in range(num_gpus)}, model_bytes={m: MODEL_BYTES for m in MODELS},
        load_s={m: MODEL_BYTES / PLANNER_LOAD_BYTES_PER_S for m in MODELS},
        recent_share=dict(zip(MODELS, mix)))
    return SchedulerView(now=base.now, round_index=0, gpu_ids=base.gpu_ids, groups=base.groups,
                         requests=tuple(requests), busy_gpu_ids=base.busy_gpu_ids, placement=placement)


def decision_timing(profile: str, num_active: int, samples: int, num_gpus: int, num_steps: int) -> dict[str, Any]:
    """TetriServe with placement on random multimodel views: p50/p99 ms (best of 3 per view), and
    how many plans had loads and evictions. Every plan is validated. ``plain_p50``/``plain_p99``:
    plain TetriServe on the same views without placement (every model everywhere), timed
    alternately with it, so the overhead of the placement stage is a same-machine, same-time ratio."""
    import dataclasses
    from ..plan import validate_plan

    cost = multimodel_cost(profile)
    policy = make_policy("tetriserve")
    views = [random_placement_view(num_active, i, num_gpus, num_steps) for i in range(samples)]
    times, plain, with_loads, with_evictions = [], [], 0, 0
    for v in views:
        bare = dataclasses.replace(v, placement=None)
        best = best_plain = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            plan = policy.plan_round(v, cost)
            t1 = time.perf_counter()
            policy.plan_round(bare, cost)
            t2 = time.perf_counter()
            best, best_plain = min(best, t1 - t0), min(best_plain, t2 - t1)
        validate_plan(v, plan, cost.allowed_degrees)
        with_loads += bool(plan.loads)
        with_evictions += bool(plan.evictions)
        times.append(best)
        plain.append(best_plain)
    times.sort()
    plain.sort()
    p99 = min(len(times) - 1, int(0.99 * len(times)))
    return {"p50": 1e3 * times[len(times) // 2], "p99": 1e3 * times[p99],
            "plain_p50": 1e3 * plain[len(plain) // 2], "plain_p99": 1e3 * plain[p99],
            "samples": len(times), "plans_with_loads": with_loads, "plans_with_evictions": with_evictions}
