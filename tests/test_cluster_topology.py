"""Cluster topology: the planner's groups come from node -> devices and no plan of any policy crosses a node."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comfy_tetriserve.cluster.topology import MoveCost, NodeSpec, Topology, parse_devices_per_node, with_spares
from comfy_tetriserve.cost import load_cost_model
from comfy_tetriserve.errors import InvalidRequest, PlanError
from comfy_tetriserve.plan import aligned_groups, node_groups, validate_plan
from comfy_tetriserve.policy import make_policy, policy_names
from comfy_tetriserve.types import RequestSnapshot, SchedulerView
from factories import make_request

COST = load_cost_model("h200")
POLICIES = {name: make_policy(name) for name in policy_names()}


def test_node_groups_are_each_nodes_aligned_blocks():
    groups = node_groups([(0, 1, 2, 3, 4, 5, 6, 7), (8, 9, 10, 11, 12, 13, 14, 15)])
    assert len(groups) == 2 * 15 and max(len(g) for g in groups) == 8
    assert set(groups) == set(aligned_groups(range(8))) | set(aligned_groups(range(8, 16)))
    assert [len(g) for g in groups] == sorted((len(g) for g in groups), reverse=True)
    # one box of 16 would have a group of 16 and groups straddling the 8 | 8 boundary; a cluster never does
    assert (tuple(range(16)) in aligned_groups(range(16))) and tuple(range(16)) not in groups
    assert node_groups([(0, 1, 2), (3, 4)]) == ((0, 1), (3, 4), (0,), (1,), (2,), (3,), (4,))
    with pytest.raises(PlanError):
        node_groups([(0, 1), (1, 2)])
    with pytest.raises(PlanError):
        node_groups([(0, 1), ()])


def test_topology_numbers_devices_node_by_node():
    topo = Topology((NodeSpec("a", "10.0.0.1", ("cuda:0", "cuda:1")), NodeSpec("b", "10.0.0.2", ("cpu",) * 4)))
    assert topo.node_gpu_ids() == ((0, 1), (2, 3, 4, 5)) and topo.gpu_ids == tuple(range(6))
    assert topo.node_of((4, 5)) == 1 and topo.local_ids((4, 5)) == (2, 3)
    with pytest.raises(InvalidRequest, match="spans nodes"):
        topo.node_of((1, 2))
    with pytest.raises(InvalidRequest):
        Topology(())
    assert parse_devices_per_node("gpu") == ("gpu", 0) and parse_devices_per_node("cpu:3") == ("cpu", 3)
    for bad in ("cpu:0", "cuda:2", "cpu", "gpus"):
        with pytest.raises(InvalidRequest):
            parse_devices_per_node(bad)
    # a 1024 px FLUX latent (16 x 128 x 128 fp32, 1 MiB) over 100 Gb/s: 1 ms + 84 us
    assert MoveCost().time_s(16 * 128 * 128 * 4) == pytest.approx(1e-3 + 1048576 / 12.5e9)


def test_spare_nodes_reserve_ids_and_groups_for_boxes_that_join_later():
    up = Topology((NodeSpec("a", "10.0.0.1", ("cuda:0", "cuda:1", "cuda:2", "cuda:3")),
                   NodeSpec("b", "10.0.0.2", ("cuda:0", "cuda:1", "cuda:2", "cuda:3"))))
    grown = with_spares(up, 2)
    assert grown.node_gpu_ids() == ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15))
    assert [n.node_id for n in grown.nodes[2:]] == ["spare-0", "spare-1"] and grown.nodes[3].devices == up.nodes[0].devices
    assert set(up.groups) < set(grown.groups) and (8, 9, 10, 11) in grown.groups
    assert not any(set(g) & {3, 4} == {3, 4} or set(g) & {7, 8} == {7, 8} for g in grown.groups)  # never across boxes
    assert with_spares(up, 0) == up
    with pytest.raises(InvalidRequest):
        with_spares(up, -1)


@st.composite
def cluster_views(draw):
    sizes = draw(st.lists(st.sampled_from([1, 2, 3, 4, 8]), min_size=1, max_size=3))
    nodes, start = [], 0
    for n in sizes:
        nodes.append(tuple(range(start, start + n)))
        start += n
    gpu_ids = tuple(range(start))
    busy = frozenset(draw(st.sets(st.sampled_from(gpu_ids), max_size=max(0, start - 1))))
    snaps = []
    for i in range(draw(st.integers(1, 10))):
        res = draw(st.sampled_from([256, 512, 1024, 2048]))
        done = draw(st.integers(0, 45))
        deadline = draw(st.one_of(st.none(), st.floats(0.5, 60.0)))
        prev = draw(st.sampled_from(((),) + node_groups(nodes)))
        snaps.append(RequestSnapshot(make_request(request_id=f"r{i}", res=res, num_steps=50, deadline_s=deadline,
                                                  arrival_at=-draw(st.floats(0.0, 5.0))), steps_done=done,
                                     gpu_ids=prev))
    if busy:  # devices are busy only under a running assignment
        snaps.append(RequestSnapshot(make_request(request_id="running", res=1024, deadline_s=None), steps_done=10,
                                     gpu_ids=tuple(sorted(busy)), running_until_at=1.0, steps_in_flight=5))
    down = draw(st.sets(st.sampled_from(gpu_ids), max_size=start - 1)) - busy if draw(st.booleans()) else set()
    healthy = tuple(g for g in gpu_ids if g not in down)  # a dead node's or worker's devices leave the view
    return nodes, SchedulerView(now=0.0, round_index=0, gpu_ids=healthy, groups=node_groups(nodes),
                                requests=tuple(snaps), busy_gpu_ids=busy & frozenset(healthy))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster_views())
def test_no_plan_of_any_policy_crosses_a_node(case):
    nodes, view = case
    node_of = {g: i for i, ids in enumerate(nodes) for g in ids}
    for name, policy in POLICIES.items():
        plan = policy.plan_round(view, COST)
        validate_plan(view, plan, COST.allowed_degrees)  # only the view's (per-node) groups, free devices
        for a in plan.assignments:
            assert len({node_of[g] for g in a.gpu_ids}) == 1, f"{name} placed {a.gpu_ids} across nodes {nodes}"


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_cluster_mode_without_ray_says_what_to_install_and_one_box_never_imports_ray():
    proc = _run_python('''
        import importlib.abc, sys
        from comfy_tetriserve.cli import main
        from comfy_tetriserve.service.app import create_app
        from comfy_tetriserve.service.settings import ServiceConfig
        create_app(ServiceConfig(devices="sim:2", journal="off"))
        assert not [m for m in sys.modules if m.split(".")[0] == "ray"], "single-box serving imported ray"
        print("one box: no ray")
        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "ray":
                    raise ImportError("No module named 'ray'")
        sys.meta_path.insert(0, Blocker())
        sys.exit(main(["serve", "--cluster", "ray", "--devices-per-node", "cpu:2", "--journal", "off"]))
    ''')
    assert "one box: no ray" in proc.stdout, proc.stderr
    assert proc.returncode == 2, proc.stderr
    assert "--cluster ray needs Ray" in proc.stderr and 'pip install "comfy-tetriserve[cluster]"' in proc.stderr


def test_cluster_settings_are_checked():
    from comfy_tetriserve.service.settings import ServiceConfig

    with pytest.raises(InvalidRequest, match="devices-per-node"):
        ServiceConfig(cluster="ray", devices_per_node="cuda:4").validate()
    with pytest.raises(InvalidRequest, match="inter_node_gbps"):
        ServiceConfig(inter_node_gbps=0).validate()
    with pytest.raises(InvalidRequest, match="spare_nodes"):
        ServiceConfig(spare_nodes=-1).validate()
    ServiceConfig(cluster="ray", devices_per_node="cpu:2").validate()


def test_only_the_cluster_package_imports_ray():
    import comfy_tetriserve

    root = Path(comfy_tetriserve.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.parent.name == "cluster" and path.parent.parent == root:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            s = line.strip()
            if s.startswith(("import ray", "from ray")):
                offenders.append(f"{path.relative_to(root)}: {s}")
    assert not offenders, offenders
    # the topology is pure: no torch, no ray
    text = (root / "cluster" / "topology.py").read_text(encoding="utf-8")
    assert "import torch" not in text and "import ray" not in text
