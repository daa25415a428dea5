#!/usr/bin/env python3
"""How the demo's CPU workers share the machine: step times alone and side by side.

    python scripts/cpu_contention.py [--devices cpu:4] [--res 512 768] [--steps 8] [--json FILE]

A worker pool on ``--devices`` (one thread per worker when there are more workers than cores),
the demo's tiny FLUX (built into a temporary folder), and the median step time of degree-1 and
degree-2 requests run alone, two at a time and four at a time on disjoint workers. On a box with
fewer cores than workers the concurrent rows show how far a profile measured one request at a
time is from what the workers get when all of them are busy; that is why the demo profiles with
``profile --loaded`` (the other workers busy) and measures the parallel capacity.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def measure(devices: str, resolutions: list[int], steps: int, text_tokens: int) -> list[dict]:
    from comfy_tetriserve.worker.profile import synthetic_job
    from comfy_tetriserve.worker.tiny import write_tiny_checkpoint
    from comfy_tetriserve.worker.pool import WorkerPool
    from comfy_tetriserve.types import Assignment

    pool = WorkerPool(devices)
    await pool.start()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as d:
            path = write_tiny_checkpoint("flux", "comfy", Path(d) / "tiny-flux", seed=1)
            info = await pool.load_model("tiny-flux", str(path), "fp32")
        n = len(pool.gpu_ids)
        for res in resolutions:
            for degree in (1, 2):
                groups = [g for g in pool.groups if len(g) == degree]
                for side_by_side in sorted({1, 2, n // degree} - {0}):
                    if side_by_side > len(groups):
                        continue
                    chosen = groups[:side_by_side]
                    ids = [f"r{res}-k{degree}-x{side_by_side}-{i}" for i in range(side_by_side)]
                    for rid in ids:
                        await pool.admit(synthetic_job(rid, "tiny-flux", info, res, res, 1, text_tokens, steps + 2))
                    # two warm-up steps each, then the measured steps, all groups at once
                    await asyncio.gather(*(pool.execute(Assignment((rid,), g, 2)) for rid, g in zip(ids, chosen)))
                    results = await asyncio.gather(*(pool.execute(Assignment((rid,), g, steps))
                                                     for rid, g in zip(ids, chosen)))
                    for rid in ids:
                        await pool.release(rid)
                    times = [t for r in results for t in r.step_times_s]
                    rows.append({"res": res, "degree": degree, "side_by_side": side_by_side,
                                 "busy_workers": degree * side_by_side, "step_ms": statistics.median(times) * 1000})
                    print(f"{res:4d} px  degree {degree}  x{side_by_side} side by side "
                          f"({degree * side_by_side} workers busy): {rows[-1]['step_ms']:7.1f} ms/step", flush=True)
    finally:
        await pool.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="cpu:4")
    parser.add_argument("--res", type=int, nargs="+", default=[512, 768])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, devices {args.devices}", flush=True)
    rows = asyncio.run(measure(args.devices, args.res, args.steps, args.text_tokens))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"cores": os.cpu_count(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
