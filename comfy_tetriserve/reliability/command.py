"""``comfy-tetriserve reliability``: fault, soak and hostile-input drills against a real service.

Starts ``comfy-tetriserve serve`` on a free loopback port with CPU workers and two tiny models
(FLUX and SD3 checkpoints written with seeded random weights), then runs, in order:

- **soak**: ``--soak-jobs`` jobs from ``--soak-clients`` clients (each with ``--concurrency`` jobs in
  flight): most fetch their result, some cancel (at once or after a step), some never fetch it
  (it expires), some vanish (their lease expires). Every job must end as asked; a sample is
  compared with direct one-device sampling, repeated inputs must agree, and the service's memory
  (RSS) between an early plateau (20-30 % of the jobs ended) and a late one (90-100 %) must grow
  by less than ``--max-rss-growth``; afterwards the service must hold no job.
- **hostile**: every case of ``hostile.CASES`` while a client keeps submitting good jobs.
- **restart**: ``--restart-jobs`` jobs in flight when the service is killed (SIGKILL) and started
  again on the same port and job history: every client must hear that its job was lost (the new run's
  history), and its resubmit under the same job key must finish.
- **faults**: at least ``--fault-jobs`` jobs while ``--fault-kills`` workers are taken down under
  running assignments (SIGKILL, SIGTERM, and SIGSTOP: a hang the service's stall watchdog must
  find), one after another once the pool is whole again; every job must finish with the direct
  run's result. Then a poison job that takes its worker down
  each time it runs must fail with the reason after ``--max-job-faults`` kills, while bystanders
  finish.

Prints a summary (faults injected / jobs lost, jobs submitted / ended, bad inputs sent / refused,
memory growth); ``--json FILE`` writes everything. Exit status 0 when every check passed.
Loopback only; every phase is bounded by ``--phase-timeout-s``.

    comfy-tetriserve reliability                                  # the full-size run (docs/reliability.md)
    comfy-tetriserve reliability --soak-jobs 500 --fault-jobs 50 --fault-kills 3 --json rel.json
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

PHASES = ("soak", "hostile", "restart", "faults")
LIMITS = {"max_open_jobs_per_tenant": 12, "max_leases_per_tenant": 6, "max_event_streams": 64,
          "max_image_tokens": 4096}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="drills to run, in order (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=4, help="CPU workers of the service (cpu:N; CI uses 2) (default: %(default)s)")
    parser.add_argument("--soak-jobs", type=int, default=5000, help="jobs of the soak (default: %(default)s)")
    parser.add_argument("--soak-clients", type=int, default=4, help="clients (tenants) of the soak (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=3, help="jobs each client keeps in flight (default: %(default)s)")
    parser.add_argument("--check-every", type=int, default=10, help="compare every Nth soak job with the direct run (default: %(default)s)")
    parser.add_argument("--max-rss-growth", type=float, default=0.10, help="largest allowed RSS growth of the soak (default: %(default)s)")
    parser.add_argument("--fault-jobs", type=int, default=200, help="jobs of the fault drill (at least) (default: %(default)s)")
    parser.add_argument("--fault-kills", type=int, default=10, help="workers killed during the fault drill (default: %(default)s)")
    parser.add_argument("--no-poison", dest="poison", action="store_false", help="skip the poison-job drill")
    parser.add_argument("--restart-jobs", type=int, default=8, help="jobs in flight when the service is killed (default: %(default)s)")
    parser.add_argument("--max-job-faults", type=int, default=2, help="the service's --max-job-faults (default: %(default)s)")
    parser.add_argument("--rebuild-after-s", type=float, default=5.0, help="the service's --rebuild-after-s (default: %(default)s)")
    parser.add_argument("--phase-timeout-s", type=float, default=1800.0, help="time limit of each phase (default: %(default)s)")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip the comparison with direct one-device sampling")
    parser.add_argument("--workdir", type=Path,
                        help="folder for models, logs and the journal (default: a temporary one)")
    parser.add_argument("--json", dest="json_path", type=Path, metavar="FILE", help="write the full report here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill timing (default: %(default)s)")


@dataclasses.dataclass
class Options:
    """The drill sizes (what the flags set), for callers that run the drills in-process."""

    phases: tuple[str, ...] = PHASES
    workers: int = 2
    soak_jobs: int = 500
    soak_clients: int = 4
    concurrency: int = 3
    check_every: int = 10
    max_rss_growth: float = 0.10
    fault_jobs: int = 50
    fault_kills: int = 3
    poison: bool = True
    restart_jobs: int = 8
    max_job_faults: int = 2
    rebuild_after_s: float = 5.0
    phase_timeout_s: float = 1800.0
    reference: bool = True
    workdir: Path | None = None
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Options":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names}
        values["phases"] = tuple(args.phases)
        return cls(**values)


async def run_drills(opts: Options) -> dict:
    """Start the service, run the phases, stop it; returns the report (``verdict`` says whether all passed)."""
    from .harness import ServiceProcess, ServiceSettings
    from .hostile import run_hostile
    from .reference import Reference
    from .workload import faults, restart_drill, soak

    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="tetriserve-reliability-"))
    workdir.mkdir(parents=True, exist_ok=True)
    settings = ServiceSettings(
        workers=opts.workers, max_job_faults=opts.max_job_faults, rebuild_after_s=opts.rebuild_after_s,
        extra=tuple(arg for k, v in LIMITS.items() for arg in (f"--{k.replace('_', '-')}", str(v))))
    report: dict = {"settings": {**dataclasses.asdict(opts), "workdir": str(workdir)}, "service": {}}
    report["settings"]["phases"] = list(opts.phases)
    svc = ServiceProcess(workdir, settings)
    t0 = time.monotonic()
    await asyncio.to_thread(svc.start)
    report["service"]["start_s"] = round(time.monotonic() - t0, 2)
    report["service"]["command"] = " ".join(svc.command())
    families = {"flux": "tiny-flux.safetensors", "sd3": "tiny-sd3.safetensors"}
    reference = Reference(svc.models) if opts.reference else None
    try:
        for phase in opts.phases:
            t_phase = time.monotonic()
            if phase == "soak":
                r = await soak(svc, reference, families, num_jobs=opts.soak_jobs, num_clients=opts.soak_clients,
                               concurrency=opts.concurrency, check_every=opts.check_every,
                               timeout_s=opts.phase_timeout_s)
                report["soak"] = dataclasses.asdict(r)
            elif phase == "hostile":
                r = await run_hostile(svc.url, families, workdir, settings, LIMITS, timeout_s=opts.phase_timeout_s)
                report["hostile"] = {**dataclasses.asdict(r), "failures": [c.name for c in r.failures]}
            elif phase == "restart":
                r = await restart_drill(svc, families, num_jobs=opts.restart_jobs, timeout_s=opts.phase_timeout_s)
                report["restart"] = dataclasses.asdict(r)
            elif phase == "faults":
                r = await faults(svc, reference, families, min_jobs=opts.fault_jobs, num_kills=opts.fault_kills,
                                 num_clients=3, concurrency=opts.concurrency,
                                 max_jobs=max(opts.fault_jobs * 4, opts.fault_jobs + 150 * opts.fault_kills),
                                 poison=opts.poison, timeout_s=opts.phase_timeout_s, seed=opts.seed)
                report["faults"] = dataclasses.asdict(r)
            log.info("%s drill done in %.1f s", phase, time.monotonic() - t_phase)
        report["service"]["alive_at_end"] = svc.alive()
        report["service"]["rss_end_mb"] = round((svc.rss() or 0) / 2**20, 1)
    finally:
        report["service"]["exit_code"] = await asyncio.to_thread(svc.stop)
        report["service"]["log"] = str(svc.log_path)
    report["duration_s"] = round(time.monotonic() - t0, 1)
    report["checks"] = checks(report, opts)
    report["verdict"] = all(ok for ok, _ in report["checks"].values())
    if opts.workdir is None and report["verdict"]:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def checks(report: dict, opts: Options) -> dict[str, tuple[bool, str]]:
    """Each acceptance check: (passed, what was measured)."""
    out: dict[str, tuple[bool, str]] = {}
    if "faults" in report:
        f = report["faults"]
        out["faults: jobs lost"] = (f["jobs_lost"] == 0 and f["jobs_submitted"] >= opts.fault_jobs,
                                    f"{f['jobs_lost']} lost of {f['jobs_submitted']} submitted")
        out["faults: workers killed"] = (f["faults_injected"] >= opts.fault_kills,
                                         f"{f['faults_injected']} of {opts.fault_kills} asked")
        out["faults: pool rebuilt after each kill"] = (
            all(k.get("recovered_s") is not None for k in f["kills"]) and f["pool_restarts"] >= f["faults_injected"],
            f"{f['pool_restarts']} rebuilds; slowest {f['recovered_max_s']:.1f} s; deaths noticed within "
            f"{f['noticed_max_s']:.2f} s, hangs within {f['hang_noticed_max_s']:.1f} s")
        if opts.reference:
            out["faults: results equal the direct run"] = (
                f["checked_vs_direct"] == f["jobs_finished"] and f["max_rel_err"] <= 1e-5,
                f"{f['checked_vs_direct']} checked, max rel err {f['max_rel_err']:.1e}")
        if f["poison"] is not None:
            p = f["poison"]
            out["faults: poison job fails with its reason"] = (
                p["failed_with_reason"] and p["kills"] == opts.max_job_faults
                and p["bystanders_finished"] == p["bystanders"],
                f"{p['status']} after {p['kills']} kills; "
                f"{p['bystanders_finished']}/{p['bystanders']} bystanders finished")
    if "soak" in report:
        s = report["soak"]
        out["soak: every job ended as asked"] = (not s["not_as_asked"] and s["jobs_ended"] == opts.soak_jobs,
                                                 f"{s['jobs_ended']} ended of {s['jobs_submitted']} submitted")
        growth = s["rss_growth"]
        out["soak: memory flat"] = (growth is not None and growth < opts.max_rss_growth,
                                    f"RSS {s['rss_early_mb'] or 0:.0f} -> {s['rss_late_mb'] or 0:.0f} MiB "
                                    f"({(growth or 0) * 100:+.1f} %)")
        out["soak: nothing held after expiry"] = (s["jobs_held_after"] == 0, f"{s['jobs_held_after']} jobs held")
        if opts.reference:
            out["soak: results correct and deterministic"] = (
                s["checked_vs_direct"] > 0 and s["max_rel_err"] <= 1e-5 and s["determinism_pairs"] > 0
                and s["determinism_max_rel_err"] <= 1e-5,
                f"{s['checked_vs_direct']} vs direct (max {s['max_rel_err']:.1e}), {s['determinism_pairs']} "
                f"repeated pairs (max {s['determinism_max_rel_err']:.1e})")
    if "restart" in report:
        r = report["restart"]
        out["restart: every client told, every resubmit finished"] = (
            not r["silent"] and r["finished"] == r["jobs_submitted"] == opts.restart_jobs
            and r["told_lost"] == r["resubmitted"] == r["lost_counted"] and r["told_lost"] >= 1,
            f"{r['unfinished_at_kill']} unfinished at the kill, {r['told_lost']} told lost, "
            f"{r['lost_counted']} counted by the new run, {r['finished']}/{r['jobs_submitted']} finished")
    if "hostile" in report:
        h = report["hostile"]
        out["hostile: every bad input refused"] = (h["refused"] == h["sent"] and not h["failures"],
                                                   f"{h['refused']}/{h['sent']} refused ({h['requests']} requests)")
        out["hostile: good jobs kept finishing"] = (h["good_finished"] == h["good_jobs"] > 0,
                                                    f"{h['good_finished']}/{h['good_jobs']} finished")
        out["hostile: service alive"] = (h["service_alive"], "healthy" if h["service_alive"] else "not healthy")
    out["service: alive to the end, clean exit"] = (
        report["service"].get("alive_at_end", False) and report["service"].get("exit_code") == 0,
        f"exit code {report['service'].get('exit_code')}")
    return out


def summary(report: dict) -> str:
    lines = ["comfy-tetriserve reliability"]
    if "soak" in report:
        s = report["soak"]
        growth = "n/a" if s["rss_growth"] is None else f"{s['rss_growth'] * 100:+.1f} %"
        lines.append(f"  soak     : {s['jobs_submitted']} jobs submitted / {s['jobs_ended']} ended "
                     f"({s['finished']} finished, {s['cancelled_as_asked']} cancelled as asked) "
                     f"in {s['duration_s']:.0f} s")
        lines.append(f"  memory   : RSS {s['rss_early_mb'] or 0:.0f} -> {s['rss_late_mb'] or 0:.0f} MiB ({growth}), "
                     f"{s['jobs_held_after']} jobs held after expiry")
    if "hostile" in report:
        h = report["hostile"]
        lines.append(f"  bad input: {h['sent']} sent / {h['refused']} refused ({h['requests']} requests); "
                     f"{h['good_finished']}/{h['good_jobs']} good jobs finished meanwhile; "
                     f"service {'alive' if h['service_alive'] else 'DOWN'}")
    if "restart" in report:
        r = report["restart"]
        lines.append(f"  restart  : service killed with {r['unfinished_at_kill']} jobs unfinished / "
                     f"{r['told_lost']} clients told their job was lost, {r['finished']}/{r['jobs_submitted']} "
                     f"finished after resubmitting; back in {r['down_s']:.1f} s")
    if "faults" in report:
        f = report["faults"]
        lines.append(f"  faults   : {f['faults_injected']} workers killed / {f['jobs_lost']} jobs lost "
                     f"({f['jobs_submitted']} jobs, {f['jobs_requeued']} resumed from a checkpoint at steps "
                     f"{f['resumed_from_steps']}, {f['pool_restarts']} pool rebuilds)")
        if f["poison"]:
            p = f["poison"]
            lines.append(f"  poison   : {p['status']} after {p['kills']} kills, "
                         f"{p['bystanders_finished']}/{p['bystanders']} bystanders finished; the job's error:")
            lines.append(f"             {p['error']}")
    for name, (ok, what) in report["checks"].items():
        lines.append(f"  [{'ok' if ok else 'FAIL'}] {name}: {what}")
    lines.append(f"  {'PASS' if report['verdict'] else 'FAIL'} in {report['duration_s']:.0f} s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    opts = Options.from_args(args)
    try:
        report = asyncio.run(run_drills(opts))
    except RuntimeError as exc:  # the service did not start
        print(f"comfy-tetriserve reliability: {exc}", file=sys.stderr)
        return 2
    print(summary(report))
    if args.json_path:
        args.json_path.write_text(json.dumps(report, indent=2, default=str))
    return 0 if report["verdict"] else 1
