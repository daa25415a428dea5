"""How far the bench's ``cluster`` section is from the best any schedule could do.

For each trace of the cluster section (2 boxes x 8 GPUs, the full 600-request traces), three upper
bounds on SAR, and the policies' SAR on the same trace:

- ``pooled``: the offline program of ``sim/bound.py`` over all the cluster's GPUs pooled, with no
  group larger than one box (``max_degree = gpus_per_node``). Every two-box schedule is one such
  schedule: at any instant the running degrees sum to at most the cluster's GPU count and each job
  runs on one group of at most one box; moves between boxes cost time the program does not charge.
  So no policy on the cluster, cluster-wide or routed, keeps more deadlines than this. With a time
  limit the solver reports its proven dual bound (still an upper bound), floored to a count.
- ``per_box``: the same program on each box alone (8 GPUs) for the requests a router sent there,
  summed: the best any per-box planner could do behind that router's split.
- ``isolated``: the share of requests that could meet their deadline alone on one box
  (``bound.isolated_bound``): loose but exact where most requests are infeasible outright.

Run: ``python -m comfy_tetriserve.sim.cluster_bound --mix skewed --out docs/bench/cluster/bound.json``
(minutes per trace at the default time limit; every number comes from the named cost model).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from .bound import isolated_bound, sar_upper_bound
from .cluster import CLUSTER_POLICY, ROUTERS, ClusterSimConfig, per_box_name, route, run_cluster_task
from .workload import WorkloadSpec, make_trace


def trace_bounds(spec: WorkloadSpec, profile: str, cluster: ClusterSimConfig, *, time_limit_s: float = 90.0,
                 tau_s: float = 0.25, routers: Sequence[str] = ("least-loaded",),
                 policies: bool = True) -> dict[str, Any]:
    """The bounds above for one trace, and (``policies``) every cluster-section policy's SAR on it."""
    from .bench import _cost

    cost = _cost(profile)
    trace = make_trace(spec)
    timed = [r for r in trace if r.deadline_at is not None]
    num_gpus = cluster.num_nodes * cluster.gpus_per_node
    pooled = sar_upper_bound(trace, cost, num_gpus, tau_s=tau_s, time_limit_s=time_limit_s,
                             max_degree=cluster.gpus_per_node)
    out: dict[str, Any] = {
        "num_requests": len(timed),
        "isolated": isolated_bound(trace, cost, cluster.gpus_per_node),
        "pooled": pooled.sar, "pooled_status": pooled.status, "pooled_gap": pooled.mip_gap,
        "pooled_solve_s": pooled.solve_s, "per_box": {}, "sar": {},
    }
    for router in routers:
        boxes = route(trace, router, cost, cluster, seed=spec.seed)
        on_time, solve_s = 0, 0.0
        for box in boxes:
            sub = [o.request for o in box.result(profile).outcomes]
            b = sar_upper_bound(sub, cost, cluster.gpus_per_node, tau_s=tau_s, time_limit_s=time_limit_s)
            on_time += b.num_on_time
            solve_s += b.solve_s
        out["per_box"][per_box_name(router)] = on_time / len(timed) if timed else float("nan")
    if policies:
        for name, task in [(CLUSTER_POLICY, "tetriserve")] + [(per_box_name(r), f"route:{r}") for r in ROUTERS]:
            out["sar"][name] = run_cluster_task((task, spec, profile, cluster))["sar"]
    return out


def _task(args: tuple) -> dict[str, Any]:
    spec, profile, cluster, time_limit_s, routers = args
    return trace_bounds(spec, profile, cluster, time_limit_s=time_limit_s, routers=routers)


def summarise(rows: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """{mix: {scale: [trace_bounds, ...]}} -> means per scale and over the scales, and the largest gain
    over the best routing that the pooled bound leaves room for."""
    out: dict[str, Any] = {}
    for mix, by_scale in rows.items():
        per_scale = {}
        for s, runs in by_scale.items():
            cell = {k: statistics.fmean(r[k] for r in runs) for k in ("isolated", "pooled")}
            for key in ("per_box", "sar"):
                for name in runs[0][key]:
                    cell[f"{key}:{name}" if key == "per_box" else name] = statistics.fmean(r[key][name] for r in runs)
            per_scale[s] = cell
        names = [CLUSTER_POLICY] + [per_box_name(r) for r in ROUTERS]
        mean = {k: statistics.fmean(c[k] for c in per_scale.values()) for k in next(iter(per_scale.values()))}
        best_routing = max(mean[per_box_name(r)] for r in ROUTERS)
        out[mix] = {
            "per_scale": per_scale, "mean": mean,
            "best_routing": max((per_box_name(r) for r in ROUTERS), key=lambda n: mean[n]),
            "max_gain_over_best_routing": mean["pooled"] / best_routing - 1,
            "cluster_gain_over_best_routing": mean[CLUSTER_POLICY] / best_routing - 1,
            "policies": names,
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from .bench import _map

    p = argparse.ArgumentParser(prog="python -m comfy_tetriserve.sim.cluster_bound", description=__doc__.split("\n")[0])
    p.add_argument("--mix", nargs="+", default=["skewed"])
    p.add_argument("--scales", nargs="+", type=float, default=[1.0, 1.1, 1.2, 1.3, 1.4, 1.5])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--num-requests", type=int, default=600, help="requests per trace (the cluster section: 600)")
    p.add_argument("--rate-per-min", type=float, default=24.0)
    p.add_argument("--time-limit-s", type=float, default=90.0, help="per MILP; past it the proven dual bound counts")
    p.add_argument("--routers", nargs="*", default=["least-loaded"], help="per-box bounds behind these routers")
    p.add_argument("--profile", default="h200")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    cluster = ClusterSimConfig()
    keys, tasks = [], []
    for mix in a.mix:
        for scale in a.scales:
            for seed in range(a.seeds):
                spec = WorkloadSpec(num_requests=a.num_requests, rate_per_min=a.rate_per_min, num_steps=50,
                                    model="flux-dev", mix=mix, slo_scale=scale, seed=seed)
                keys.append((mix, f"{scale:.1f}"))
                tasks.append((spec, a.profile, cluster, a.time_limit_s, tuple(a.routers)))
    started = time.perf_counter()
    results = _map(_task, tasks, a.jobs)
    rows: dict = {}
    for (mix, s), r in zip(keys, results):
        rows.setdefault(mix, {}).setdefault(s, []).append(r)
    report = {"summary": summarise(rows), "traces": rows, "runtime_s": time.perf_counter() - started,
              "setting": {"num_nodes": cluster.num_nodes, "gpus_per_node": cluster.gpus_per_node,
                          "num_requests": a.num_requests, "rate_per_min": a.rate_per_min, "seeds": a.seeds,
                          "time_limit_s": a.time_limit_s, "tau_s": 0.25, "profile": a.profile,
                          "note": "simulated on the cost model; bounds from sim/cluster_bound.py"}}
    for mix, m in report["summary"].items():
        cols = ["isolated", "pooled"] + [f"per_box:{per_box_name(r)}" for r in a.routers] + m["policies"]
        print(f"{mix}: " + " | ".join(cols))
        for s, c in m["per_scale"].items():
            print(f"  {s}: " + " | ".join(f"{c[k]:.3f}" for k in cols))
        print("  mean: " + " | ".join(f"{m['mean'][k]:.3f}" for k in cols))
        print(f"  pooled bound / best routing ({m['best_routing']}): {100 * m['max_gain_over_best_routing']:+.1f} %;"
              f" cluster-wide / best routing: {100 * m['cluster_gain_over_best_routing']:+.1f} %")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
