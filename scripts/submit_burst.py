#!/usr/bin/env python3
"""Back-to-back submits to a simulated service: a forecast on every submit against the forecast budget.

    .venv/bin/python scripts/submit_burst.py [--jobs 300]

A `sim:8` service (TetriServe, the h200 profile, steps slowed 100x so that every job stays open)
gets JOBS 1024 px FLUX-dev submits one after another from four tenants, once with the submit-time
forecast always run (FORECAST_SYNC_BUDGET_S = inf) and once with the service's budget. Prints the
total time and the p50 / p99 time per submit of each, side by side.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the service test helpers (an in-process service on a real port)

import aiohttp  # noqa: E402
from service_helpers import job_body, make_service_app, running_service, submit_json  # noqa: E402

from comfy_tetriserve.cost import load_cost_model  # noqa: E402
from comfy_tetriserve.policy import make_policy  # noqa: E402
from comfy_tetriserve.service import loop as loop_module  # noqa: E402


async def burst(num_jobs: int, budget_s: float) -> tuple[float, float, float]:
    loop_module.FORECAST_SYNC_BUDGET_S = budget_s
    app, _ = make_service_app(num_gpus=8, policy=make_policy("tetriserve"), cost=load_cost_model("h200"),
                              model=("flux-dev=sim:flux",), time_scale=100.0)
    seconds = []
    async with running_service(app) as url, aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        for i in range(num_jobs):
            t = time.perf_counter()
            settings = {"model": "flux-dev", "steps": 50, "deadline_s": 30, "seed": i, "tenant": f"t{i % 4}"}
            status, answer = await submit_json(session, url, job_body(settings, res=1024))
            if status != 202:
                raise SystemExit(f"submit {i} refused: {answer}")
            seconds.append(time.perf_counter() - t)
        total = time.perf_counter() - t0
    seconds.sort()
    return total, seconds[len(seconds) // 2], seconds[min(int(len(seconds) * 0.99), len(seconds) - 1)]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    args = parser.parse_args()
    budget = loop_module.FORECAST_SYNC_BUDGET_S
    for name, b in (("forecast on every submit", float("inf")), (f"budget {budget * 1000:g} ms", budget)):
        total, p50, p99 = await burst(args.jobs, b)
        print(f"{name:26s} {args.jobs} submits in {total:6.2f} s   per submit p50 {p50 * 1000:6.1f} ms"
              f"   p99 {p99 * 1000:6.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
