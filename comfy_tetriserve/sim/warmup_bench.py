"""Warm-up priced vs ignored, in the simulator (modelled).

The simulated engine charges every first step at a step shape a device group has not captured
``capture_steps`` x the step time more (sim/simulator.py, core/warmup.py: a cache of 16 graphs a
device, least recently used out). Two TetriServe planners run on the same traces:

- ``priced``: its cost model has the same ``capture_steps``: it sees the warm keys, prefers warm
  groups and degrees, and counts a cold group's capture in allocation, admission and round steps;
- ``ignored``: its cost model has ``capture_steps`` 0 (the warm-up is invisible to it), while the
  simulated engine still charges it;

and, for reference, ``no capture``: the same planner on an engine without any warm-up.

    python -m comfy_tetriserve.sim.warmup_bench --capture-steps 3 10 --out out/warmup.json

Every number is modelled: the profile's step times (``--profile``, default ``h200``) plus the
assumed ``capture_steps`` (not measured on a GPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ..cost import ProfileCostModel, load_cost_model
from ..policy import make_policy
from .simulator import SimConfig, simulate
from .workload import WorkloadSpec, make_trace

VARIANTS = ("priced", "ignored", "no capture")


def with_capture_steps(cost: ProfileCostModel, capture_steps: float) -> ProfileCostModel:
    """``cost`` whose first step at a new shape costs ``capture_steps`` extra step times."""
    extra = {**cost.table.extra, "capture_steps": float(capture_steps)}
    return ProfileCostModel(dataclasses.replace(cost.table, extra=extra))


def run_case(case: tuple) -> float:
    """SAR of one (profile, variant, capture_steps, mix, scale, seed, num_requests, rate, num_gpus
    [, TetriServe options])."""
    profile, variant, capture, mix, scale, seed, num_requests, rate, num_gpus, *rest = case
    options = dict(rest[0]) if rest else {}
    base = load_cost_model(profile)
    charged = with_capture_steps(base, capture if variant != "no capture" else 0.0)
    planner = charged if variant != "ignored" else with_capture_steps(base, 0.0)
    trace = make_trace(WorkloadSpec(num_requests=num_requests, rate_per_min=rate, num_steps=50, model="flux-dev",
                                    mix=mix, slo_scale=scale, seed=seed))
    res = simulate(trace, make_policy("tetriserve", **options), planner, SimConfig(num_gpus=num_gpus), true_cost=charged,
                   cost_name=profile)
    return res.sar()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="h200")
    ap.add_argument("--capture-steps", type=float, nargs="+", default=[3.0, 10.0])
    ap.add_argument("--mixes", nargs="+", default=["uniform", "skewed"])
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.2, 1.5])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rate", type=float, default=12.0, help="arrivals per minute")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--warmup-allocation", action="store_true",
                    help="the priced planner also prices warm-up in its allocation and round options")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    cases = []
    for capture in args.capture_steps:
        for variant in VARIANTS:
            if variant == "no capture" and capture != args.capture_steps[0]:
                continue
            for mix in args.mixes:
                for scale in args.scales:
                    for seed in range(args.seeds):
                        options = (("warmup_allocation", True),) if args.warmup_allocation else ()
                        cases.append((args.profile, variant, capture, mix, scale, seed, args.requests, args.rate,
                                      args.gpus, options))
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        sars = list(pool.map(run_case, cases))
    table: dict[str, dict[str, dict[str, float]]] = {}
    for case, sar in zip(cases, sars):
        _, variant, capture, mix, scale, *_ = case
        name = variant if variant == "no capture" else f"{variant}, capture {capture:g} steps"
        table.setdefault(name, {}).setdefault(mix, {}).setdefault(f"{scale:g}", []).append(sar)
    out = {name: {mix: {s: statistics.fmean(v) for s, v in by_scale.items()} for mix, by_scale in by_mix.items()}
           for name, by_mix in table.items()}
    cols = [(mix, f"{s:g}") for mix in args.mixes for s in args.scales]
    print("| planner | " + " | ".join(f"{m} {s}" for m, s in cols) + " |")
    print("| --- |" + " --- |" * len(cols))
    for name, by_mix in out.items():
        print(f"| {name} | " + " | ".join(f"{by_mix[m][s]:.3f}" for m, s in cols) + " |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"profile": args.profile, "seeds": args.seeds,
                                              "warmup_allocation": args.warmup_allocation,
                                              "requests": args.requests, "sar": out}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
