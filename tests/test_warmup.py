"""Warm-up priced: warm keys tracked per device, charged once per key and group by the simulated
engines, priced by the engine's predictions and the planner, free when ``capture_steps`` is 0."""
from __future__ import annotations

import asyncio
import dataclasses
import random
import time

import pytest
import torch

from comfy_tetriserve.core.engine import Engine
from comfy_tetriserve.core.executor import SamplingJob, WarmKeysReporter, warm_keys_source
from comfy_tetriserve.core.sim_executor import SimulatedExecutor
from comfy_tetriserve.core.warmup import WarmTracker, cold_warmup_s, warm_key
from comfy_tetriserve.cost import load_cost_model, warmup_time_s
from comfy_tetriserve.policy import make_policy
from comfy_tetriserve.policy.common import plan_allocation
from comfy_tetriserve.policy.warmup import WarmPricing, plan_allocation_warm
from comfy_tetriserve.sim.simulator import SimConfig, Simulation, simulate
from comfy_tetriserve.sim.warmup_bench import with_capture_steps
from comfy_tetriserve.types import Assignment, GenRequest
from factories import PowerLawCost, make_request, make_view


@dataclasses.dataclass(frozen=True)
class CapturedCost(PowerLawCost):
    """PowerLawCost whose first step at a new shape costs ``capture_steps`` extra steps."""

    capture_steps: float = 5.0


def test_tracker_keys_are_warm_on_whole_groups_with_an_lru_per_device():
    t = WarmTracker(max_keys_per_device=2)
    a = warm_key((1, 0), "m", 512, 512, 1)
    assert a == ((0, 1), "m", 512, 512, 1)
    assert t.use(a) is False and t.use(a) is True and t.num_captures == 1
    assert t.keys() == {a}
    assert not t.is_warm(warm_key((0, 1, 2, 3), "m", 512, 512, 1))  # devices 2, 3 never ran it
    b, c = warm_key((0,), "m", 256, 256, 1), warm_key((0,), "m", 1024, 1024, 1)
    t.use(b)
    t.use(c)  # device 0 holds 2 keys: a (least recently used) goes there, so a is cold on (0, 1)
    assert not t.is_warm(a) and t.keys() == {b, c}
    t.use(a)  # recaptured: b goes out of device 0
    assert t.keys() == {a, c} and t.num_captures == 4
    t.set_device(1, [])  # device 1 reports it holds nothing
    assert t.keys() == {c}
    t.forget_device(0)
    assert t.keys() == frozenset()


def test_cold_warmup_is_zero_without_capture_steps_or_warm_keys():
    cost = CapturedCost(capture_steps=4.0)
    step = cost.step_time_s("m", 512, 512, 1, 2)
    assert cold_warmup_s(cost, frozenset(), (0, 1), "m", 512, 512, 1) == pytest.approx(4.0 * step)
    assert cold_warmup_s(cost, frozenset({((0, 1), "m", 512, 512, 1)}), (1, 0), "m", 512, 512, 1) == 0.0
    assert cold_warmup_s(cost, None, (0, 1), "m", 512, 512, 1) == 0.0  # the executor reports nothing
    assert cold_warmup_s(PowerLawCost(), frozenset(), (0, 1), "m", 512, 512, 1) == 0.0  # eager: no capture


def test_engine_prediction_adds_the_warmup_of_a_cold_key_only():
    cost = CapturedCost(capture_steps=6.0)
    warm: set = set()
    engine = Engine(make_policy("tetriserve"), cost, range(4), warm_keys=lambda: frozenset(warm))
    r = make_request(request_id="a", res=512)
    engine.submit(r)
    a = Assignment(("a",), (0, 1), 10)
    step = cost.step_time_s("flux-dev", 512, 512, 1, 2)
    assert engine.predict_s(a) == pytest.approx(10 * step + 6.0 * step)  # cold: steps + capture
    assert engine.view(0.0).warm == frozenset()
    warm.add(((0, 1), "flux-dev", 512, 512, 1))
    assert engine.predict_s(a) == pytest.approx(10 * step)
    assert engine.view(0.0).warm == frozenset(warm)
    assert Engine(make_policy("tetriserve"), cost, range(4)).view(0.0).warm is None


def _trace(*shapes: tuple[int, float]) -> list[GenRequest]:
    """One request per (resolution, arrival), 20 steps, generous deadlines."""
    return [make_request(request_id=f"r{i}", res=res, num_steps=20, arrival_at=at, deadline_s=100.0)
            for i, (res, at) in enumerate(shapes)]


def test_simulator_charges_the_capture_once_per_key_and_group():
    cost = CapturedCost(capture_steps=10.0)
    config = SimConfig(num_gpus=8, dispatch_overhead_s=0.0)
    # sp8 runs each request in one assignment on all 8 GPUs, one after the other
    trace = _trace((512, 0.0), (512, 10.0), (1024, 20.0), (512, 30.0))
    res = simulate(trace, make_policy("sp8"), cost, config)
    t512, t1024 = (cost.step_time_s("flux-dev", r, r, 1, 8) for r in (512, 1024))
    took = {o.request.request_id: o.finished_at - o.first_step_at for o in res.outcomes}
    assert took["r0"] == pytest.approx(20 * t512 + 10 * t512)  # cold: the capture is paid
    assert took["r1"] == pytest.approx(20 * t512)  # warm on the same group
    assert took["r2"] == pytest.approx(20 * t1024 + 10 * t1024)  # a new shape pays again
    assert took["r3"] == pytest.approx(20 * t512)
    assert 10 * t512 > 100 * 1e-9  # the charge is far above the tolerance
    # no capture cost: every request takes its steps only, and nothing is tracked
    sim = Simulation(trace, make_policy("sp8"), PowerLawCost(), config).run()
    assert sim.warm is None
    assert all(o.finished_at - o.first_step_at == pytest.approx(20 * cost.step_time_s("flux-dev", o.request.height,
               o.request.height, 1, 8)) for o in sim.result().outcomes)


def test_capture_steps_zero_leaves_simulations_unchanged():
    h200 = load_cost_model("h200")
    from comfy_tetriserve.sim.workload import WorkloadSpec, make_trace

    trace = make_trace(WorkloadSpec(num_requests=40, rate_per_min=12.0, num_steps=50, model="flux-dev",
                                    mix="skewed", slo_scale=1.2, seed=3))

    def summary(cost, true_cost=None):
        res = simulate(trace, make_policy("tetriserve"), cost, SimConfig(), true_cost=true_cost)
        return [(o.request.request_id, o.status, o.finished_at) for o in res.outcomes], res.num_assignments

    plain = summary(h200)
    assert summary(with_capture_steps(h200, 0.0)) == plain  # same numbers, bit for bit
    charged = with_capture_steps(h200, 10.0)
    changed = summary(charged, charged)
    moved = [abs(a[2] - b[2]) for a, b in zip(plain[0], changed[0])]
    assert max(moved) > 0.1  # a real capture cost moves finish times by far more than any tolerance


def test_planner_feasibility_sees_the_warmup():
    cost = CapturedCost(capture_steps=20.0)
    t8 = cost.step_time_s("flux-dev", 1024, 1024, 1, 8)
    r = make_request(request_id="a", res=1024, num_steps=50, deadline_s=50 * t8 + 10 * t8)  # fits warm, not cold
    view = make_view([r])
    all_warm = frozenset((g, "flux-dev", 1024, 1024, 1) for g in view.groups)
    policy = make_policy("tetriserve")
    warm_plan = policy.plan_round(dataclasses.replace(view, warm=all_warm), cost)
    cold_plan = policy.plan_round(dataclasses.replace(view, warm=frozenset()), cost)
    unknown_plan = policy.plan_round(view, cost)  # warm None: nothing priced
    assert "admitted=1" in warm_plan.note and "admitted=1" in unknown_plan.note
    # 20 cold steps of capture make its deadline infeasible: late, and no late piece fits a round with a
    # capture that long, so only the never-stall fallback's single step runs
    assert "admitted=1" not in cold_plan.note and cold_plan.assignments[0].num_steps == 1
    # a deadline that fits the capture too: live either way, and a cold group's capture comes out of the round
    r2 = dataclasses.replace(r, deadline_at=r.arrival_at + 80 * t8)
    view2 = make_view([r2])
    warm2 = policy.plan_round(dataclasses.replace(view2, warm=all_warm), cost)
    cold2 = policy.plan_round(dataclasses.replace(view2, warm=frozenset()), cost)
    assert "admitted=1" in warm2.note and "admitted=1" in cold2.note
    assert cold2.assignments[0].num_steps < warm2.assignments[0].num_steps


def test_warm_allocation_prefers_a_warm_degree_when_the_capture_eats_the_gain():
    times = {1: 0.1, 2: 0.055, 4: 0.03}
    plain = plan_allocation(times, 10, 0.9)
    assert 2 in plain.degrees  # needs degree 2 for part of the steps
    cold2 = plan_allocation_warm(times, {1: 0.0, 2: 0.5, 4: 0.0}, 10, 0.9)
    assert cold2 is not None and 2 not in cold2.degrees and 4 in cold2.degrees  # warm 4 instead of cold 2
    assert cold2.time_s <= 0.9 + 1e-9
    assert plan_allocation_warm(times, {1: 0.0, 2: 0.7, 4: 0.7}, 10, 0.9) is None  # none fits
    rng = random.Random(0)
    for _ in range(300):  # without warm-up it is the plain allocation
        times = {k: 0.1 / k ** rng.uniform(0.3, 1.0) for k in (1, 2, 4, 8)}
        steps, budget = rng.randint(1, 50), rng.uniform(0.1, 5.0)
        a, b = plan_allocation(times, steps, budget), plan_allocation_warm(times, {}, steps, budget)
        assert (a is None) == (b is None)
        if a is not None:
            assert b.gpu_time_s == pytest.approx(a.gpu_time_s, rel=1e-9) and b.time_s <= budget + 1e-9


def test_pricing_is_inactive_without_capture_or_warm_keys():
    view = make_view([make_request(res=512)])
    assert not WarmPricing(view, CapturedCost()).active  # the view has no warm keys
    assert not WarmPricing(dataclasses.replace(view, warm=frozenset()), PowerLawCost()).active
    p = WarmPricing(dataclasses.replace(view, warm=frozenset({((0, 1), "flux-dev", 512, 512, 1)})), CapturedCost())
    assert p.active and p.warm_groups(("flux-dev", 512, 512, 1)) == {(0, 1)}


def _job(rid: str, res: int = 512, steps: int = 4) -> SamplingJob:
    latent = torch.zeros(1, 16, res // 8, res // 8)
    return SamplingJob(request_id=rid, model="m", latent=latent, noise=torch.zeros_like(latent),
                       sigmas=torch.linspace(1, 0, steps + 1), context=torch.zeros(1, 4, 4096),
                       pooled=torch.zeros(1, 768))


def test_simulated_executor_reports_warm_keys_and_charges_the_first_step():
    cost = CapturedCost(base_s=0.02, capture_steps=10.0)  # 512 px on 2 devices: 2.9 ms a step, 29 ms capture

    async def body():
        ex = SimulatedExecutor(4, cost)
        assert isinstance(ex, WarmKeysReporter) and warm_keys_source(ex) == ex.warm_keys
        await ex.load_model("m", "sim:flux")
        await ex.admit(_job("a", steps=8))
        a = Assignment(("a",), (0, 1), 4)
        w = warmup_time_s(cost, "m", 512, 512, 1, 2)
        assert ex.warm_keys() == frozenset() and ex.warmup_s(a) == pytest.approx(w)
        t0 = time.monotonic()
        res = await ex.execute(a)
        assert time.monotonic() - t0 >= w + 4 * cost.step_time_s("m", 512, 512, 1, 2) - 0.002
        assert res.step_times_s[0] >= w - 0.002  # the first step carries the capture
        assert ex.warm_keys() == {((0, 1), "m", 512, 512, 1)} and ex.warmup_s(a) == 0.0
        assert ex.warmup_s(Assignment(("a",), (2, 3), 4)) == pytest.approx(w)  # another group is cold
        ex.fail_device(3)
        await ex.restart()
        assert ex.warm_keys() == frozenset()  # new workers hold no graph
        assert SimulatedExecutor(2, PowerLawCost()).warm_keys() is None  # no capture cost: nothing to report

    asyncio.run(body())


def test_workers_report_their_graphs_as_warm_keys_and_the_pool_combines_them():
    from test_graphs import _FakeCuda, inputs

    from comfy_tetriserve.worker.models import LoadedModel
    from comfy_tetriserve.worker.pool import WorkerPool
    from comfy_tetriserve.worker.tiny import TINY_CONFIGS, random_model

    config = dict(TINY_CONFIGS["flux"])
    model = LoadedModel(name="tiny-flux", family="flux", config=config, module=random_model(config, seed=1),
                        dtype=torch.float32, device=torch.device("cpu"), source="random:tiny-flux")
    fwd = _FakeCuda()
    assert fwd.version == 0 and fwd.warm_keys(3) == ()
    with torch.no_grad():
        fwd(model, **inputs(b=2, h=8, w=10))
    assert fwd.version == 1
    assert fwd.warm_keys(3) == (((3,), "tiny-flux", 64, 80, 2),)  # one device: its own id; latent x 8 = pixels

    pool = WorkerPool(["cuda:0", "cuda:1"], cuda_graphs=True)  # never started: only its bookkeeping runs
    key = ((0, 1), "tiny-flux", 64, 80, 2)
    assert pool.warm_keys() == frozenset()
    pool._on_message(0, ("done", 1, 0, 1, (), None, None, {"warm_keys": (key,)}))
    assert pool.warm_keys() == frozenset()  # rank 1 has not captured it yet
    pool._on_message(1, ("done", 1, 1, 1, (), None, None, {"warm_keys": (key, ((1,), "tiny-flux", 64, 64, 1))}))
    assert pool.warm_keys() == {key, ((1,), "tiny-flux", 64, 64, 1)}
    pool._on_message(1, ("done", 2, 1, 1, (), None, None, {}))  # no captures since: nothing changes
    assert key in pool.warm_keys()
    assert WorkerPool("cpu:2", cuda_graphs=True).warm_keys() is None  # CPU workers capture nothing
    assert WorkerPool(["cuda:0"]).warm_keys() is None  # graphs off


def test_the_pricing_planner_beats_the_ignoring_one_when_captures_are_large():
    """30 requests (skewed mix, SLO scale 1.5) on 8 simulated H200s whose first step at a new shape
    costs 30 step times more (an assumption, modelled): both engines charge it, only one planner sees it."""
    from comfy_tetriserve.sim.warmup_bench import run_case

    case = ("h200", "{}", 30.0, "skewed", 1.5, 0, 30, 12.0, 8)
    priced, ignored, free = (run_case((case[0], v, *case[2:])) for v in ("priced", "ignored", "no capture"))
    assert priced > ignored + 3.5 / 30  # 4 more of the 30 deadlines met (0.700 vs 0.567)
    assert free >= priced  # capture costs something even when priced
    # pricing in the allocation too (an option, measured worse on the long traces) still runs
    assert 0.0 < run_case(("h200", "priced", *case[2:], (("warmup_allocation", True),))) <= 1.0


def test_forecast_counts_a_cold_keys_capture_once():
    from comfy_tetriserve.sim.forecast import forecast_finish

    cost = CapturedCost(capture_steps=10.0)
    a = make_request(request_id="a", res=512, num_steps=20, deadline_s=100.0)
    b = make_request(request_id="b", res=512, num_steps=20, deadline_s=200.0)
    view = make_view([a, b], num_gpus=1)  # one device: b runs after a on the same group
    t = cost.step_time_s("flux-dev", 512, 512, 1, 1)
    plain = forecast_finish(view, make_policy("sp1"), cost)
    cold = forecast_finish(dataclasses.replace(view, warm=frozenset()), make_policy("sp1"), cost)
    assert plain == {"a": pytest.approx(20 * t), "b": pytest.approx(40 * t)}  # nothing known: nothing priced
    assert cold == {"a": pytest.approx(30 * t), "b": pytest.approx(50 * t)}  # one capture, before a's steps


def test_the_service_wires_the_executors_warm_keys_into_its_engine():
    from service_helpers import make_service_app

    from comfy_tetriserve.service.app import SERVICE

    cost = CapturedCost(base_s=0.02, capture_steps=7.0)
    app, executor = make_service_app(cost=cost)
    svc = app[SERVICE]
    assert svc.engine.warm_keys == executor.warm_keys and svc.engine.view(0.0).warm == frozenset()
    assert svc.cost.capture_steps == 7.0 and svc.cost.uncorrected().capture_steps == 7.0  # wrappers forward it
    app, _ = make_service_app()  # no capture cost: the simulated executor reports nothing, nothing is priced
    assert app[SERVICE].engine.view(0.0).warm is None
