"""The bench's cluster section: a cluster-wide simulation keeps groups inside a box and prices moves; routers split."""
from __future__ import annotations

import pytest

from comfy_tetriserve.cost import load_cost_model
from comfy_tetriserve.policy import make_policy
from comfy_tetriserve.sim.bench import Bench, BenchConfig
from comfy_tetriserve.sim.cluster import (CLUSTER_POLICY, ROUTERS, ClusterSimConfig, ClusterSimulation, per_box_name,
                                          route)
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
    assert set(c["sar"]["skewed"]["1.0"]) == {CLUSTER_POLICY, *(per_box_name(r) for r in ROUTERS),
                                              "sp1 cluster", "sp2 cluster", "sp4 cluster", "sp8 cluster"}
    assert all(0.0 <= v <= 1.0 for v in c["sar"]["skewed"]["1.0"].values())
    assert set(c["moves"]["skewed"]["1.0"]) == {"moves_per_request", "move_s_per_move"}
    assert c["setting"]["rate_per_min"] == 24.0 and c["setting"]["num_requests"] == 24
    assert "relative_gain_vs_best_routing" in c["gains"]["skewed"]
