#!/usr/bin/env python3
"""How much could TetriServe gain if scale-up knew when the next request arrives? (simulated, h200)

    python scripts/arrival_oracle.py [--rates 120 180] [--scales 1.0 1.5] [--seeds 3]

Overload of small images (256/512 px only, the bench's ``overload`` section). Each round the
oracle variant caps every scale-up grant (a degree beyond the request's plan) to end by the next
arrival of the trace, so an arrival never waits for GPUs that scale-up took: the best that
preempting scale-up grants on arrival could do, with perfect knowledge and no cost for stopping.
It is the default planner with ``scale_up_commit_s`` set, per round, to the time until the next
arrival. Every number comes from the ``h200`` cost model.
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class ArrivalOracle:
    """The default planner, its scale-up grants cut at the next arrival of ``arrivals_at``."""

    name = "tetriserve-oracle"

    def __init__(self, policy, arrivals_at: list[float]) -> None:
        self.policy = policy
        self.arrivals_at = arrivals_at

    def plan_round(self, view, cost):
        i = bisect.bisect_right(self.arrivals_at, view.now + 1e-12)
        if i >= len(self.arrivals_at):
            return self.policy.plan_round(view, cost)
        commit = max(self.arrivals_at[i] - view.now, 1e-6)
        return dataclasses.replace(self.policy, scale_up_commit_s=commit).plan_round(view, cost)


def main() -> int:
    from comfy_tetriserve.cost import load_cost_model
    from comfy_tetriserve.policy import make_policy
    from comfy_tetriserve.sim.simulator import SimConfig, simulate
    from comfy_tetriserve.sim.workload import WorkloadSpec, make_trace

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[120.0, 180.0])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    cost = load_cost_model("h200")
    print("small images (256/512 px), h200 cost model, 8 GPUs, 300 requests; SAR mean over "
          f"{args.seeds} seeds")
    print(f"{'setting':>14s} {'tetriserve':>11s} {'+ oracle':>9s} {'edf':>7s}")
    for rate in args.rates:
        for scale in args.scales:
            sar: dict[str, list[float]] = {"tetriserve": [], "oracle": [], "edf": []}
            for seed in range(args.seeds):
                trace = make_trace(WorkloadSpec(mix="small", rate_per_min=rate, slo_scale=scale, seed=seed))
                arrivals = sorted(r.arrival_at for r in trace)
                base = make_policy("tetriserve")
                for name, policy in (("tetriserve", base), ("oracle", ArrivalOracle(base, arrivals)),
                                     ("edf", make_policy("edf"))):
                    sar[name].append(simulate(trace, policy, cost, SimConfig()).sar())
            print(f"{f'{rate:g}/min {scale:g}x':>14s} " + " ".join(
                f"{statistics.fmean(sar[k]):{w}.3f}" for k, w in (("tetriserve", 11), ("oracle", 9), ("edf", 7))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
