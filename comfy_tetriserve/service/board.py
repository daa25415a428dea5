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


def board_json(engine: Engine, store: JobStore, metrics: ServiceMetrics, clock: Clock, *,
               window_s: float = DEFAULT_WINDOW_S, policy: str = "", nodes: list[dict] | None = None) -> dict:
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
        "jobs": [_job_json(j, clock, now) for j in sorted(jobs, key=lambda j: j.submitted_at)],
        "sar": metrics.sar_json(),
        **({"nodes": nodes} if nodes is not None else {}),  # cluster mode: which GPU ids live on which node
    }
