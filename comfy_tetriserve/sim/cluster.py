"""The bench's ``cluster`` section: one cluster-wide planner against one planner per box.

Two boxes of ``gpus_per_node`` simulated GPUs (the paper's H200 profile) at twice the paper's rate:

- **cluster-wide**: one engine and one policy over every GPU; groups are each box's aligned blocks
  (``plan.node_groups``: never across boxes); a job whose next group is on the other box moves
  there at the step boundary, priced ``inter_alpha_s + latent bytes / inter_bytes_per_s``
  (``ClusterSimulation.migration_s``), as the cluster executor moves a checkpoint. The policy is
  TetriServe planned box by box over one queue, each box on its own round cadence
  (``policy/boxes.py``, ``tetriserve-boxes``); **cluster-wide joint rounds** is plain TetriServe
  over all 16 GPUs (a new round only when both boxes' assignments have ended).
- **per-box**: one TetriServe per box, jobs split at arrival by a router, the way studios split
  artists today: round-robin, least-loaded (the box with the least open work, in degree-1
  step-seconds) or power-of-two-choices (two boxes drawn at random with replacement, the less
  loaded one; with two boxes it is least-loaded half the time and a random box otherwise).
  A job never leaves its box.
- fixed-degree baselines (SP=1/2/4/8) run cluster-wide on the same groups.

Every number comes from the cost model named in the report (simulated, not measured).
"""
from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..plan import node_groups
from ..policy import make_policy
from ..types import Assignment, GenRequest
from .bound import isolated_bound
from .simulator import SimConfig, Simulation
from .workload import WorkloadSpec, make_trace

ROUTERS = ("round-robin", "least-loaded", "power-of-two")
FIXED = ("sp1", "sp2", "sp4", "sp8")
CLUSTER_POLICY = "cluster-wide"
JOINT_POLICY = "cluster-wide joint rounds"
#: the simulation task of each cluster-wide column
CLUSTER_TASKS = {CLUSTER_POLICY: "tetriserve-boxes", JOINT_POLICY: "tetriserve"}
ROUTER_SHORT = {"round-robin": "rr", "least-loaded": "least", "power-of-two": "p2c"}


def per_box_name(router: str) -> str:
    """TetriServe on each box behind ``router``."""
    return f"per-box {ROUTER_SHORT[router]}"


@dataclass(frozen=True)
class ClusterSimConfig:
    num_nodes: int = 2
    gpus_per_node: int = 8
    inter_bytes_per_s: float = 12.5e9  # 100 Gb/s between boxes
    inter_alpha_s: float = 1e-3


class ClusterSimulation(Simulation):
    """A simulation over several boxes: groups inside a box, moves between boxes priced by the link."""

    def __init__(self, trace: Sequence[GenRequest], policy, cost, cluster: ClusterSimConfig,
                 sim: SimConfig | None = None) -> None:
        n = cluster.num_nodes * cluster.gpus_per_node
        nodes = [tuple(range(i * cluster.gpus_per_node, (i + 1) * cluster.gpus_per_node))
                 for i in range(cluster.num_nodes)]
        base = sim or SimConfig()
        super().__init__(trace, policy, cost, SimConfig(**{**base.__dict__, "num_gpus": n}), groups=node_groups(nodes))
        self.cluster = cluster
        self._node_of_req: dict[str, int] = {}
        self.num_moves = 0
        self.move_s = 0.0

    def migration_s(self, r: GenRequest, a: Assignment) -> float:
        node = a.gpu_ids[0] // self.cluster.gpus_per_node
        moved = [rid for rid in a.request_ids if self._node_of_req.get(rid, node) != node]
        for rid in a.request_ids:
            self._node_of_req[rid] = node
        if not moved:
            return super().migration_s(r, a)
        nbytes = r.num_image_tokens * r.batch * self.config.latent_bytes_per_token * len(moved)
        cost = self.cluster.inter_alpha_s + nbytes / self.cluster.inter_bytes_per_s
        self.num_moves += len(moved)
        self.move_s += cost
        return cost


def open_work_s(sim: Simulation, cost) -> float:
    """A box's open work: remaining steps of every unfinished request at degree 1, in seconds."""
    total = 0.0
    for st in sim.engine.open_states():
        r = st.request
        total += st.steps_left * cost.step_time_s(r.model, r.height, r.width, r.batch, 1)
    return total


def route(trace: Sequence[GenRequest], router: str, cost, cluster: ClusterSimConfig, policy: str = "tetriserve",
          seed: int = 0) -> list[Simulation]:
    """One simulation per box, each request sent to one box at its arrival by ``router``."""
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r} (known: {', '.join(ROUTERS)})")
    boxes = [Simulation((), make_policy(policy), cost, SimConfig(num_gpus=cluster.gpus_per_node))
             for _ in range(cluster.num_nodes)]
    rng = random.Random(seed)
    for i, r in enumerate(sorted(trace, key=lambda q: (q.arrival_at, q.request_id))):
        for box in boxes:
            box.run(until=r.arrival_at - 1e-9)  # every event before the arrival; the router sees that state
        if router == "round-robin":
            k = i % len(boxes)
        else:
            cands = list(range(len(boxes))) if router == "least-loaded" else [rng.randrange(len(boxes)) for _ in range(2)]
            k = min(cands, key=lambda b: (open_work_s(boxes[b], cost), b))
        boxes[k].add_arrival(r)
    for box in boxes:
        box.run()
    return boxes


def run_cluster_task(args: tuple[str, WorkloadSpec, str, ClusterSimConfig]) -> dict[str, Any]:
    """One (policy or router, workload) simulation, summarised (runs in a worker process)."""
    from .bench import _cost

    name, spec, profile, cluster = args
    cost = _cost(profile)
    trace = make_trace(spec)
    if name.startswith("route:"):
        boxes = route(trace, name.split(":", 1)[1], cost, cluster, seed=spec.seed)
        outcomes = [o for b in boxes for o in b.result(profile).outcomes]
        per_box = [sum(1 for o in b.result(profile).outcomes) for b in boxes]
        moves, move_s = 0, 0.0
    else:
        sim = ClusterSimulation(trace, make_policy(name), cost, cluster).run()
        outcomes = list(sim.result(profile).outcomes)
        per_box = None
        moves, move_s = sim.num_moves, sim.move_s
    timed = [o for o in outcomes if o.request.deadline_at is not None]
    return {"sar": sum(o.met for o in timed) / len(timed) if timed else float("nan"), "moves": moves,
            "isolated_bound": isolated_bound(trace, cost, cluster.gpus_per_node),
            "move_s": move_s, "num_requests": len(outcomes), "per_box": per_box}


def section(bench) -> tuple[dict[str, Any], str]:
    """(report["cluster"], text) for the bench (``bench`` is a ``sim.bench.Bench``)."""
    from . import report as rep
    from .bench import _map

    c = bench.c
    cluster = ClusterSimConfig()
    rate = 2 * c.rate_per_min
    num_requests = 2 * c.num_requests
    names = list(CLUSTER_TASKS) + [per_box_name(r) for r in ROUTERS] + [f"{p} cluster" for p in FIXED]
    keys, tasks = [], []
    for mix in c.mixes:
        for scale in c.scales:
            for seed in range(c.seeds):
                spec = bench.spec(num_requests=num_requests, rate_per_min=rate, mix=mix, slo_scale=scale, seed=seed)
                for name, task in zip(names, list(CLUSTER_TASKS.values()) + [f"route:{r}" for r in ROUTERS]
                                      + list(FIXED)):
                    keys.append((mix, f"{scale:.1f}", name))
                    tasks.append((task, spec, c.profile, cluster))
    results = _map(run_cluster_task, tasks, bench.jobs)
    grid: dict = {}
    for k, r in zip(keys, results):
        grid.setdefault(k, []).append(r)
    sar: dict = {}
    moves: dict = {}
    for (mix, s, name), runs in grid.items():
        sar.setdefault(mix, {}).setdefault(s, {})[name] = statistics.fmean(r["sar"] for r in runs)
        if name == CLUSTER_POLICY:
            moves.setdefault(mix, {})[s] = {
                "moves_per_request": statistics.fmean(r["moves"] / max(r["num_requests"], 1) for r in runs),
                "move_s_per_move": statistics.fmean(r["move_s"] / r["moves"] for r in runs if r["moves"]) if any(
                    r["moves"] for r in runs) else 0.0}
    iso: dict = {}  # the isolated bound of the same traces (bound.isolated_bound, one box)
    for (mix, s, name), runs in grid.items():
        if name == CLUSTER_POLICY:
            iso.setdefault(mix, {})[s] = statistics.fmean(r["isolated_bound"] for r in runs)
    gains = {}
    for mix, by_scale in sar.items():
        best_box = {s: max(v[per_box_name(r)] for r in ROUTERS) for s, v in by_scale.items()}
        mean_cluster = statistics.fmean(v[CLUSTER_POLICY] for v in by_scale.values())
        mean_best = statistics.fmean(best_box.values())
        best_router_mean = max(statistics.fmean(v[per_box_name(r)] for v in by_scale.values()) for r in ROUTERS)
        gains[mix] = {
            "mean_sar_cluster": mean_cluster, "mean_sar_best_routing": best_router_mean,
            "mean_sar_cluster_joint_rounds": statistics.fmean(v[JOINT_POLICY] for v in by_scale.values()),
            "mean_sar_best_routing_per_scale": mean_best,
            "relative_gain_vs_best_routing": mean_cluster / best_router_mean - 1 if best_router_mean else None,
            "beats_every_per_box_variant_at_every_scale": all(
                v[CLUSTER_POLICY] >= v[per_box_name(r)] - 1e-12 for v in by_scale.values() for r in ROUTERS),
        }
    out = {"sar": sar, "moves": moves, "gains": gains, "policies": names, "isolated_bound": iso,
           "setting": {"num_nodes": cluster.num_nodes, "gpus_per_node": cluster.gpus_per_node, "rate_per_min": rate,
                       "num_requests": num_requests, "seeds": c.seeds, "inter_node_bytes_per_s": cluster.inter_bytes_per_s,
                       "inter_node_alpha_s": cluster.inter_alpha_s, "profile": c.profile,
                       "note": "simulated on the cost model; per-box routers never move a job between boxes"}}
    text = []
    for mix in c.mixes:
        text.append(f"Cluster ({cluster.num_nodes} boxes x {cluster.gpus_per_node} GPUs, {rate:g} req/min), SAR, "
                    f"{mix} mix (mean of {c.seeds} seeds)\n" + rep.sar_table(sar[mix], names))
        g = gains[mix]
        text.append(f"  cluster-wide {g['mean_sar_cluster']:.3f} vs best per-box routing {g['mean_sar_best_routing']:.3f}"
                    f" ({100 * (g['relative_gain_vs_best_routing'] or 0):+.1f} %); >= every per-box variant at every "
                    f"scale: {'yes' if g['beats_every_per_box_variant_at_every_scale'] else 'no'}; moves per request "
                    + ", ".join(f"{s}: {m['moves_per_request']:.2f}" for s, m in moves[mix].items()))
    return out, "\n".join(text)
