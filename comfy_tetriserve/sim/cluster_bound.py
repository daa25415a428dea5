"""How far the bench's ``cluster`` section is from the best any schedule could do.

For each trace of the cluster section (2 boxes x 8 GPUs, the full 600-request traces), three upper
bounds on SAR, and the policies' SAR on the same trace:

- ``pooled``: the offline program of ``sim/bound.py`` (its fluid form unless ``--patterns``) over all the cluster's GPUs pooled, with no
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
import math
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from .bound import isolated_bound, sar_upper_bound
from .cluster import CLUSTER_TASKS, ROUTERS, ClusterSimConfig, per_box_name, route, run_cluster_task
from .workload import WorkloadSpec, make_trace


def trace_bounds(spec: WorkloadSpec, profile: str, cluster: ClusterSimConfig, *, time_limit_s: float = 90.0,
                 tau_s: float = 0.25, routers: Sequence[str] = ("least-loaded",), milp: bool = True,
                 policies: bool = True, patterns: bool = False) -> dict[str, Any]:
    """The bounds above for one trace (``milp``: also the programs; else only the isolated bound), and
    (``policies``) every cluster-section policy's SAR on it. ``bound`` is the tightest of them.
    ``patterns``: the programs with bound.py's instantaneous-pattern rows and event rounds (tighter,
    slower) and its batched pairs; off for the 600-request traces, whose recorded bounds are of the
    fluid program. That program does not let two requests share a step; on the single-box bound
    traces letting them never changed the optimum (docs/planner.md *The offline bound*)."""
    from .bench import _cost

    cost = _cost(profile)
    trace = make_trace(spec)
    timed = [r for r in trace if r.deadline_at is not None]
    num_gpus = cluster.num_nodes * cluster.gpus_per_node
    iso = isolated_bound(trace, cost, cluster.gpus_per_node)
    out: dict[str, Any] = {"num_requests": len(timed), "isolated": iso, "bound": iso, "per_box": {}, "sar": {}}
    if milp:
        pooled = sar_upper_bound(trace, cost, num_gpus, tau_s=tau_s, time_limit_s=time_limit_s,
                                 max_degree=cluster.gpus_per_node, patterns=patterns,
                                 event_rounds=patterns, pairs=patterns)
        gap = pooled.mip_gap if math.isfinite(pooled.mip_gap) else None  # no incumbent within the limit: None
        out.update(pooled=pooled.sar, pooled_status=pooled.status, pooled_gap=gap,
                   pooled_solve_s=pooled.solve_s, bound=min(iso, pooled.sar))
        for router in routers:
            boxes = route(trace, router, cost, cluster, seed=spec.seed)
            on_time = 0
            for box in boxes:
                sub = [o.request for o in box.result(profile).outcomes]
                on_time += sar_upper_bound(sub, cost, cluster.gpus_per_node, tau_s=tau_s,
                                           time_limit_s=time_limit_s, patterns=patterns,
                                           event_rounds=patterns, pairs=patterns).num_on_time
            out["per_box"][per_box_name(router)] = on_time / len(timed) if timed else float("nan")
    if policies:
        for name, task in list(CLUSTER_TASKS.items()) + [(per_box_name(r), f"route:{r}") for r in ROUTERS]:
            out["sar"][name] = run_cluster_task((task, spec, profile, cluster))["sar"]
    return out


def _task(args: tuple) -> dict[str, Any]:
    spec, profile, cluster, time_limit_s, routers, milp, policies, patterns = args
    return trace_bounds(spec, profile, cluster, time_limit_s=time_limit_s, routers=routers, milp=milp,
                        policies=policies, patterns=patterns)


def summarise(rows: dict[str, dict[str, list[dict[str, Any]]]],
              sar: dict[str, dict[str, dict[str, float]]] | None = None) -> dict[str, Any]:
    """{mix: {scale: [trace_bounds, ...]}} -> means per scale and over the scales, and the largest gain
    over the best routing that the bound leaves room for. ``sar`` ({mix: {scale: {policy: SAR}}}, e.g.
    the cluster section's report on the same traces) supplies the policies' SAR when the rows lack it."""
    out: dict[str, Any] = {}
    for mix, by_scale in rows.items():
        per_scale = {}
        for s, runs in sorted(by_scale.items()):
            cell = {k: statistics.fmean(r[k] for r in runs) for k in ("isolated", "bound")}
            for name in runs[0]["per_box"]:
                cell[f"per_box:{name}"] = statistics.fmean(r["per_box"][name] for r in runs)
            if runs[0]["sar"]:
                for name in runs[0]["sar"]:
                    cell[name] = statistics.fmean(r["sar"][name] for r in runs)
            elif sar is not None:
                cell.update(sar[mix][s])
            per_scale[s] = cell
        first = next(iter(per_scale.values()))
        mean = {k: statistics.fmean(c[k] for c in per_scale.values()) for k in first}
        routed = [k for k in first if k.startswith("per-box ")]
        entry: dict[str, Any] = {"per_scale": per_scale, "mean": mean}
        if routed:
            best = max(routed, key=lambda n: mean[n])
            entry.update(best_routing=best, max_gain_over_best_routing=mean["bound"] / mean[best] - 1)
            entry.update({f"gain_over_best_routing:{k}": mean[k] / mean[best] - 1
                          for k in first if k.startswith("cluster-wide")})
        out[mix] = entry
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from concurrent.futures import ProcessPoolExecutor, as_completed

    p = argparse.ArgumentParser(prog="python -m comfy_tetriserve.sim.cluster_bound", description=__doc__.split("\n")[0])
    p.add_argument("--mix", nargs="+", default=["skewed"])
    p.add_argument("--scales", nargs="+", type=float, default=[1.0, 1.1, 1.2, 1.3, 1.4, 1.5])
    p.add_argument("--milp-scales", nargs="*", type=float, default=None,
                   help="scales whose traces get the programs (default: all); the others only the isolated bound")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--num-requests", type=int, default=600, help="requests per trace (the cluster section: 600)")
    p.add_argument("--rate-per-min", type=float, default=24.0)
    p.add_argument("--time-limit-s", type=float, default=90.0, help="per MILP; past it the proven dual bound counts")
    p.add_argument("--routers", nargs="*", default=["least-loaded"], help="per-box bounds behind these routers")
    p.add_argument("--sar-from", default="", help="the cluster section's report.json: the policies' SAR from it "
                                                   "(same traces) instead of simulating them here")
    p.add_argument("--traces-from", default="", help="an earlier --out: summarise its traces again (with --sar-from)"
                                                      " instead of solving")
    p.add_argument("--no-policies", action="store_true", help="bounds only (the policies' SAR from --sar-from later)")
    p.add_argument("--patterns", action="store_true",
                   help="the programs with the instantaneous-pattern rows, event rounds and batched pairs of "
                        "sim/bound.py (tighter, slower)")
    p.add_argument("--profile", default="h200")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    cluster = ClusterSimConfig()
    milp_scales = set(a.scales if a.milp_scales is None else a.milp_scales)
    keys, tasks = [], []
    for mix in a.mix:
        for scale in a.scales:
            for seed in range(a.seeds):
                spec = WorkloadSpec(num_requests=a.num_requests, rate_per_min=a.rate_per_min, num_steps=50,
                                    model="flux-dev", mix=mix, slo_scale=scale, seed=seed)
                keys.append((mix, f"{scale:.1f}"))
                tasks.append((spec, a.profile, cluster, a.time_limit_s, tuple(a.routers), scale in milp_scales,
                              not (a.sar_from or a.no_policies), a.patterns))
    sar = None
    if a.sar_from:
        with open(a.sar_from) as f:
            sar = json.load(f)["cluster"]["sar"]
    started = time.perf_counter()
    results: list = [None] * len(tasks)
    if a.traces_from:
        with open(a.traces_from) as f:
            earlier = json.load(f)
        rows = earlier["traces"]
        return _report(a, rows, sar, earlier["runtime_s"], earlier["setting"])
    with ProcessPoolExecutor(max_workers=max(a.jobs, 1)) as pool:
        futures = {pool.submit(_task, t): i for i, t in enumerate(tasks)}
        for fut in as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            print(json.dumps({"mix": keys[i][0], "scale": keys[i][1], "seed": tasks[i][0].seed, **results[i]}),
                  flush=True)
    rows: dict = {}
    for (mix, s), r in zip(keys, results):
        rows.setdefault(mix, {}).setdefault(s, []).append(r)
    setting = {"num_nodes": cluster.num_nodes, "gpus_per_node": cluster.gpus_per_node,
               "num_requests": a.num_requests, "rate_per_min": a.rate_per_min, "seeds": a.seeds,
               "time_limit_s": a.time_limit_s, "tau_s": 0.25, "profile": a.profile,
               "milp_scales": sorted(milp_scales), "patterns": a.patterns,
               "note": "simulated on the cost model; bounds from sim/cluster_bound.py"}
    return _report(a, rows, sar, time.perf_counter() - started, setting)


def _report(a, rows: dict, sar: dict | None, runtime_s: float, setting: dict) -> int:
    report = {"summary": summarise(rows, sar), "traces": rows, "runtime_s": runtime_s,
              "setting": {**setting, "sar_from": a.sar_from or None}}
    for mix, m in report["summary"].items():
        cols = list(next(iter(m["per_scale"].values())))
        print(f"{mix}: " + " | ".join(cols))
        for s, c in m["per_scale"].items():
            print(f"  {s}: " + " | ".join(f"{c[k]:.3f}" for k in cols))
        print("  mean: " + " | ".join(f"{m['mean'][k]:.3f}" for k in cols))
        for k, v in m.items():
            if k.startswith("max_gain") or k.startswith("gain_over"):
                print(f"  {k} ({m['best_routing']}): {100 * v:+.1f} %")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
