"""tetriserve-boxes: one queue over several boxes, each box planned on its own round cadence."""
from __future__ import annotations

import pytest
from factories import make_request

from comfy_tetriserve.cost import load_cost_model
from comfy_tetriserve.plan import node_groups, validate_plan
from comfy_tetriserve.policy import make_policy
from comfy_tetriserve.policy.boxes import BoxRoundsPolicy, boxes_of
from comfy_tetriserve.sim.cluster import ClusterSimConfig, ClusterSimulation
from comfy_tetriserve.sim.workload import WorkloadSpec, make_trace
from comfy_tetriserve.types import RequestSnapshot, SchedulerView

COST = load_cost_model("h200")
BOXES = (tuple(range(8)), tuple(range(8, 16)))
GROUPS = node_groups(BOXES)


def test_boxes_are_the_connected_parts_of_the_groups():
    assert boxes_of(GROUPS) == BOXES
    assert boxes_of(node_groups([(0, 1), (2, 3, 4, 5)])) == ((0, 1), (2, 3, 4, 5))
    assert boxes_of(node_groups([tuple(range(8))])) == (tuple(range(8)),)
    assert boxes_of([(0,), (1,)]) == ((0,), (1,))


def view(now: float, box1_until: float) -> SchedulerView:
    """Box 1 runs a 2048 px job until ``box1_until``; box 0 is idle; a 1024 px job waits."""
    running = RequestSnapshot(make_request(request_id="big", res=2048, deadline_s=60.0), steps_done=10,
                              gpu_ids=BOXES[1], running_until_at=box1_until, steps_in_flight=5)
    waiting = RequestSnapshot(make_request(request_id="new", res=1024, arrival_at=now, deadline_s=30.0), steps_done=0)
    return SchedulerView(now=now, round_index=3, gpu_ids=tuple(range(16)), groups=GROUPS,
                         requests=(running, waiting), busy_gpu_ids=frozenset(BOXES[1]))


def test_an_idle_box_starts_its_own_round_instead_of_filling_the_other_boxs_gap():
    v = view(0.0, box1_until=0.05)
    joint = make_policy("tetriserve").plan_round(v, COST)
    boxes = make_policy("tetriserve-boxes").plan_round(v, COST)
    for plan in (joint, boxes):
        validate_plan(v, plan, COST.allowed_degrees)
    run_s = {name: sum(a.num_steps * COST.step_time_s("flux-dev", 1024, 1024, 1, a.sp_degree)
                       for a in p.assignments if "new" in a.request_ids)
             for name, p in (("joint", joint), ("boxes", boxes))}
    # joint rounds: only work that ends by box 1's round end (50 ms); per box: a round of box 0's own
    assert run_s["joint"] <= 0.05 and run_s["boxes"] >= 0.15
    assert all(set(a.gpu_ids) <= set(BOXES[0]) for a in boxes.assignments)
    assert "gap" in joint.note and "round" in boxes.note and "box 0-7" in boxes.note


def test_one_box_is_the_inner_policy_and_no_job_is_planned_twice():
    inner = make_policy("tetriserve")
    single = SchedulerView(now=0.0, round_index=0, gpu_ids=BOXES[0], groups=node_groups([BOXES[0]]),
                           requests=(RequestSnapshot(make_request(request_id="a", res=1024), 0),))
    assert BoxRoundsPolicy(inner).plan_round(single, COST) == inner.plan_round(single, COST)
    many = tuple(RequestSnapshot(make_request(request_id=f"r{i}", res=1024, deadline_s=20.0), 0) for i in range(12))
    both_idle = SchedulerView(now=0.0, round_index=0, gpu_ids=tuple(range(16)), groups=GROUPS, requests=many)
    plan = make_policy("tetriserve-boxes").plan_round(both_idle, COST)
    validate_plan(both_idle, plan, COST.allowed_degrees)
    ids = [rid for a in plan.assignments for rid in a.request_ids]
    assert len(ids) == len(set(ids)) == 12
    assert {g // 8 for a in plan.assignments for g in a.gpu_ids} == {0, 1}


@pytest.mark.parametrize("mix", ["skewed"])
def test_cluster_simulation_keeps_groups_in_boxes_and_finishes_every_job(mix):
    trace = make_trace(WorkloadSpec(num_requests=60, rate_per_min=24.0, mix=mix, slo_scale=1.2, seed=1))
    sim = ClusterSimulation(trace, make_policy("tetriserve-boxes"), COST, ClusterSimConfig()).run()
    recs = sim.engine.records()
    assert recs and all(len({g // 8 for g in r.gpu_ids}) == 1 for r in recs)
    assert all(st.status.value == "finished" for st in sim.engine.states())
    assert {g // 8 for r in recs for g in r.gpu_ids} == {0, 1}


def test_forecast_variant_and_model_placement_are_the_inner_policys():
    p = make_policy("tetriserve-boxes")
    f = p.for_forecast()
    assert isinstance(f, BoxRoundsPolicy) and f.inner == p.inner.for_forecast() and f.name == p.name
    assert p.places_models is True
