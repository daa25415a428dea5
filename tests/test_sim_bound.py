"""The offline MILP bound: exact on tiny cases, never below what a policy achieves."""
from __future__ import annotations

import pytest
from factories import make_request

from comfy_tetriserve.cost import load_cost_model
from comfy_tetriserve.policy import make_policy
from comfy_tetriserve.sim.bound import sar_upper_bound
from comfy_tetriserve.sim.simulator import simulate
from comfy_tetriserve.sim.workload import WorkloadSpec, make_trace

COST = load_cost_model("h200")


def test_tiny_cases():
    ok = make_request(res=1024, deadline_s=3.0)
    assert sar_upper_bound([ok], COST).num_on_time == 1
    impossible = make_request(res=2048, deadline_s=5.0)  # needs 5.83 s on all 8 GPUs
    assert sar_upper_bound([impossible], COST).num_on_time == 0
    # two 2048 px requests with 6 s each, arriving together: the box can finish only one
    pair = [make_request(res=2048, deadline_s=6.0), make_request(res=2048, deadline_s=6.0)]
    b = sar_upper_bound(pair, COST)
    assert b.num_on_time == 1 and b.status == "optimal" and len(b.on_time_ids) == 1
    # ... but 4 GPUs each are enough for two 1024 px requests at 3 s
    two = [make_request(res=1024, deadline_s=3.0), make_request(res=1024, deadline_s=3.0)]
    assert sar_upper_bound(two, COST).num_on_time == 2
    assert sar_upper_bound([make_request(deadline_s=None)], COST).status == "empty"


@pytest.mark.parametrize("mix,scale,seed", [("uniform", 1.0, 0), ("skewed", 1.5, 1), ("skewed", 1.2, 2)])
def test_bound_is_above_every_policy(mix, scale, seed):
    trace = make_trace(WorkloadSpec(num_requests=30, mix=mix, slo_scale=scale, seed=seed))
    b = sar_upper_bound(trace, COST)
    assert b.status == "optimal"
    fine = sar_upper_bound(trace, COST, tau_s=0.1)  # any round length gives a valid bound
    for name in ("tetriserve", "edf", "sp4", "rssp"):
        on_time = sum(o.met for o in simulate(trace, make_policy(name), COST).outcomes)
        assert on_time <= b.num_on_time and on_time <= fine.num_on_time, name
