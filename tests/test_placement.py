"""Models as a plan dimension: validation, the placement stage, the engine and simulator with loads."""
from __future__ import annotations

import dataclasses

import pytest

from comfy_tetriserve.core.placement_engine import PlacementEngine
from comfy_tetriserve.core.residency import LoadTimeModel
from comfy_tetriserve.errors import PlanError
from comfy_tetriserve.plan import validate_plan
from comfy_tetriserve.policy import make_policy
from comfy_tetriserve.policy.placement import ModelAffinePolicy
from comfy_tetriserve.sim import multimodel_bench as mm
from comfy_tetriserve.sim.multimodel import ModelBox, MultiModelSimulation, proportional_partition
from comfy_tetriserve.sim.simulator import SimConfig
from comfy_tetriserve.sim.workload import WorkloadSpec
from comfy_tetriserve.types import Assignment, ModelEviction, ModelLoad, PlacementView, RequestSnapshot, RoundPlan

from factories import make_request, make_view

GB = 1_000_000_000
COST = mm.multimodel_cost("h200")


def placed(view, holding, *, free=None, pinned=(), loading=None, budget=50 * GB, size=24 * GB):
    free = free if free is not None else {
        g: budget - size * sum(g in gs for gs in holding.values()) for g in view.gpu_ids}
    p = PlacementView(holding={m: frozenset(g) for m, g in holding.items()}, loading=loading or {},
                      free_bytes=free, model_bytes={m: size for m in mm.MODELS},
                      load_s={m: 3.0 for m in mm.MODELS}, pinned=frozenset(pinned))
    return dataclasses.replace(view, placement=p)


def test_validate_placement_catches_every_kind_of_mistake():
    a = make_request(request_id="a", model="flux-a", res=512)
    view = placed(make_view([a], num_gpus=4), {"flux-a": (0, 1), "flux-b": (1, 2, 3)}, pinned=("flux-b",))
    ok = RoundPlan(0, 0.0, (Assignment(("a",), (0, 1), 5),))
    validate_plan(view, ok, COST.allowed_degrees)
    bad = {
        "do not hold it": RoundPlan(0, 0.0, (Assignment(("a",), (2, 3), 5),)),
        "pinned": RoundPlan(0, 0.0, evictions=(ModelEviction("flux-b", (2,)),)),
        "does not hold it": RoundPlan(0, 0.0, (Assignment(("a",), (0, 1), 5),), evictions=(ModelEviction("flux-a", (2,)),)),
        "booked twice": RoundPlan(0, 0.0, (Assignment(("a",), (0, 1), 5),), loads=(ModelLoad("flux-c", (0, 1), 3.0),)),
        "do not fit": RoundPlan(0, 0.0, (Assignment(("a",), (0,), 5),), loads=(ModelLoad("flux-c", (1,), 3.0),)),
        "holds it already": RoundPlan(0, 0.0, (Assignment(("a",), (0,), 5),), loads=(ModelLoad("flux-a", (1,), 3.0),)),
    }
    for why, plan in bad.items():
        with pytest.raises(PlanError, match=why):
            validate_plan(view, plan, COST.allowed_degrees)
            print("not caught:", why)
    # an eviction in the same plan makes room for the load
    fits = RoundPlan(0, 0.0, (Assignment(("a",), (0, 1), 5),), evictions=(ModelEviction("flux-a", (2,)),))
    with pytest.raises(PlanError, match="does not hold"):
        validate_plan(view, fits, COST.allowed_degrees)
    view2 = placed(make_view([a], num_gpus=4), {"flux-a": (0, 1, 2), "flux-b": (2, 3)})
    validate_plan(view2, RoundPlan(0, 0.0, (Assignment(("a",), (0, 1), 5),), evictions=(ModelEviction("flux-a", (2,)),),
                                   loads=(ModelLoad("flux-c", (2,), 3.0),)), COST.allowed_degrees)
    # an eviction of a model in use there
    running = RequestSnapshot(make_request(request_id="r", model="flux-b"), 3, gpu_ids=(2, 3), running_until_at=1.0)
    view3 = placed(make_view([a, running], num_gpus=4, busy=(2, 3)), {"flux-a": (0, 1), "flux-b": (2, 3)})
    with pytest.raises(PlanError, match="while an assignment uses it"):
        validate_plan(view3, RoundPlan(0, 0.0, (Assignment(("a",), (0, 1), 5),),
                                       evictions=(ModelEviction("flux-b", (3,)),)), COST.allowed_degrees)
    # no placement in the view: a plan that places models is refused
    with pytest.raises(PlanError, match="does not place"):
        validate_plan(make_view([a], num_gpus=4), RoundPlan(0, 0.0, (Assignment(("a",), (0, 1), 5),),
                                                            loads=(ModelLoad("flux-c", (2,), 3.0),)), COST.allowed_degrees)


def test_placement_stage_loads_a_missing_model_evicting_the_cheapest_copy_and_never_a_pinned_one():
    # flux-c has waiting work and no copy; every device is full (two models each)
    reqs = [make_request(request_id=f"c{i}", model="flux-c", res=1024) for i in range(4)]
    reqs += [make_request(request_id="a0", model="flux-a", res=512)]
    view = placed(make_view(reqs, num_gpus=8), {"flux-a": range(8), "flux-b": range(8)}, pinned=("flux-a",))
    plan = make_policy("tetriserve").plan_round(view, COST)
    validate_plan(view, plan, COST.allowed_degrees)
    assert plan.loads and all(ld.model == "flux-c" for ld in plan.loads)
    loaded = {g for ld in plan.loads for g in ld.gpu_ids}
    assert {e.model for e in plan.evictions} == {"flux-b"}  # flux-b has no demand; flux-a is pinned
    assert {g for e in plan.evictions for g in e.gpu_ids} == loaded
    assert plan.loads[0].duration_s == pytest.approx(3.0)
    # flux-a's request runs meanwhile on devices that hold it and are not loading
    assert [a.request_ids for a in plan.assignments] == [("a0",)]
    assert loaded.isdisjoint(plan.assignments[0].gpu_ids)


def test_static_placement_never_loads_and_runs_only_where_models_are():
    reqs = [make_request(request_id=f"c{i}", model="flux-c") for i in range(3)]
    view = placed(make_view(reqs, num_gpus=8), {"flux-a": range(5), "flux-b": (5, 6), "flux-c": (7,)})
    plan = ModelAffinePolicy(make_policy("tetriserve"), replicate=False).plan_round(view, COST)
    validate_plan(view, plan, COST.allowed_degrees)
    assert not plan.loads and not plan.evictions
    assert {g for a in plan.assignments for g in a.gpu_ids} == {7}


def small_box(placement, true_bw=8e9, planner_bw=10e9):
    return ModelBox(model_bytes={m: 24 * GB for m in mm.MODELS}, budget_bytes=50 * GB, load_bytes_per_s=planner_bw,
                    true_load_bytes_per_s=true_bw, placement=placement)


def test_a_job_waits_for_its_load_and_a_load_never_delays_other_models():
    """4 GPUs: flux-a on 0-3 runs a job; flux-c (no copy) arrives: it is loaded on free devices and its
    job starts when the load ends; flux-a's second job starts at once on the devices not loading."""
    a1 = make_request(request_id="a1", model="flux-a", res=512, num_steps=20, deadline_s=None)
    c1 = make_request(request_id="c1", model="flux-c", res=512, num_steps=20, deadline_s=None, arrival_at=0.001)
    a2 = make_request(request_id="a2", model="flux-a", res=512, num_steps=20, deadline_s=None, arrival_at=0.002)
    box = small_box({"flux-a": (0, 1, 2, 3), "flux-b": (0, 1, 2, 3)})
    sim = MultiModelSimulation([a1, c1, a2], make_policy("tetriserve"), COST, box, SimConfig(num_gpus=4)).run()
    eng = sim.engine
    states = {s.request_id: s for s in eng.states()}
    assert all(s.status.value == "finished" for s in states.values())
    loads = list(eng.load_records)
    assert loads and {ld.model for ld in loads} == {"flux-c"}
    first = min(loads, key=lambda ld: ld.finished_at)
    # 24 GB at the true 8 GB/s: 3.0 s; the planner first guessed 10 GB/s (2.4 s) and learnt from the loads
    assert first.finished_at == pytest.approx(first.started_at + 3.0)
    assert first.expected_end_at == pytest.approx(first.started_at + 2.4)
    assert eng.load_time.bytes_per_s == pytest.approx(8e9)
    # c1 starts only once a copy of its model is there, on devices whose load ended
    assert states["c1"].first_step_at >= first.finished_at - 1e-9
    c1_runs = [r for r in eng.records() if r.request_ids == ("c1",)]
    for run in c1_runs:
        assert all(any(ld.finished_at <= run.started_at + 1e-9 and g in ld.gpu_ids for ld in loads)
                   for g in run.gpu_ids)
    # a2 (another model) starts beside the first load, on other devices, without waiting for it
    a2_first = next(r for r in eng.records() if r.request_ids == ("a2",))
    assert a2_first.started_at == pytest.approx(first.started_at) and a2_first.started_at < first.finished_at
    assert set(a2_first.gpu_ids).isdisjoint(first.gpu_ids)
    assert eng.num_loads == sum(len(ld.gpu_ids) for ld in loads)
    assert eng.load_gpu_seconds == pytest.approx(3.0 * eng.num_loads)
    assert eng.num_evictions == eng.num_loads  # two copies per device: flux-b (idle) made room each time


def test_load_time_model_corrects_online():
    lt = LoadTimeModel(10e9)
    assert lt.predict_s(20 * GB) == pytest.approx(2.0)
    lt.observe(20 * GB, 4.0)
    assert lt.predict_s(20 * GB) == pytest.approx(4.0)
    lt.observe(20 * GB, 400.0)  # one stalled read is clipped
    assert lt.predict_s(20 * GB) < 6.0


def test_proportional_partition():
    assert proportional_partition(mm.MODELS, (0.6, 0.3, 0.1), 8) == {
        "flux-a": (0, 1, 2, 3, 4), "flux-b": (5, 6), "flux-c": (7,)}
    assert proportional_partition(mm.MODELS, (0.98, 0.01, 0.01), 4) == {
        "flux-a": (0, 1), "flux-b": (2,), "flux-c": (3,)}


def test_multimodel_placement_beats_the_static_partition_after_the_shift():
    """The bench's setting on a 120-request trace: placement >= static + 0.10 SAR after the shift."""
    spec = WorkloadSpec(num_requests=120, rate_per_min=12.0, slo_scale=1.2, seed=0)
    out = {p: mm.run_multimodel_task((p, spec, "h200", 8)) for p in ("placement", "static")}
    assert out["placement"]["sar_after_shift"] >= out["static"]["sar_after_shift"] + 0.10, out
    assert out["placement"]["loads"] > 0 and out["placement"]["evictions"] > 0
    assert out["static"]["loads"] == 0 and out["placement"]["load_s"] > 0


def test_decision_time_with_loads_at_64_active_requests():
    d = mm.decision_timing("h200", 64, 40, 8, 50)
    assert d["plans_with_loads"] > 0 and d["plans_with_evictions"] > 0
    assert d["p99"] < 5.0  # generous on a shared 2-core machine; the bench reports the real figure


def test_every_model_everywhere_plans_exactly_the_plain_round():
    """The placement stage changes nothing when nothing needs placing (the common single-box case)."""
    for i in range(30):
        v = mm.random_placement_view(32, i, 8, 50)
        everywhere = dataclasses.replace(v.placement, holding={m: frozenset(range(8)) for m in mm.MODELS},
                                         free_bytes={g: 0 for g in range(8)})
        placed_plan = make_policy("tetriserve").plan_round(dataclasses.replace(v, placement=everywhere), COST)
        plain = make_policy("tetriserve").plan_round(dataclasses.replace(v, placement=None), COST)
        assert placed_plan.assignments == plain.assignments and not placed_plan.loads and not placed_plan.evictions
        assert placed_plan.assignments or not v.plannable


def test_forecast_includes_the_load_of_a_missing_model_and_devices_busy_loading():
    from comfy_tetriserve.sim.forecast import forecast_finish

    c = make_request(request_id="c", model="flux-c", res=512, num_steps=20, deadline_s=None)
    a = make_request(request_id="a", model="flux-a", res=512, num_steps=20, deadline_s=None)
    policy = make_policy("tetriserve")
    plain = forecast_finish(make_view([c, a], num_gpus=8), policy, COST)
    view = placed(make_view([c, a], num_gpus=8), {"flux-a": range(8)})  # flux-c: no copy, 3.0 s to load
    got = forecast_finish(view, policy, COST)
    assert got["c"] == pytest.approx(plain["c"] + 3.0, abs=0.3) and got["c"] >= 3.0
    assert got["a"] < 3.0
    # every device busy loading for 2 s: nothing starts before
    loading = placed(make_view([a], num_gpus=8, busy=range(8)), {"flux-a": range(8)},
                     loading={g: ("flux-b", 2.0) for g in range(8)})
    assert forecast_finish(loading, policy, COST)["a"] == pytest.approx(
        2.0 + forecast_finish(make_view([a], num_gpus=8), policy, COST)["a"], abs=1e-6)
