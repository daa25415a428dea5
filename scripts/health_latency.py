#!/usr/bin/env python3
"""How fast the service answers /v1/health while it plans: 256 open jobs and 50 submits/s, sim devices.

    .venv/bin/python scripts/health_latency.py [--seconds 20] [--open-jobs 256] [--rate 50]
    .venv/bin/python scripts/health_latency.py --service-root /path/to/other/checkout   # compare a build

Starts ``comfy-tetriserve serve --devices sim:8`` (TetriServe, the h200 profile, steps slowed 100x so
jobs stay open) in its own process, fills it with OPEN_JOBS 1024 px FLUX-dev jobs with deadlines, then
for SECONDS submits RATE jobs per second (and cancels as many of the oldest, so the open count holds)
while a prober in its own process asks GET /v1/health every 20 ms. Prints p50 / p99 / max of the health
answers and of the submits. The load runs in this process, the service in its own.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import subprocess
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # job bodies and free ports from the service test helpers

from service_helpers import free_port, job_body  # noqa: E402


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * p / 100), len(ordered) - 1)] if ordered else float("nan")


async def wait_ready(session: aiohttp.ClientSession, url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with {proc.returncode}")
        try:
            async with session.get(url + "/v1/models/flux-dev") as resp:
                if resp.status == 200 and (await resp.json())["status"] == "loaded":
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("the service did not start")


async def submit(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[str, float]:
    t = time.perf_counter()
    async with session.post(url + "/v1/jobs", data=body) as resp:
        answer = await resp.json()
        if resp.status != 202:
            raise SystemExit(f"submit refused: {answer}")
    return answer["job_id"], time.perf_counter() - t


async def probe_health(url: str, seconds: float) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as session:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            async with session.get(url + "/v1/health") as resp:
                await resp.read()
            out.append(time.perf_counter() - t)
            await asyncio.sleep(0.02)
    return out


def probe_health_process(url: str, seconds: float) -> list[float]:
    """The health prober, in a process of its own: the load's client work cannot delay its timings."""
    return asyncio.run(probe_health(url, seconds))


async def run(args: argparse.Namespace) -> None:
    port = free_port()
    url = args.url or f"http://127.0.0.1:{port}"
    root = Path(args.service_root).resolve() if args.service_root else ROOT
    env = dict(os.environ, PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "comfy_tetriserve", "serve", "--port", str(port), "--devices", "sim:8",
           "--model", "flux-dev=sim:flux", "--policy", "tetriserve", "--cost", "h200", "--sim-time-scale", "100",
           "--journal", "off", "--max-open-jobs", "2000", "--max-open-jobs-per-tenant", "2000", *args.serve_arg]
    log = open(args.service_log, "wb") if args.service_log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd if not args.url else [sys.executable, "-c", "import time; time.sleep(1e6)"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    bodies = [job_body({"model": "flux-dev", "steps": 28, "deadline_s": 120 + i % 60, "tenant": f"t{i % 4}"},
                       res=1024, seed=i) for i in range(16)]
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(session, url, proc)
            open_ids: deque[str] = deque()
            for i in range(args.open_jobs):
                open_ids.append((await submit(session, url, bodies[i % len(bodies)]))[0])
            submits: list[float] = []
            prober_pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            prober_pool.submit(int).result()  # started before the load begins
            prober = asyncio.get_running_loop().run_in_executor(prober_pool, probe_health_process, url, args.seconds)

            async def one(body: bytes) -> None:  # a submit, then the oldest open job cancelled
                job_id, took = await submit(session, url, body)
                submits.append(took)
                open_ids.append(job_id)
                async with session.post(f"{url}/v1/jobs/{open_ids.popleft()}/cancel") as resp:
                    await resp.read()

            t0 = time.perf_counter()
            i = 0
            tasks = []
            while time.perf_counter() - t0 < args.seconds:  # submits start on time, whatever the answers take
                await asyncio.sleep(max(0.0, t0 + i / args.rate - time.perf_counter()))
                tasks.append(asyncio.ensure_future(one(bodies[i % len(bodies)])))
                i += 1
            await asyncio.gather(*tasks)
            health = await prober
            prober_pool.shutdown()
            achieved = i / (time.perf_counter() - t0)
            async with session.get(url + "/v1/jobs") as resp:
                still_open = sum(1 for j in (await resp.json())["jobs"]
                                 if j["status"] in ("queued", "running", "waiting"))
            async with session.get(url + "/v1/metrics") as resp:
                metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in (await resp.text()).splitlines()
                           if line.startswith("tetriserve_round_decision_seconds_")}
    finally:
        proc.terminate()
        proc.wait(30)
    ms = lambda v: f"{v * 1000:7.1f} ms"  # noqa: E731
    print(f"service: {root}  ({args.open_jobs} open jobs at the start, {still_open} at the end, "
          f"{achieved:.1f} submits/s for {args.seconds:g} s)")
    print(f"GET /v1/health  n={len(health):5d}  p50 {ms(percentile(health, 50))}  p99 {ms(percentile(health, 99))}"
          f"  max {ms(max(health))}")
    rounds = metrics.get("tetriserve_round_decision_seconds_count", 0.0)
    if rounds:
        print(f"planning rounds (on the loop): {rounds:.0f}, mean "
              f"{metrics['tetriserve_round_decision_seconds_sum'] / rounds * 1000:.1f} ms")
    print(f"POST /v1/jobs   n={len(submits):5d}  p50 {ms(percentile(submits, 50))}  p99 {ms(percentile(submits, 99))}"
          f"  max {ms(max(submits))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--open-jobs", type=int, default=256)
    parser.add_argument("--rate", type=float, default=50.0, help="submits per second")
    parser.add_argument("--service-log", help="write the service's output here (with PYTHONASYNCIODEBUG=1 it "
                                              "names every callback that held the loop over 100 ms)")
    parser.add_argument("--url", help="drive a service already running there (started like the one above)")
    parser.add_argument("--service-root", help="run the service of this checkout (default: this one)")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="one more argument for the service's command line (repeat: --serve-arg=--gil-switch-ms "
                             "--serve-arg=5)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
