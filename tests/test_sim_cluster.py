"""The bench's cluster section: a cluster-wide simulation keeps groups inside a box and prices moves; routers split."""
from __future__ import annotations

import pytest

from comfy_tetriserve.cost import load_cost_model
from comfy_tetriserve.policy import make_policy
from comfy_tetriserve.sim.bench import Bench, BenchConfig
from comfy_tetriserve.sim.cluster import (CLUSTER_POLICY, JOINT_POLICY, ROUTERS, ClusterSimConfig, ClusterSimulation,
                                          per_box_name, route)
from comfy_tetriserve.sim.workload import WorkloadSpec, make_trace

COST = load_cost_model("h200")
TRACE = make_trace(WorkloadSpec(num_requests=60, rate_per_min=24.0, mix="skewed", slo_scale=1.2, seed=1))


def test_cluster_wide_groups_stay_inside_a_box_and_moves_are_priced():
    cluster = ClusterSimConfig(num_nodes=2, gpus_per_node=8)
    sim = ClusterSimulation(TRACE, make_policy("tetriserve"), COST, cluster).run()
    records = sim.engine.records()
    assert records and all(len({g // 8 for g in rec.gpu_ids}) == 1 for rec in records)
    assert {g // 8 for rec in records for g in rec.gpu_ids} == {0, 1}  # both boxes are used
    assert all(st.status.value == "finished" for st in sim.engine.states())
    assert sim.num_moves >= 1
    # every move costs at least the link latency, and moves are rare next to assignments
    assert sim.move_s >= sim.num_moves * cluster.inter_alpha_s and sim.num_moves < len(records) / 2
    # a slow link makes the same moves cost more (the planner sees it in the expected ends)
    slow = ClusterSimulation(TRACE, make_policy("tetriserve"), COST,
                             ClusterSimConfig(inter_bytes_per_s=1e6)).run()
    assert slow.move_s / max(slow.num_moves, 1) > 100 * sim.move_s / sim.num_moves


def test_routers_split_the_trace_and_never_move_a_job():
    for router in ROUTERS:
        boxes = route(TRACE, router, COST, ClusterSimConfig())
        ids = [sorted(st.request_id for st in b.engine.states()) for b in boxes]
        assert sorted(ids[0] + ids[1]) == sorted(r.request_id for r in TRACE)
        if router == "round-robin":
            assert abs(len(ids[0]) - len(ids[1])) <= 1
        assert all(st.status.value == "finished" for b in boxes for st in b.engine.states())
    with pytest.raises(ValueError):
        route(TRACE, "random", COST, ClusterSimConfig())


def test_cluster_section_report_shape():
    bench = Bench(BenchConfig(quick=True, jobs=1, sections=("cluster",), plots=False, scales=(1.0,),
                              mixes=("skewed",), num_requests=12))
    report = bench.run(("cluster",), echo=lambda _: None)
    c = report["cluster"]
    assert set(c["sar"]["skewed"]["1.0"]) == {CLUSTER_POLICY, JOINT_POLICY, *(per_box_name(r) for r in ROUTERS),
                                              "sp1 cluster", "sp2 cluster", "sp4 cluster", "sp8 cluster"}
    assert all(0.0 <= v <= 1.0 for v in c["sar"]["skewed"]["1.0"].values())
    assert set(c["moves"]["skewed"]["1.0"]) == {"moves_per_request", "move_s_per_move"}
    assert c["setting"]["rate_per_min"] == 24.0 and c["setting"]["num_requests"] == 24
    assert "relative_gain_vs_best_routing" in c["gains"]["skewed"]
    assert c["sar"]["skewed"]["1.0"][CLUSTER_POLICY] <= c["isolated_bound"]["skewed"]["1.0"] + 1e-12


def test_cluster_bounds_order_and_hold_every_policy():
    """Pooled bound (16 GPUs, no group beyond a box) >= per-box bound behind a router >= that router's SAR;
    pooled >= every policy; isolated >= pooled; a group cap below the box lowers the bound."""
    from comfy_tetriserve.sim.bound import sar_upper_bound
    from comfy_tetriserve.sim.cluster_bound import summarise, trace_bounds

    spec = WorkloadSpec(num_requests=40, rate_per_min=24.0, num_steps=50, model="flux-dev", mix="skewed",
                        slo_scale=1.2, seed=1)
    b = trace_bounds(spec, "h200", ClusterSimConfig(), time_limit_s=30.0, routers=("least-loaded",))
    assert b["pooled_status"] == "optimal" and b["num_requests"] == 40
    assert b["isolated"] >= b["pooled"] >= b["per_box"]["per-box least"] >= b["sar"]["per-box least"] - 1e-12
    assert all(b["pooled"] >= v - 1e-12 for v in b["sar"].values())
    assert b["isolated"] - b["pooled"] >= 0.05  # the pooled program is much tighter than the isolated bound here
    two_2048 = [r for r in TRACE if r.height == 2048][:2]
    capped = sar_upper_bound(two_2048, COST, 16, max_degree=4).num_on_time
    assert capped < sar_upper_bound(two_2048, COST, 16).num_on_time
    m = summarise({"skewed": {"1.2": [b]}})["skewed"]
    assert b["bound"] == min(b["pooled"], b["isolated"])
    assert m["max_gain_over_best_routing"] == pytest.approx(
        b["bound"] / max(b["sar"][per_box_name(r)] for r in ROUTERS) - 1)
