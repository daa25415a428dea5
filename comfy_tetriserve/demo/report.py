"""What the demo shows: the per-job table, the SAR of each policy, the board picture, the JSON summary."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .replay import JobOutcome, RunResult


def degrees_text(degrees: Sequence[int]) -> str:
    """Degrees of consecutive placements, repeats folded: [2, 2, 4, 1] -> "2,4,1"."""
    out: list[int] = []
    for k in degrees:
        if not out or out[-1] != k:
            out.append(k)
    return ",".join(str(k) for k in out) or "-"


def met_text(o: JobOutcome) -> str:
    if o.status != "finished":
        return o.status.upper()
    if o.job.deadline_s is None:
        return "-"
    return "yes" if o.met_deadline else "LATE"


def outcome_table(runs: Sequence[RunResult]) -> str:
    """One row per job: the job, then finish time, deadline met and degrees under each policy."""
    width = max([len(degrees_text(o.degrees)) for run in runs for o in run.outcomes] + [7])
    cell = 8 + 2 + 6 + 2 + width
    head1 = f"{'job':>3}  {'client':7}  {'model':5}  {'res':>5}  {'arrive':>6}  {'deadline':>8}"
    head2 = f"{'':>3}  {'':7}  {'':5}  {'':>5}  {'s':>6}  {'s':>8}"
    for run in runs:
        head1 += f" | {run.policy:^{cell}}"
        head2 += f" | {'finish s':>8}  {'met':6}  {'degrees':{width}}"
    lines = [head1.rstrip(), head2.rstrip(), "-" * len(head1)]
    for i, first in enumerate(runs[0].outcomes):
        j = first.job
        deadline = f"{j.deadline_s:8.2f}" if j.deadline_s is not None else f"{'best eff':>8}"
        row = f"{j.label:>3}  {j.tenant:7}  {j.shape.family:5}  {j.shape.res:>3}px  {j.arrival_s:6.2f}  {deadline}"
        for run in runs:
            o = run.outcomes[i]
            finish = f"{o.finish_s:8.2f}" if o.finish_s is not None else f"{'-':>8}"
            row += f" | {finish}  {met_text(o):6}  {degrees_text(o.degrees):{width}}"
        lines.append(row.rstrip())
    return "\n".join(lines)


def latency_stats(run: RunResult) -> dict[str, float]:
    values = sorted(o.finish_s for o in run.outcomes if o.finish_s is not None)
    if not values:
        return {"mean_s": math.nan, "p95_s": math.nan}
    return {"mean_s": sum(values) / len(values), "p95_s": values[min(len(values) - 1, int(0.95 * len(values)))]}


def sar_lines(runs: Sequence[RunResult]) -> str:
    lines = ["SAR (deadline jobs finished by their deadline / deadline jobs; late or failed = miss):"]
    for run in runs:
        dl = run.deadline_outcomes
        met = sum(bool(o.met_deadline) for o in dl)
        lat = latency_stats(run)
        lines.append(f"  {run.policy:11s} {met:2d}/{len(dl):<2d} = {run.sar:.3f}   "
                     f"({run.finished}/{len(run.outcomes)} jobs finished; latency mean {lat['mean_s']:.2f} s, "
                     f"p95 {lat['p95_s']:.2f} s; service metric tetriserve_sar {run.service_sar:.3f})")
    return "\n".join(lines)


def drift_by_degree(drift: dict[str, float]) -> dict[tuple[str, int], float]:
    """{(model, degree): mean factor over resolution buckets} from keys "model/spK/Ntok"."""
    groups: dict[tuple[str, int], list[float]] = {}
    for key, factor in drift.items():
        model, sp, _ = key.rsplit("/", 2)
        groups.setdefault((model, int(sp.removeprefix("sp"))), []).append(factor)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def drift_lines(runs: Sequence[RunResult]) -> str:
    """What the online correction learnt: measured / profiled step time, by model and degree."""
    lines = ["measured / profiled step time (the service's online correction, mean over sizes):"]
    for run in runs:
        by = drift_by_degree(run.cost_drift)
        if by:
            parts = [f"{m.split('.')[0]} k{k} {f:.2f}" for (m, k), f in by.items()]
            lines.append(f"  {run.policy:11s} " + "  ".join(parts))
    return "\n".join(lines) if len(lines) > 1 else ""


def summary_json(runs: Sequence[RunResult]) -> dict:
    policies = {}
    for run in runs:
        dl = run.deadline_outcomes
        policies[run.policy] = {
            "sar": run.sar, "jobs": len(run.outcomes), "finished": run.finished, "deadline_jobs": len(dl),
            "met": sum(bool(o.met_deadline) for o in dl), "service_sar": run.service_sar,
            "cost_model_drift": run.cost_drift,
            "replay_s": round(run.replay_s, 3), **{f"latency_{k}": round(v, 4) for k, v in latency_stats(run).items()},
            "jobs_detail": [
                {"job": o.job.index, "tenant": o.job.tenant, "model": o.job.shape.model, "family": o.job.shape.family,
                 "res": o.job.shape.res, "steps": o.job.steps, "arrival_s": o.job.arrival_s,
                 "deadline_s": o.job.deadline_s, "slo_scale": o.job.slo_scale, "job_id": o.job_id,
                 "status": o.status, "finish_s": None if o.finish_s is None else round(o.finish_s, 4),
                 "met_deadline": o.met_deadline, "degrees": o.degrees, "error": o.error}
                for o in run.outcomes],
        }
    return {"policies": policies}


def draw_boards(runs: Sequence[RunResult], path: Path) -> Path:
    """GPUs x time for each policy (one panel each): jobs coloured, deadlines and late finishes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    colours = [plt.get_cmap("tab20")(i % 20) if i < 20 else plt.get_cmap("tab20b")(i % 20) for i in range(40)]
    num_gpus = max(len(r.board.get("gpu_ids", [])) for r in runs) or 1
    end = max(max([(a.get("finished_at") or r.board["now_at"]) - r.started_at for a in r.board["assignments"]]
                  + [o.submitted_at + o.job.deadline_s - r.started_at for o in r.outcomes
                     if o.submitted_at is not None and o.job.deadline_s is not None]
                  + [o.ended_at - r.started_at for o in r.outcomes if o.ended_at is not None] + [1.0])
              for r in runs)
    fig, axes = plt.subplots(len(runs), 1, figsize=(13, 2.2 + 1.3 * num_gpus * len(runs) / 2), sharex=True,
                             squeeze=False, layout="constrained")
    for ax, run in zip(axes[:, 0], runs):
        index_of = {o.job_id: o.job.index for o in run.outcomes if o.job_id}
        for a in run.board["assignments"]:
            start = a["started_at"] - run.started_at
            stop = (a.get("finished_at") or run.board["now_at"]) - run.started_at
            if stop < 0:
                continue
            idx = index_of.get(a["job_ids"][0], 0)
            colour = colours[idx % len(colours)]
            gpus = sorted(a["gpu_ids"])
            for lo, hi in _runs_of(gpus):
                ax.add_patch(Rectangle((start, lo - 0.42), stop - start, hi - lo + 0.84, facecolor=colour,
                                       edgecolor="black", linewidth=0.4))
            if stop - start > end / 60:
                ax.text((start + stop) / 2, (gpus[0] + gpus[-1]) / 2, f"{idx:02d}", ha="center", va="center",
                        fontsize=6.5)
        marks_y = num_gpus - 0.05  # the row of deadline marks, above the workers
        for o in run.outcomes:
            if o.job_id is None or o.job.deadline_s is None or o.submitted_at is None:
                continue
            colour = colours[o.job.index % len(colours)]
            deadline = o.submitted_at + o.job.deadline_s - run.started_at
            ax.plot([deadline], [marks_y], marker="v", color=colour, markeredgecolor="black", markersize=6,
                    markeredgewidth=0.4, clip_on=False)
            if o.finish_s is not None and not o.met_deadline:
                ax.plot([o.ended_at - run.started_at], [marks_y], marker="x", color="red", markersize=6,
                        clip_on=False)
        dl = run.deadline_outcomes
        ax.set_title(f"{run.policy}: SAR {sum(bool(o.met_deadline) for o in dl)}/{len(dl)} = {run.sar:.2f}   "
                     f"(bars: job on workers; triangles: deadlines; red x: late finish)", fontsize=9, loc="left")
        ax.set_ylim(-0.6, num_gpus + 0.25)
        ax.set_yticks(list(range(num_gpus)) + [marks_y])
        ax.set_yticklabels([f"worker {g}" for g in range(num_gpus)] + ["deadlines"], fontsize=8)
        ax.set_xlim(0, end * 1.02)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since the replay started")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _runs_of(ids: Sequence[int]) -> list[tuple[int, int]]:
    """[0, 1, 3] -> [(0, 1), (3, 3)]: contiguous stretches, for one bar per stretch."""
    out: list[tuple[int, int]] = []
    for g in ids:
        if out and out[-1][1] == g - 1:
            out[-1] = (out[-1][0], g)
        else:
            out.append((g, g))
    return out
