#!/usr/bin/env python3
"""Measure the engine's per-step control costs on this machine (CPU by default).

    python scripts/measure_overheads.py [--devices cpu:2] [--px 256 1024] [--reps 20] [--json FILE]

1. The agreed stop: each rank's stop flag rides in the gather that ends the step. Timed in a
   two-rank group: the end-of-step gather of a 1024 px FLUX-shaped output (4096 x 64 values per
   sample) with and without the extra element, and, for comparison, the separate one-element
   all-reduce a flag collective would add per step.
2. The hand-off: wall time of a one-step assignment through the pool when the latent is already on
   the group (local), when a member of the new group broadcasts it (bcast), and when the pool sends
   its checkpoint (pool); the differences to "local" are what a group change costs.
3. A move to a group none of whose members holds the latest step ((0, 1) <-> (2, 3) on four workers):
   the pool's checkpoint in one member's message, broadcast by it (seed, the default), against the
   checkpoint in every member's message (``seed_broadcast=False``), alternating in one run: the
   event loop's CPU time per assignment (what pickling the messages costs it) and the wall time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.multiprocessing as tmp  # noqa: E402


def _flag_rank(rank: int, store: str, reps: int, queue) -> None:
    import torch.distributed as dist

    from comfy_tetriserve.worker.parallel import GroupComm, gather_tokens

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    comm = GroupComm(None, (0, 1), rank)
    local = torch.randn(1, 2048, 64)
    sizes = (2048, 2048)

    def plain():  # gather_tokens' own work without the flag element
        b, n, c = local.shape
        width = b * max(sizes) * c
        buf = local.new_zeros(width)
        buf[: b * n * c] = local.reshape(-1)
        out = comm.all_gather_flat(buf)
        torch.cat([out[r, : b * sizes[r] * c].view(b, sizes[r], c) for r in range(2)], dim=1)

    def piggyback():
        gather_tokens(local, sizes, comm, vote=0.0)

    def separate_flag():
        comm.all_reduce_max(torch.zeros(1))

    out = {}
    for name, fn in (("gather_plain_us", plain), ("gather_with_flag_us", piggyback),
                     ("separate_flag_allreduce_us", separate_flag)):
        for _ in range(5):
            fn()
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = round(statistics.median(times) * 1e6, 1)
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def measure_flag(reps: int) -> dict:
    ctx = tmp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_flag_rank, args=(r, os.path.join(d, "store"), reps, queue)) for r in range(2)]
        for p in procs:
            p.start()
        out = queue.get(timeout=300)
        for p in procs:
            p.join(timeout=60)
    return out


async def _pool_with_job(devices: str, px: int, steps: int, request_id: str):
    """A started pool with the tiny FLUX loaded and one admitted job of ``steps`` steps at ``px``."""
    from comfy_tetriserve.core.executor import SamplingJob
    from comfy_tetriserve.worker.samplers import compute_sigmas, prepare_noise
    from comfy_tetriserve.worker.pool import WorkerPool

    pool = WorkerPool(devices)
    await pool.start()
    try:
        await pool.load_model("tiny", "random:tiny-flux", "fp32")
        g = torch.Generator().manual_seed(0)
        latent = torch.zeros(1, 16, px // 8, px // 8)
        job = SamplingJob(request_id=request_id, model="tiny", latent=latent, noise=prepare_noise(latent, 0),
                          sigmas=compute_sigmas("flux", "simple", steps), context=torch.randn(1, 64, 32, generator=g),
                          pooled=torch.randn(1, 16, generator=g), guidance=3.5)
        await pool.admit(job)
    except BaseException:
        await pool.close()
        raise
    return pool, latent.numel() * 4


async def measure_handoff(devices: str, px: int, reps: int) -> dict:
    from comfy_tetriserve.types import Assignment

    pool, latent_bytes = await _pool_with_job(devices, px, 6 * reps + 2, "h")
    try:
        times: dict[str, list[float]] = {"bcast": [], "local_k2": [], "pool": [], "local_k1": []}

        async def one(group, kind=None):
            t0 = time.perf_counter()
            r = await pool.execute(Assignment(("h",), group, 1))
            assert r.error is None, r.error
            if kind:
                times[kind].append(time.perf_counter() - t0)

        await one((0, 1))  # warm both workers (conditioning sent)
        for _ in range(reps):
            await one((0,))                # worker 0 holds the latest step, worker 1 does not
            await one((0, 1), "bcast")     # worker 0 broadcasts it within {0, 1}
            await one((0, 1), "local_k2")  # both hold it
            await one((0,))
            await one((1,), "pool")        # worker 1 is stale: the pool sends its checkpoint
            await one((1,), "local_k1")
        med = {k: statistics.median(v) * 1e3 for k, v in times.items() if v}
        stats = {k: round(statistics.median(v) * 1e3, 3) for k, v in pool.stats.items() if v}
        return {"px": px, "latent_bytes": latent_bytes,
                "assignment_ms": {k: round(v, 3) for k, v in med.items()},
                "bcast_extra_ms": round(med["bcast"] - med["local_k2"], 3),
                "pool_extra_ms": round(med["pool"] - med["local_k1"], 3),
                "worker_side_handoff_ms": stats}
    finally:
        await pool.close()


async def measure_seed(devices: str, px: int, reps: int) -> dict:
    from comfy_tetriserve.types import Assignment

    pool, latent_bytes = await _pool_with_job(devices, px, 4 * reps + 3, "s")
    try:
        pool.seed_min_bytes = 0  # both paths at every size
        loop_cpu: dict[str, list[float]] = {"seed": [], "every_member": []}
        wall: dict[str, list[float]] = {"seed": [], "every_member": []}
        await pool.execute(Assignment(("s",), (0, 1), 1))  # conditioning sent to 0 and 1
        await pool.execute(Assignment(("s",), (2, 3), 1))  # and to 2 and 3
        for i in range(4 * reps):  # every assignment moves to the other pair; modes alternate by twos
            mode = "seed" if (i // 2) % 2 == 0 else "every_member"
            pool.seed_broadcast = mode == "seed"
            group = (0, 1) if i % 2 == 0 else (2, 3)
            c0, t0 = time.thread_time(), time.perf_counter()
            r = await pool.execute(Assignment(("s",), group, 1))
            loop_cpu[mode].append(time.thread_time() - c0)
            wall[mode].append(time.perf_counter() - t0)
            assert r.error is None, r.error
        pool.seed_broadcast = True
        med = lambda v: round(statistics.median(v) * 1e3, 3)  # noqa: E731
        return {"px": px, "latent_bytes": latent_bytes, "group_size": 2,
                "loop_cpu_ms": {k: med(v) for k, v in loop_cpu.items()},
                "wall_ms": {k: med(v) for k, v in wall.items()}}
    finally:
        await pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="cpu:2")
    parser.add_argument("--px", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--seed-devices", default="cpu:4", help="workers for the seeded hand-off (4: two pairs)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    report = {"stop_flag": measure_flag(args.reps * 5), "handoff": [], "seed": []}
    for px in args.px:
        report["handoff"].append(asyncio.run(measure_handoff(args.devices, px, args.reps)))
    for px in args.px:
        report["seed"].append(asyncio.run(measure_seed(args.seed_devices, px, args.reps)))
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
