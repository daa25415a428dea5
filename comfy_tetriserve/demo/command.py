"""``comfy-tetriserve demo``: the service on four CPU workers, a mixed workload, two policies.

    comfy-tetriserve demo                      # the full demo (README: scripts/dev.sh demo)
    comfy-tetriserve demo --jobs 8 --json out.json

1. Tiny FLUX and SD3 checkpoints (built on first run, cached; see assets.py).
2. Their step times on the workers at every resolution and degree, each measured while the
   other workers run the same request, and how many workers step at full speed at once (the
   parallel capacity); measured on first run per machine, cached: the cost model the service
   plans with, and the source of the deadlines.
3. The workload (workload.py): seeded arrivals, mixed shapes, deadlines from the profile, some
   best effort; the same jobs for every policy.
4. Per policy, a fresh ``comfy-tetriserve serve`` (same settings but the policy) and the workload
   replayed through the HTTP API by concurrent clients (replay.py).
5. The outcome table, each policy's SAR, the board picture (PNG) and, with ``--json``, a summary.

Exit status 0 when every job of every run finished (met or late), 1 otherwise, 2 on bad flags.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

from ..errors import InvalidRequest, TetriServeError

DEFAULT_POLICY = "tetriserve"
DEFAULT_BASELINE = "sp1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .workload import WorkloadSpec

    d = WorkloadSpec()
    parser.add_argument("--jobs", type=int, default=d.num_jobs, help=f"jobs in the workload (default: {d.num_jobs})")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"denoising steps per job (default: {d.steps})")
    parser.add_argument("--load", type=float, default=d.load,
                        help="offered load: degree-1 work per second over the workers, by the profile "
                             f"(default: {d.load})")
    parser.add_argument("--clients", type=int, default=d.num_clients,
                        help=f"concurrent clients (tenants) (default: {d.num_clients})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"workload seed (default: {d.seed})")
    parser.add_argument("--policy", default=DEFAULT_POLICY, help=f"the policy shown first (default: {DEFAULT_POLICY})")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE,
                        help=f"the fixed-degree policy it is compared with (default: {DEFAULT_BASELINE}; "
                             "see the README)")
    parser.add_argument("--devices", default="cpu:4", help="worker devices (default: cpu:4)")
    parser.add_argument("--out", default=None,
                        help="folder for the board picture, service logs and results (default: <cache>/demo/last-run)")
    parser.add_argument("--json", dest="json_path", default=None, help="write a JSON summary here")
    parser.add_argument("--remeasure", action="store_true", help="measure the profile again even if cached")


def say(text: str) -> None:
    print(text, flush=True)


def run(args: argparse.Namespace) -> int:
    from ..cost import load_cost_model
    from .assets import demo_home, ensure_models, ensure_profile
    from .replay import run_policy
    from .report import draw_boards, drift_lines, outcome_table, sar_lines, summary_json
    from .workload import TEXT_TOKENS, WorkloadSpec, default_shapes, describe, make_workload, resolutions_by_model

    t0 = time.perf_counter()
    if logging.getLogger().level > logging.DEBUG:  # keep the demo's own lines readable (-vv shows everything)
        logging.getLogger().setLevel(logging.WARNING)
    try:
        from ..worker.pool import parse_devices

        num_workers = len(parse_devices(args.devices))
        spec = WorkloadSpec(num_jobs=args.jobs, steps=args.steps, load=args.load, num_clients=args.clients,
                            num_workers=num_workers, seed=args.seed)
        if args.policy == args.baseline:
            raise ValueError("--policy and --baseline must differ")
    except (ValueError, InvalidRequest) as exc:
        print(f"comfy-tetriserve demo: {exc}", file=sys.stderr)
        return 2
    home = demo_home()
    out_dir = Path(args.out) if args.out else home / "last-run"
    out_dir.mkdir(parents=True, exist_ok=True)
    say(f"comfy-tetriserve demo: the scheduler service on {args.devices} with tiny FLUX and SD3, "
        f"{args.policy} vs {args.baseline} on the same workload")
    say(f"[1/4] models (cache {home})")
    files = ensure_models(home, say)
    models = {family: path.name for family, path in files.items()}  # the names clients use
    shapes = default_shapes(models)
    say(f"[2/4] step times on {args.devices} (the service's cost model and the deadlines' basis)")
    profile_path, table, _ = ensure_profile(home, {models[f]: p for f, p in files.items()}, resolutions_by_model(shapes),
                                        args.devices, "fp32", TEXT_TOKENS, say, remeasure=args.remeasure)
    cost = load_cost_model(str(profile_path))
    jobs = make_workload(cost, shapes, spec)
    say(f"[3/4] workload: {describe(jobs, cost, spec)}")
    settings = {"devices": args.devices, "model_dir": [str(files["flux"].parent)], "dtype": "fp32",
                "cost": str(profile_path), "profile_as": [], "lease_s": 60.0, "result_ttl_s": 3600.0,
                "max_open_jobs_per_tenant": 1000}
    runs = []
    for i, policy in enumerate((args.policy, args.baseline)):
        say(f"[4/4] run {i + 1} of 2: policy {policy}")
        try:
            runs.append(asyncio.run(run_policy(policy, settings, jobs, models, out_dir, say)))
        except (RuntimeError, OSError, TetriServeError) as exc:
            say(f"  the {policy} run failed: {exc}")
            return 1
        r = runs[-1]
        say(f"  {policy}: {r.finished}/{len(jobs)} finished in {r.replay_s:.1f} s, SAR {r.sar:.3f}")
    board_png = draw_boards(runs, out_dir / "board.png")
    summary = summary_json(runs)
    elapsed = time.perf_counter() - t0
    summary.update(runtime_s=round(elapsed, 1), board_png=str(board_png), profile=str(profile_path),
                   devices=args.devices, workload={"num_jobs": spec.num_jobs, "steps": spec.steps, "load": spec.load,
                                                   "slo_scales": list(spec.slo_scales), "margin_s": spec.margin_s,
                                                   "min_deadline_s": spec.min_deadline_s,
                                                   "best_effort_fraction": spec.best_effort_fraction,
                                                   "clients": spec.num_clients, "seed": spec.seed})
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    say("")
    say(outcome_table(runs))
    say("")
    say(sar_lines(runs))
    if drift_lines(runs):
        say(drift_lines(runs))
    cores = os.cpu_count() or 0
    capacity = table.extra.get("parallel_capacity")
    if args.devices.startswith("cpu") and cores < num_workers:
        say(f"note: these {num_workers} workers share {cores} CPU cores; the profile prices steps with the other "
            f"workers busy, and measured that {capacity} of them step at full speed at once: TetriServe's "
            f"scale-up and best-effort pieces stay within that, {args.baseline} runs a job on every free worker "
            "(README: the CPU demo)")
    say(f"board picture: {board_png}")
    say(f"service logs and results.json: {out_dir}")
    all_finished = all(r.finished == len(jobs) for r in runs)
    say(f"done in {elapsed:.0f} s; " + ("every job of both runs finished" if all_finished
                                        else "SOME JOBS DID NOT FINISH (see the table and the service logs)"))
    return 0 if all_finished else 1
