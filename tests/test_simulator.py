"""The engine on a virtual clock."""
from __future__ import annotations

import math

import pytest
from factories import PowerLawCost, make_request

from comfy_tetriserve.cost import load_cost_model
from comfy_tetriserve.policy import make_policy, policy_names
from comfy_tetriserve.sim.simulator import SimConfig, simulate
from comfy_tetriserve.sim.workload import WorkloadSpec, make_trace
from comfy_tetriserve.types import RequestStatus

COST = load_cost_model("h200")


@pytest.mark.parametrize("name", sorted(policy_names()))
def test_every_policy_finishes_every_request(name):
    trace = make_trace(WorkloadSpec(num_requests=30, mix="skewed", slo_scale=1.2, seed=5))
    res = simulate(trace, make_policy(name), COST, cost_name="h200")
    assert len(res.outcomes) == 30 and all(o.status is RequestStatus.FINISHED for o in res.outcomes)
    assert 0.0 <= res.sar() <= 1.0 and res.cost_name == "h200"
    assert res.busy_gpu_seconds > 0 and res.num_assignments >= 30


def test_deterministic_for_a_seed_even_with_jitter():
    trace = make_trace(WorkloadSpec(num_requests=40, seed=9, slo_scale=1.3))
    config = SimConfig(step_jitter_cv=0.01, seed=4)
    a = simulate(trace, make_policy("tetriserve"), COST, config)
    b = simulate(trace, make_policy("tetriserve"), COST, config)
    assert [o.finished_at for o in a.outcomes] == [o.finished_at for o in b.outcomes]
    c = simulate(trace, make_policy("tetriserve"), COST, SimConfig(step_jitter_cv=0.01, seed=5))
    assert [o.finished_at for o in a.outcomes] != [o.finished_at for o in c.outcomes]


def test_one_request_timing_is_exact():
    r = make_request(res=1024, deadline_s=10.0, arrival_at=2.0)
    res = simulate([r], make_policy("sp4"), COST, SimConfig(dispatch_overhead_s=0.0))
    (o,) = res.outcomes
    assert o.finished_at == pytest.approx(2.0 + 50 * COST.step_time_s("flux-dev", 1024, 1024, 1, 4))
    assert o.met and res.sar() == 1.0
    assert o.gpu_seconds == pytest.approx(4 * (o.finished_at - 2.0))
    assert res.mean_degree() == pytest.approx(4.0)


def test_late_request_counts_as_a_miss_and_best_effort_is_not_counted():
    late = make_request(res=2048, deadline_s=1.0)  # 50 steps need 5.8 s even on 8 GPUs
    free = make_request(res=256, deadline_s=None)
    res = simulate([late, free], make_policy("tetriserve"), COST)
    assert res.sar() == 0.0 and all(o.status is RequestStatus.FINISHED for o in res.outcomes)
    by_res = res.sar_by_resolution()
    assert by_res[2048] == 0.0 and math.isnan(by_res[256])


def test_true_cost_differs_from_planner_cost():
    trace = make_trace(WorkloadSpec(num_requests=20, seed=1, slo_scale=1.5))
    slow = PowerLawCost(base_s=0.4)
    fast = simulate(trace, make_policy("sp8"), COST)
    slowed = simulate(trace, make_policy("sp8"), COST, true_cost=slow)
    assert slowed.latency_stats()["mean"] > fast.latency_stats()["mean"]


def test_all_subset_groups_run():
    trace = make_trace(WorkloadSpec(num_requests=20, seed=2))
    res = simulate(trace, make_policy("tetriserve"), COST, SimConfig(groups="all"))
    assert len(res.outcomes) == 20
    with pytest.raises(ValueError):
        simulate(trace, make_policy("tetriserve"), COST, SimConfig(groups="some"))


def test_shared_cores_slow_steps_while_more_devices_are_busy_than_cores():
    cost = PowerLawCost(base_s=0.1)
    config = SimConfig(num_gpus=2, dispatch_overhead_s=0.0, shared_cores=1.0, shared_exponent=1.0)
    a = make_request(res=1024, num_steps=10, deadline_s=None, request_id="a")
    alone = simulate([a], make_policy("sp1"), cost, config)
    step = cost.step_time_s("flux-dev", 1024, 1024, 1, 1)
    assert alone.outcomes[0].finished_at == pytest.approx(10 * step)  # one busy device: profiled speed
    b = make_request(res=1024, num_steps=10, deadline_s=None, request_id="b")
    both = simulate([a, b], make_policy("sp1"), cost, config)
    assert [o.finished_at for o in both.outcomes] == pytest.approx([20 * step, 20 * step])  # two share one core
    # b arrives when a is half done: a runs alone, then both at half speed, then b alone
    late_b = make_request(res=1024, num_steps=10, deadline_s=None, request_id="b", arrival_at=5 * step)
    ends = {o.request.request_id: o.finished_at for o in simulate([a, late_b], make_policy("sp1"), cost,
                                                                   config).outcomes}
    assert ends["a"] == pytest.approx(15 * step) and ends["b"] == pytest.approx(20 * step)
    independent = simulate([a, b], make_policy("sp1"), cost, SimConfig(num_gpus=2, dispatch_overhead_s=0.0))
    assert [o.finished_at for o in independent.outcomes] == pytest.approx([10 * step, 10 * step])
