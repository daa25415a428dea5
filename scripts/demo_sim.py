#!/usr/bin/env python3
"""The CPU demo's workload in the simulator: many seeds in seconds, on a model of a shared-core box.

    python scripts/demo_sim.py [--seeds 10] [--load 0.65] [--cores 2] [--planned FILE] [--alone FILE]

The planner prices steps with ``--planned`` (the demo's profile: each point measured with the
other workers busy, and the measured parallel capacity); steps *run* at ``--alone`` (the same
points measured one request at a time), slowed while more workers are busy than ``--cores``
(simulator ``shared_cores``: processor sharing, 4 busy workers on 2 cores step 2.2x slower).
The jobs are the demo's (demo.workload, same seeds, deadlines from the planned profile).
``--no-capacity`` drops the parallel capacity from the planned profile. Defaults: the two
profiles of the 2-core development machine kept in docs/bench/demo/. A model, not a
measurement: the README's demo numbers are measured; this shows the trend over more seeds.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEMO_PROFILES = ROOT / "docs" / "bench" / "demo"


def main() -> int:
    from comfy_tetriserve.cost import ProfileCostModel, load_profile
    from comfy_tetriserve.demo.workload import WorkloadSpec, default_shapes, make_workload
    from comfy_tetriserve.policy import make_policy
    from comfy_tetriserve.sim.simulator import SimConfig, simulate
    from comfy_tetriserve.types import GenRequest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planned", default=str(DEMO_PROFILES / "profile-loaded.json"))
    parser.add_argument("--alone", default=str(DEMO_PROFILES / "profile-alone.json"))
    parser.add_argument("--cores", type=float, default=2.0)
    parser.add_argument("--load", type=float, default=WorkloadSpec().load)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--policies", nargs="+", default=["tetriserve", "sp1", "sp2", "edf"])
    parser.add_argument("--no-capacity", action="store_true", help="plan without the parallel capacity")
    parser.add_argument("--dispatch-ms", type=float, default=5.0, help="control-plane time per assignment")
    args = parser.parse_args()

    planned_table = load_profile(args.planned)
    if args.no_capacity:
        extra = {k: v for k, v in planned_table.extra.items() if k != "parallel_capacity"}
        planned_table = dataclasses.replace(planned_table, extra=extra)
    planned, alone = ProfileCostModel(planned_table), ProfileCostModel(load_profile(args.alone))
    shapes = default_shapes({"flux": "tiny-flux.safetensors", "sd3": "tiny-sd3.safetensors"})
    config = SimConfig(num_gpus=4, dispatch_overhead_s=args.dispatch_ms / 1000, shared_cores=args.cores)
    print(f"demo workload (load {args.load:g}, {args.seeds} seeds), 4 workers on {args.cores:g} shared cores; "
          f"planned with {Path(args.planned).name} (parallel capacity {planned.parallel_capacity}), "
          f"steps from {Path(args.alone).name}")
    sar: dict[str, list[float]] = {p: [] for p in args.policies}
    for seed in range(args.seeds):
        jobs = make_workload(planned, shapes, WorkloadSpec(load=args.load, seed=seed))
        trace = [GenRequest(f"j{j.index:02d}", j.shape.model, j.shape.res, j.shape.res, j.steps, j.arrival_s,
                            None if j.deadline_s is None else j.arrival_s + j.deadline_s) for j in jobs]
        for p in args.policies:
            sar[p].append(simulate(trace, make_policy(p), planned, config, true_cost=alone).sar())
    for p, xs in sar.items():
        print(f"{p:11s} SAR {statistics.fmean(xs):.3f} ± {statistics.pstdev(xs):.3f}   "
              + " ".join(f"{x:.2f}" for x in xs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
