"""The board: recent and current assignments (job x devices x time), deadlines, slack and SAR.

One JSON document, drawn by the dashboard page (static/) and by the ComfyUI panel. Times are
unix seconds. ``slack_s`` is deadline minus predicted finish for an open job, deadline minus
end for an ended one (negative: late); ``late`` marks jobs that missed or are predicted to miss.
"""
from __future__ import annotations

from ..core.engine import Engine
from .jobs import Clock, Job, JobStatus, JobStore
from .metrics import ServiceMetrics

DEFAULT_WINDOW_S = 60.0
MAX_WINDOW_S = 3600.0


def _job_json(job: Job, clock: Clock, now: float) -> dict:
    r = job.request
    if job.deadline_at is None:
        slack, late = None, False
    elif job.status.is_terminal:
        end = job.ended_at if job.ended_at is not None else now
        slack = job.deadline_at - end
        late = job.status is JobStatus.FAILED or (job.status is JobStatus.FINISHED and slack < 0)
    else:
        expected = job.predicted_finish_at if job.predicted_finish_at is not None else now
        slack = job.deadline_at - max(expected, now)
        late = slack < 0
    return {
        "job_id": job.job_id, "tenant": job.tenant, "model": r.model, "height": r.height, "width": r.width,
        "batch": r.batch, "status": job.status.value, "steps_done": job.steps_done, "num_steps": r.num_steps,
        "gpu_ids": list(job.gpu_ids), "submitted_at": clock.to_wall(job.submitted_at),
        "deadline_at": clock.to_wall(job.deadline_at), "predicted_finish_at": clock.to_wall(job.predicted_finish_at),
        "ended_at": clock.to_wall(job.ended_at), "slack_s": slack, "late": late, "simulated": job.simulated,
    }


def _loads_json(executor, clock: Clock, since: float) -> list[dict]:
    """Model loads of the executor in the window (devices x time; the board draws them in their own style)."""
    records = getattr(executor, "load_records", None)
    if records is None:
        return []
    return [{"model": r["model"], "gpu_ids": list(r["gpu_ids"]), "started_at": clock.to_wall(r["started_at"]),
             "expected_end_at": clock.to_wall(r["expected_end_at"]), "finished_at": clock.to_wall(r["finished_at"]),
             "error": r["error"]}
            for r in records(since)]


def device_labels(executor: object, gpu_ids: tuple[int, ...]) -> dict[str, str]:
    """How the board names each device: ``GPU 3`` (cuda:3), ``CPU 1`` (a CPU worker), ``sim 0`` (simulated)."""
    devices: dict[int, str] = {}
    workers = getattr(executor, "workers", None)
    if callable(workers):
        devices = {w["gpu_id"]: str(w.get("device", "")) for w in workers()}
    simulated = bool(getattr(executor, "simulated", False))
    out = {}
    for g in gpu_ids:
        device = devices.get(g, "")
        if device.startswith("cuda"):
            out[str(g)] = f"GPU {device.partition(':')[2] or g}"
        elif device.startswith("cpu"):
            out[str(g)] = f"CPU {g}"
        else:
            out[str(g)] = f"sim {g}" if simulated else f"GPU {g}"
    return out


def board_json(engine: Engine, store: JobStore, metrics: ServiceMetrics, clock: Clock, *,
               window_s: float = DEFAULT_WINDOW_S, policy: str = "", nodes: list[dict] | None = None,
               executor=None, labels: dict[str, str] | None = None) -> dict:
    now = clock.now()
    since = now - window_s
    records = engine.records(since_at=since)
    job_ids = {rid for rec in records for rid in rec.request_ids}
    jobs = [j for j in store.jobs.values()
            if j.job_id in job_ids or not j.status.is_terminal or (j.ended_at or now) >= since]
    return {
        "now_at": clock.to_wall(now),
        "window_s": window_s,
        "boot_id": store.boot_id,
        "policy": policy,
        "gpu_ids": list(engine.all_gpu_ids),
        "device_labels": labels or {str(g): f"GPU {g}" for g in engine.all_gpu_ids},
        "healthy_gpu_ids": list(engine.healthy_gpu_ids),
        "busy_gpu_ids": sorted(engine.busy_gpu_ids),
        "round_index": engine.round_index,
        "assignments": [
            {"round": rec.round_index, "job_ids": list(rec.request_ids), "gpu_ids": list(rec.gpu_ids),
             "num_steps": rec.num_steps, "started_at": clock.to_wall(rec.started_at),
             "expected_end_at": clock.to_wall(rec.expected_end_at), "finished_at": clock.to_wall(rec.finished_at),
             "steps_done": rec.steps_done, "error": rec.error}
            for rec in records
        ],
        "loads": _loads_json(executor, clock, since),
        "jobs": [_job_json(j, clock, now) for j in sorted(jobs, key=lambda j: j.submitted_at)],
        "sar": metrics.sar_json(),
        **({"nodes": nodes} if nodes is not None else {}),  # cluster mode: which GPU ids live on which node
    }
