"""Cluster mode on Ray's own multi-node test cluster (2 nodes x 2 CPU workers, all on 127.0.0.1).

One module-wide cluster and executor (starting them is most of the cost); the test that removes a
node runs last.
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from dataclasses import dataclass

import pytest

# Ray reads this when it is imported: without it a second node on this machine resolves 127.0.0.1 to the
# machine's outward address (and then cannot reach the head).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray", reason="cluster mode needs the cluster extra (ray)")
psutil = pytest.importorskip("psutil")
torch = pytest.importorskip("torch")

from comfy_tetriserve.cluster.executor import ClusterExecutor, trajectory_bytes  # noqa: E402
from comfy_tetriserve.core.executor import (DevicesUnavailable, Executor, MovingExecutor,  # noqa: E402
                                            RecoverableExecutor)
from comfy_tetriserve.plan import node_groups  # noqa: E402
from comfy_tetriserve.types import Assignment, RoundPlan  # noqa: E402
from comfy_tetriserve.worker.tiny import write_tiny_checkpoint  # noqa: E402

from test_workers import make_job, rel  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]
LOOPBACK = "127.0.0.1"


class Harness:
    def __init__(self, cluster, executor) -> None:
        self.cluster = cluster
        self.ex = executor
        self.loop = asyncio.new_event_loop()

    def __call__(self, coro):
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    from ray.cluster_utils import Cluster

    tmp = tmp_path_factory.mktemp("cluster")
    node_args = dict(num_cpus=1, node_ip_address=LOOPBACK, include_dashboard=False, object_store_memory=80 * 2**20)
    cluster = Cluster(initialize_head=True, head_node_args=node_args)
    second = cluster.add_node(**{k: v for k, v in node_args.items() if k != "include_dashboard"})
    ray.init(address=cluster.address, _node_ip_address=LOOPBACK, include_dashboard=False, logging_level="WARNING")
    ex = ClusterExecutor(cluster.address, devices_per_node="cpu:2", checkpoint_every_s=0.0, num_threads=1)
    harness = Harness(cluster, ex)
    harness.second = second
    harness.sd3_path = str(write_tiny_checkpoint("sd3", "diffusers", tmp / "sd3"))
    try:
        harness(ex.start())
        harness(ex.load_model("sd3", harness.sd3_path, "fp32"))
        yield harness
    finally:
        harness(ex.close())
        harness.loop.close()
        ray.shutdown()
        cluster.shutdown()


async def run_plan(ex, job, plan, release=True):
    await ex.admit(job)
    for group, steps in plan:
        result = await ex.execute(Assignment((job.request_id,), group, steps))
        assert result.error is None and result.steps_done == steps, result
    out = await ex.fetch_result(job.request_id)
    if release:
        await ex.release(job.request_id)
    return out


def test_topology_one_world_per_node_and_groups_inside_nodes(h):
    ex = h.ex
    assert isinstance(ex, Executor) and isinstance(ex, RecoverableExecutor) and isinstance(ex, MovingExecutor)
    assert ex.gpu_ids == (0, 1, 2, 3)
    assert ex.groups == node_groups([(0, 1), (2, 3)]) == ((0, 1), (2, 3), (0,), (1,), (2,), (3,))
    nodes = ex.nodes()
    assert len(nodes) == 2 and len({n["node_id"] for n in nodes}) == 2
    assert [n["gpu_ids"] for n in nodes] == [[0, 1], [2, 3]]
    assert all(n["alive"] and n["backend"] == "gloo" and n["world_size"] == 2 for n in nodes)
    assert {n["address"] for n in nodes} == {LOOPBACK}
    with pytest.raises(Exception, match="groups"):
        h(ex.execute(Assignment(("x",), (1, 2), 1)))
    # serve --cluster ray builds the same topology from its settings (nothing started until start())
    from comfy_tetriserve.cluster.service import build_cluster_executor
    from comfy_tetriserve.service.settings import ServiceConfig

    built = build_cluster_executor(ServiceConfig(cluster="ray", ray_address=h.cluster.address,
                                                 devices_per_node="cpu:2", inter_node_gbps=8.0))
    assert built.topology == ex.topology and built.move_cost.bytes_per_s == 1e9


def test_no_process_group_spans_nodes(h):
    """Each node's workers talk (gloo TCP) only to workers of the same node."""
    by_node = {}
    for w in h.ex.workers():
        by_node.setdefault(w["node"], set()).add(w["pid"])
    assert [len(p) for p in by_node.values()] == [2, 2]
    endpoints = {}  # (ip, port) -> node of the worker that owns it
    conns = {}
    for node, pids in by_node.items():
        for pid in pids:
            cs = psutil.Process(pid).net_connections(kind="inet")
            conns[pid] = (node, cs)
            for c in cs:
                endpoints[(c.laddr.ip, c.laddr.port)] = node
    peers = 0
    for pid, (node, cs) in conns.items():
        for c in cs:
            if c.raddr and (c.raddr.ip, c.raddr.port) in endpoints:
                peers += 1
                assert endpoints[(c.raddr.ip, c.raddr.port)] == node, f"worker {pid} of node {node} talks to another node"
    assert peers >= 2  # the gloo pairs inside each node were seen


def test_job_moved_between_nodes_equals_the_single_device_run(h):
    ex, steps = h.ex, 8
    ref = h(run_plan(ex, make_job("ref", "sd3", steps=steps, seed=3), [((0,), steps)]))
    other = h(run_plan(ex, make_job("other", "sd3", steps=steps, seed=4), [((2,), steps)]))
    job = make_job("moved", "sd3", steps=steps, seed=3)
    h(ex.admit(job))
    assert h(ex.execute(Assignment(("moved",), (0, 1), 3))).error is None
    assert ex.node_of_request("moved") == 0
    mid = ex.checkpoint("moved").x.clone()
    before = ex.num_moves
    # the price the service adds to the assignment's expected end (the planner's running_until_at)
    assert ex.move_s(Assignment(("moved",), (0,), 5)) == 0.0
    planned_s = ex.move_s(Assignment(("moved",), (2, 3), 5))
    assert planned_s > ex.move_cost.alpha_s > 0
    assert planned_s == pytest.approx(ex.move_cost.time_s(trajectory_bytes(ex.checkpoint("moved"))))
    r = h(ex.execute(Assignment(("moved",), (2, 3), 5)))  # node 0 -> node 1 at step 3
    assert r.error is None and r.steps_done == 5 and r.assignment.gpu_ids == (2, 3)
    assert ex.node_of_request("moved") == 1 and ex.num_moves == before + 1
    move = ex.moves()["recent"][-1]
    assert (move["from_node"], move["to_node"]) == (0, 1) and move["num_bytes"] >= mid.numel() * 4
    assert move["priced_s"] == pytest.approx(ex.move_cost.time_s(move["num_bytes"]))
    assert move["priced_s"] == pytest.approx(planned_s)
    assert ex.move_s(Assignment(("moved",), (3,), 1)) == 0.0  # it is there now
    out = h(ex.fetch_result("moved"))
    h(ex.release("moved"))
    assert rel(out, ref) <= 1e-5
    # the margin: a lost hand-off (the mid-trajectory latent) or another seed is far from the reference
    assert rel(mid, ex_final_latent_space(out)) > 1e-2 and rel(other, ref) > 1e-2


def ex_final_latent_space(t):
    return t.float()


def test_every_listening_socket_is_on_loopback(h):
    procs = psutil.Process().children(recursive=True)
    assert len(procs) >= 6  # gcs, two raylets, agents, workers
    seen = 0
    for p in procs:
        try:
            cs = p.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in cs:
            if c.status == psutil.CONN_LISTEN:
                seen += 1
                ip = ipaddress.ip_address(c.laddr.ip)
                ip = ip.ipv4_mapped or ip if ip.version == 6 else ip
                assert ip.is_loopback, f"{p.name()} (pid {p.pid}) listens on {c.laddr.ip}:{c.laddr.port}"
    assert seen >= 3


def test_worker_death_inside_a_node_loses_nothing(h):
    """A worker of node 1 dies (SIGKILL) while a job runs there; the node itself stays. The service
    handles it like a worker death on one box: the job's assignment ends lost, the node's pool is
    rebuilt (node 0's workers keep running), the job resumes from its checkpoint, and every result
    equals its single-device run. The executor then restarts for the tests after this one."""
    import signal
    from types import SimpleNamespace

    from comfy_tetriserve.client import TetriServeClient, decode_result, encode_job
    from comfy_tetriserve.service.app import create_app
    from comfy_tetriserve.service.state import SERVICE
    from comfy_tetriserve.worker.models import load_transformer
    from factories import PowerLawCost
    from service_helpers import make_config, running_service
    from test_service_workers import direct_run, job_tensors

    ex = h.ex
    config = make_config(devices="cpu:4", model=(f"sd3={h.sd3_path}",), dtype="fp32", lease_s=30.0,
                         shutdown_grace_s=5.0)
    app = create_app(config, executor=ex, policy=HighestFirst(), cost=PowerLawCost(base_s=0.05, degrees=(1, 2)))
    svc = app[SERVICE]
    ref_h = SimpleNamespace(refs={"sd3": load_transformer(h.sd3_path, dtype="fp32")}, config=config)
    pids = {w["gpu_id"]: w["pid"] for w in ex.workers()}

    async def body():
        async with running_service(app) as url, TetriServeClient(url) as client:
            settings = [{"model": "sd3", "steps": 60, "seed": 31}, {"model": "sd3", "steps": 20, "seed": 32}]
            jobs = [await client.submit(encode_job(job_tensors("sd3", st["seed"]), st)) for st in settings]
            hit = jobs[0]["job_id"]
            t0 = time.monotonic()
            while svc.store.jobs[hit].steps_done < 3 and time.monotonic() - t0 < 60:  # checkpoints on node 1
                await asyncio.sleep(0.02)
            assert svc.store.jobs[hit].gpu_ids == (2, 3)
            os.kill(pids[3], signal.SIGKILL)
            for job, st in zip(jobs, settings):
                await client.wait(job["job_id"], timeout_s=150)
                latent = decode_result(await client.result(job["job_id"]))[0]["latent"]
                assert rel(latent, direct_run(ref_h, "sd3", job_tensors("sd3", st["seed"]), st)) <= 1e-5
            recs = [rec for rec in svc.engine.records() if hit in rec.request_ids]
            assert len(recs) >= 2 and recs[0].gpu_ids == (2, 3)  # lost on node 1, then resumed
            t0 = time.monotonic()
            status = await client.executor()
            while status["num_restarts"] < 1 and time.monotonic() - t0 < 120:  # node 1's pool rebuilds
                await asyncio.sleep(0.2)
                status = await client.executor()
            assert status["num_faults"] >= 1 and status["num_restarts"] >= 1 and status["state"] == "ok"
            assert [n["alive"] for n in status["nodes"]] == [True, True] and status["healthy_gpu_ids"] == [0, 1, 2, 3]
            now = {w["gpu_id"]: w["pid"] for w in status["workers"]}
            # node 1's pool was rebuilt, node 0's workers never stopped
            assert now[0] == pids[0] and now[1] == pids[1] and now[2] != pids[2] and now[3] != pids[3]

    h(body())
    h(ex.start())  # the service closed the executor on its way out
    assert [n["alive"] for n in ex.nodes()] == [True, True]


def test_removed_node_mid_job_loses_nothing_and_results_stay_exact(h):
    """Runs last: node 1 leaves while a job runs on it; the job resumes on node 0 from its checkpoint."""
    ex, steps = h.ex, 40
    ref = h(run_plan(ex, make_job("long-ref", "sd3", steps=steps, seed=5), [((0,), steps)]))
    faults = []
    ex.on_fault = faults.append
    h(ex.admit(make_job("long", "sd3", steps=steps, seed=5)))
    h(ex.admit(make_job("waiting", "sd3", steps=6, seed=6)))
    assert h(ex.execute(Assignment(("waiting",), (3,), 2))).error is None  # state on node 1, then idle
    removed = []

    def on_step(rid, index, seconds):
        if index == 6 and not removed:
            removed.append(time.monotonic())
            h.loop.run_in_executor(None, h.cluster.remove_node, h.second)

    result = h(ex.execute(Assignment(("long",), (2, 3), steps), on_step))
    assert removed and result.lost and result.error and "node 1" in result.error
    # checkpoints after every step (checkpoint_every_s=0): at most the step in flight when the node died is lost
    assert 5 <= result.steps_done < steps and ex.checkpoint("long").step_index == result.steps_done
    assert {2, 3} <= ex.unavailable_gpu_ids and not ({0, 1} & ex.unavailable_gpu_ids)
    assert faults and faults[0].gpu_ids == (2, 3) and faults[0].request_ids == ("long",)
    assert ex.needs_restart is None  # the other node serves on; no cluster-wide rebuild
    assert [n["alive"] for n in ex.nodes()] == [True, False]
    with pytest.raises(DevicesUnavailable):
        h(ex.execute(Assignment(("long",), (2,), 1)))
    r = h(ex.execute(Assignment(("long",), (0, 1), steps - result.steps_done)))
    assert r.error is None
    assert rel(h(ex.fetch_result("long")), ref) <= 1e-5
    # a job whose state lived only on the lost node resumes from the service-side checkpoint too
    wref = h(run_plan(ex, make_job("waiting-ref", "sd3", steps=6, seed=6), [((1,), 6)]))
    assert h(ex.execute(Assignment(("waiting",), (0,), 4))).error is None
    assert rel(h(ex.fetch_result("waiting")), wref) <= 1e-5


@dataclass(frozen=True)
class HighestFirst:
    """Each waiting job gets the free group of ``sp_degree`` devices with the highest ids, for all its steps."""

    sp_degree: int = 2
    name: str = "test-highest-first"

    def plan_round(self, view, cost):
        used: set[int] = set()
        out = []
        for snap in view.plannable:
            groups = sorted(view.free_groups(self.sp_degree), reverse=True) or sorted(view.free_groups(1), reverse=True)
            group = next((g for g in groups if used.isdisjoint(g)), None)
            if group is None:
                break
            used.update(group)
            out.append(Assignment((snap.request_id,), group, snap.steps_left))
        return RoundPlan(view.round_index, 0.0, tuple(out))


def test_service_keeps_serving_without_the_lost_node_and_a_joining_node_adds_devices(h):
    """Runs after the node removal: a service on the cluster with one spare slot (``spare_nodes=1``: the
    cluster may grow by a box) serves on node 0; a new box joins and fills the spare slot, jobs run there;
    it leaves mid-job (nothing lost); another box joins and takes the lost slot's place."""
    from types import SimpleNamespace

    from comfy_tetriserve.client import TetriServeClient, decode_result, encode_job
    from comfy_tetriserve.service.app import create_app
    from comfy_tetriserve.service.state import SERVICE
    from comfy_tetriserve.worker.models import load_transformer
    from factories import PowerLawCost
    from service_helpers import make_config, running_service
    from test_service_workers import direct_run, job_tensors

    h(h.ex.close())  # the module's executor (node 0 only now) makes way for one with a spare slot
    ex = ClusterExecutor(h.cluster.address, devices_per_node="cpu:2", checkpoint_every_s=0.0, num_threads=1,
                         spare_nodes=1)
    h.ex = ex  # closed by the fixture
    assert [n.node_id.startswith("spare-") for n in ex.topology.nodes] == [False, True]
    config = make_config(devices="cpu:4", model=(f"sd3={h.sd3_path}",), dtype="fp32", lease_s=30.0,
                         shutdown_grace_s=5.0)
    app = create_app(config, executor=ex, policy=HighestFirst(), cost=PowerLawCost(base_s=0.05, degrees=(1, 2)))
    svc = app[SERVICE]
    ref_h = SimpleNamespace(refs={"sd3": load_transformer(h.sd3_path, dtype="fp32")}, config=config)

    async def run_jobs(client, seeds):
        settings = [{"model": "sd3", "steps": 5, "seed": s} for s in seeds]
        jobs = [await client.submit(encode_job(job_tensors("sd3", s), st)) for s, st in zip(seeds, settings)]
        for job, s, st in zip(jobs, seeds, settings):
            await client.wait(job["job_id"], timeout_s=120)
            latent = decode_result(await client.result(job["job_id"]))[0]["latent"]
            assert rel(latent, direct_run(ref_h, "sd3", job_tensors("sd3", s), st)) <= 1e-5
        return [j["job_id"] for j in jobs]

    async def body():
        async with running_service(app) as url, TetriServeClient(url) as client:
            status = await client.executor()
            assert [n["alive"] for n in status["nodes"]] == [True, False] and status["healthy_gpu_ids"] == [0, 1]
            assert "spare" in status["nodes"][1]["error"] and status["state"] == "ok"
            assert svc.engine.healthy_gpu_ids == (0, 1)  # the spare slot's ids are reserved, out of the plan
            done = await run_jobs(client, [21, 22])
            assert {g for rec in svc.engine.records() for rid in rec.request_ids if rid in done
                    for g in rec.gpu_ids} <= {0, 1}
            # a new box joins: it fills the spare slot (GPU ids 2, 3), loads the models, then takes work
            # (Ray starts a node from the main thread only: the loop pauses while the processes start)
            joined = h.cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK, object_store_memory=80 * 2**20)
            t0 = time.monotonic()
            while svc.engine.healthy_gpu_ids != (0, 1, 2, 3) and time.monotonic() - t0 < 120:
                await asyncio.sleep(0.2)
            assert svc.engine.healthy_gpu_ids == (0, 1, 2, 3)
            nodes = svc.executor_json()["nodes"]
            assert [n["alive"] for n in nodes] == [True, True] and nodes[1]["gpu_ids"] == [2, 3]
            board = svc.nodes_json()
            assert board == nodes
            done = await run_jobs(client, [23])
            assert [rec.gpu_ids for rec in svc.engine.records() if done[0] in rec.request_ids] == [(2, 3)]
            status = await client.executor()
            assert status["healthy_gpu_ids"] == [0, 1, 2, 3]
            # the joined node leaves while a job runs on it: the job finishes on node 0, exactly
            st = {"model": "sd3", "steps": 150, "seed": 24}
            job = await client.submit(encode_job(job_tensors("sd3", 24), st))
            rid = job["job_id"]
            t0 = time.monotonic()
            while svc.store.jobs[rid].steps_done < 3 and time.monotonic() - t0 < 60:  # checkpoints on node 1
                await asyncio.sleep(0.02)
            h.cluster.remove_node(joined)
            await client.wait(rid, timeout_s=120)
            latent = decode_result(await client.result(rid))[0]["latent"]
            assert rel(latent, direct_run(ref_h, "sd3", job_tensors("sd3", 24), st)) <= 1e-5
            groups = [rec.gpu_ids for rec in svc.engine.records() if rid in rec.request_ids]
            assert groups[0] == (2, 3) and groups[-1] == (0, 1), groups
            status = await client.executor()
            assert [n["alive"] for n in status["nodes"]] == [True, False] and status["healthy_gpu_ids"] == [0, 1]
            assert status["num_faults"] >= 1 and status["state"] == "ok"
            # another box joins: it takes the lost box's place (its GPU ids) and serves
            h.cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK, object_store_memory=80 * 2**20)
            t0 = time.monotonic()
            while svc.engine.healthy_gpu_ids != (0, 1, 2, 3) and time.monotonic() - t0 < 120:
                await asyncio.sleep(0.2)
            assert svc.engine.healthy_gpu_ids == (0, 1, 2, 3)
            done = await run_jobs(client, [25])
            assert [rec.gpu_ids for rec in svc.engine.records() if done[0] in rec.request_ids] == [(2, 3)]

    h(body())
