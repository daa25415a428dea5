"""The offline MILP bound: exact on tiny cases, never below what a policy achieves."""
from __future__ import annotations

import pytest
from factories import make_request

from comfy_tetriserve.cost import load_cost_model
from comfy_tetriserve.policy import make_policy
from comfy_tetriserve.sim.bound import degree_patterns, sar_upper_bound
from comfy_tetriserve.sim.simulator import SimConfig, simulate
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


def test_degree_patterns_are_the_maximal_packings():
    eight = degree_patterns([1, 2, 4, 8], 8)
    assert len(eight) == 10 and all(sum(k * c for k, c in p.items()) == 8 for p in eight)
    assert {8: 1} in eight and {4: 2} in eight and {4: 1, 2: 1, 1: 2} in eight and {1: 8} in eight
    assert degree_patterns([1, 2, 4, 8], 4) == ({4: 1}, {2: 2}, {2: 1, 1: 2}, {1: 4})
    # without degree 1 a pattern may leave a GPU idle: it is maximal when no allowed degree fits
    assert degree_patterns([2, 4], 6) == ({4: 1, 2: 1}, {2: 3})
    assert degree_patterns([3], 8) == ({3: 2},)


def test_patterns_remove_rounds_no_packing_can_run():
    # a 256 px request (1.5 s: degree 1 takes 1.53 s, so it needs a few steps at 2) and two 1024 px
    # requests (3 s: degree 4 takes 2.76 s) arriving together. The fluid program keeps all three by
    # averaging 1 + 4 + 4 GPUs over rounds; at an instant they need 9 of 8, and degree 8 for one
    # 1024 px request does not help (it pauses the other), so at most two of them can make it
    burst = [make_request(res=256, deadline_s=1.5), make_request(res=1024, deadline_s=3.0),
             make_request(res=1024, deadline_s=3.0)]
    assert sar_upper_bound(burst, COST, patterns=False).num_on_time == 3
    tight = sar_upper_bound(burst, COST)
    assert tight.num_on_time == 2 and tight.status == "optimal"
    assert sar_upper_bound(burst, COST, tau_s=0.05).num_on_time == 2
    for name in ("tetriserve", "edf", "sp4", "edf-admit"):
        assert sum(o.met for o in simulate(burst, make_policy(name), COST).outcomes) <= 2, name
    assert sum(o.met for o in simulate(burst, make_policy("tetriserve"), COST).outcomes) == 2


@pytest.mark.parametrize("mix,scale,seed,burst", [("uniform", 1.0, 0, 1), ("skewed", 1.5, 1, 1), ("skewed", 1.2, 2, 1),
                                                  ("uniform", 1.0, 1000, 5)])
def test_bound_is_above_every_policy(mix, scale, seed, burst):
    trace = make_trace(WorkloadSpec(num_requests=30, mix=mix, slo_scale=scale, seed=seed, burst_size=burst))
    b = sar_upper_bound(trace, COST)
    assert b.status == "optimal"
    # any round length gives a valid bound (the finer one without the pattern rows, for time)
    fine = sar_upper_bound(trace, COST, tau_s=0.1, patterns=False)
    fluid = sar_upper_bound(trace, COST, patterns=False)  # the looser program bounds the tighter one
    assert fluid.num_on_time >= b.num_on_time
    for name in ("tetriserve", "edf", "sp4", "rssp", "edf-admit"):
        on_time = sum(o.met for o in simulate(trace, make_policy(name), COST).outcomes)
        assert on_time <= b.num_on_time and on_time <= fine.num_on_time, name


def test_event_rounds_do_not_lend_a_round_average_to_a_shorter_window():
    # two 256 px requests of 5 steps with 0.1 s each: degree 8 takes 0.095 s, degree 4 0.105 s, so
    # only one can make it. On a uniform 0.25 s grid both windows are 40 % of one round and the
    # round's capacity averages 8 GPUs over 0.25 s: the program keeps both (at an instant they would
    # need 16 GPUs). With rounds also ending at the deadline, round [0, 0.1) holds 8 GPUs: one.
    pair = [make_request(res=256, num_steps=5, deadline_s=0.1), make_request(res=256, num_steps=5, deadline_s=0.1)]
    assert sar_upper_bound(pair, COST, event_rounds=False).num_on_time == 2
    tight = sar_upper_bound(pair, COST)
    assert tight.num_on_time == 1 and tight.status == "optimal"
    for name in ("tetriserve", "edf", "sp8", "edf-admit"):
        assert sum(o.met for o in simulate(pair, make_policy(name), COST).outcomes) <= 1, name
    # bursts arriving mid-round after idle stretches: 20 -> 19 on this trace
    trace = make_trace(WorkloadSpec(num_requests=30, mix="uniform", slo_scale=1.0, seed=1000, burst_size=5))
    grid = sar_upper_bound(trace, COST, event_rounds=False).num_on_time
    events = sar_upper_bound(trace, COST).num_on_time
    assert events < grid
    assert sum(o.met for o in simulate(trace, make_policy("tetriserve"), COST).outcomes) <= events


def test_pairs_bound_schedules_that_batch_two_requests():
    # two 256 px requests with 2.9 s each on one GPU: one after the other they need 3.06 s, batched
    # into one step (2.68 s for 50 steps) both make it. Without the pair variables the program
    # bounds only schedules that never batch, and TetriServe batching the pair beats it
    two = [make_request(res=256, deadline_s=2.9), make_request(res=256, deadline_s=2.9)]
    assert sar_upper_bound(two, COST, 1, pairs=False).num_on_time == 1
    b = sar_upper_bound(two, COST, 1)
    assert b.num_on_time == 2 and b.status == "optimal"
    config = SimConfig(num_gpus=1)
    batched = simulate(two, make_policy("tetriserve", batch_margin_frac=0.0), COST, config)
    assert sum(o.met for o in batched.outcomes) == 2
    for name in ("tetriserve", "edf", "sp1", "edf-admit"):  # not batching (or with a reserve): one
        assert sum(o.met for o in simulate(two, make_policy(name), COST, config).outcomes) == 1, name
    # a request of another shape never shares a step: a 512 px one instead keeps the count at 1
    mixed = [make_request(res=256, deadline_s=2.9), make_request(res=512, deadline_s=2.9)]
    assert sar_upper_bound(mixed, COST, 1).num_on_time == 1
