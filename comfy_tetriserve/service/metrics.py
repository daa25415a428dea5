"""Prometheus metrics of the service, in the text exposition format (no client library needed).

SAR (SLO attainment ratio) counts jobs that asked for a deadline and ended: finished by the
deadline / (finished + failed). Jobs cancelled by their client (or their lease) do not count;
best-effort jobs do not count. Step time drift is measured / predicted step time per model and
degree, an exponential moving average over recent steps (prediction: the cost model's when the
assignment started), alongside whatever the cost model itself reports as its drift.

Tenants are client-chosen names: the first ``MAX_TENANT_LABELS`` seen get their own label, any
later ones share the label ``other`` (so a client inventing names cannot grow the metrics).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from .. import __version__

DECISION_BUCKETS_S = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
DRIFT_EWMA_ALPHA = 0.2
MAX_TENANT_LABELS = 256
OTHER_TENANT = "other"
RECOVERY_STATES = ("ok", "degraded", "draining", "restarting", "broken")


def _labels(labels: dict[str, object]) -> str:
    if not labels:
        return ""
    parts = []
    for key, value in labels.items():
        text = str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{key}="{text}"')
    return "{" + ",".join(parts) + "}"


def _num(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: list[tuple[dict, float]],
               suffix_samples: list[tuple[str, dict, float]] = ()) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_num(value)}")
        for suffix, labels, value in suffix_samples:
            self.lines.append(f"{name}{suffix}{_labels(labels)} {_num(value)}")


@dataclass
class DriftStat:
    ratio: float = 1.0
    count: int = 0

    def add(self, ratio: float) -> None:
        self.ratio = ratio if self.count == 0 else (1 - DRIFT_EWMA_ALPHA) * self.ratio + DRIFT_EWMA_ALPHA * ratio
        self.count += 1


@dataclass
class ServiceMetrics:
    """Counters the loop updates; ``render`` adds the gauges read from the live state."""

    jobs_submitted: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    jobs_ended: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    deadline_jobs: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    deadline_met: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    gpu_busy_s: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    steps_total: int = 0
    rounds_total: int = 0
    plan_errors_total: int = 0
    decision_counts: list[int] = field(default_factory=lambda: [0] * len(DECISION_BUCKETS_S))
    decision_sum_s: float = 0.0
    decision_count: int = 0
    drift: dict[tuple[str, int], DriftStat] = field(default_factory=lambda: defaultdict(DriftStat))
    jobs_requeued_total: int = 0  # jobs put back in the queue after a device fault
    jobs_lost_in_restart_total: int = 0  # jobs an earlier run accepted and never finished (from the journal)
    http_errors: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # answers >= 400, by status
    _tenants: set[str] = field(default_factory=set)

    def label(self, tenant: str) -> str:
        """The tenant's metrics label (bounded, see the module docstring)."""
        if tenant in self._tenants:
            return tenant
        if len(self._tenants) < MAX_TENANT_LABELS:
            self._tenants.add(tenant)
            return tenant
        return OTHER_TENANT

    def on_http_error(self, status: int) -> None:
        self.http_errors[status] += 1

    def on_submit(self, tenant: str) -> None:
        self.jobs_submitted[self.label(tenant)] += 1

    def on_decision(self, seconds: float) -> None:
        self.rounds_total += 1
        self.decision_sum_s += seconds
        self.decision_count += 1
        for i, bound in enumerate(DECISION_BUCKETS_S):
            if seconds <= bound:
                self.decision_counts[i] += 1

    def on_assignment_end(self, gpu_ids: tuple[int, ...], elapsed_s: float, steps: int) -> None:
        for g in gpu_ids:
            self.gpu_busy_s[g] += elapsed_s
        self.steps_total += steps

    def on_step_time(self, model: str, sp_degree: int, measured_s: float, predicted_s: float) -> None:
        if predicted_s > 0 and measured_s >= 0:
            self.drift[(model, sp_degree)].add(measured_s / predicted_s)

    def on_job_end(self, tenant: str, status: str, had_deadline: bool, met: bool | None) -> None:
        tenant = self.label(tenant)
        self.jobs_ended[(status, tenant)] += 1
        if had_deadline and status != "cancelled":
            self.deadline_jobs[tenant] += 1
            if met:
                self.deadline_met[tenant] += 1

    def sar(self, tenant: str | None = None) -> float:
        """SAR overall or of one tenant; NaN while no deadline job has ended."""
        if tenant is None:
            total, met = sum(self.deadline_jobs.values()), sum(self.deadline_met.values())
        else:
            total, met = self.deadline_jobs.get(tenant, 0), self.deadline_met.get(tenant, 0)
        return met / total if total else math.nan

    def sar_json(self) -> dict:
        def clean(x: float) -> float | None:
            return None if math.isnan(x) else x
        return {"overall": clean(self.sar()), "num_deadline_jobs": sum(self.deadline_jobs.values()),
                "num_met": sum(self.deadline_met.values()),
                "by_tenant": {t: clean(self.sar(t)) for t in sorted(self.deadline_jobs)}}

    def render(self, *, policy: str, executor: str, gpu_ids: tuple[int, ...], busy_gpu_ids: frozenset[int],
               queue_depth: int, running_jobs: int, open_leases: int, cost_drift: dict[str, float],
               jobs_held: int = 0, recovery: dict | None = None) -> str:
        w = _Writer()
        w.family("tetriserve_info", "gauge", "Service build and configuration.",
                 [({"version": __version__, "policy": policy, "executor": executor}, 1)])
        w.family("tetriserve_sar", "gauge", "SLO attainment ratio of ended deadline jobs (NaN before the first).",
                 [({}, self.sar())] + [({"tenant": t}, self.sar(t)) for t in sorted(self.deadline_jobs)])
        w.family("tetriserve_deadline_jobs_total", "counter", "Ended jobs that had a deadline (cancelled excluded).",
                 [({"tenant": t}, n) for t, n in sorted(self.deadline_jobs.items())])
        w.family("tetriserve_deadline_met_total", "counter", "Jobs that finished by their deadline.",
                 [({"tenant": t}, self.deadline_met.get(t, 0)) for t in sorted(self.deadline_jobs)])
        w.family("tetriserve_jobs_submitted_total", "counter", "Jobs accepted.",
                 [({"tenant": t}, n) for t, n in sorted(self.jobs_submitted.items())])
        w.family("tetriserve_jobs_ended_total", "counter", "Jobs ended, by final status.",
                 [({"status": s, "tenant": t}, n) for (s, t), n in sorted(self.jobs_ended.items())])
        w.family("tetriserve_gpu_busy_seconds_total", "counter", "Seconds each device spent in assignments.",
                 [({"gpu": g}, self.gpu_busy_s.get(g, 0.0)) for g in gpu_ids])
        w.family("tetriserve_gpus", "gauge", "Healthy devices.", [({}, len(gpu_ids))])
        w.family("tetriserve_gpus_busy", "gauge", "Devices running an assignment now.", [({}, len(busy_gpu_ids))])
        w.family("tetriserve_queue_depth", "gauge", "Unfinished jobs not on devices (queued or waiting).",
                 [({}, queue_depth)])
        w.family("tetriserve_running_jobs", "gauge", "Jobs with an assignment in flight.", [({}, running_jobs)])
        w.family("tetriserve_leases", "gauge", "Open leases.", [({}, open_leases)])
        w.family("tetriserve_steps_total", "counter", "Denoising steps run.", [({}, self.steps_total)])
        w.family("tetriserve_plan_errors_total", "counter", "Plans the policy got wrong (a policy bug).",
                 [({}, self.plan_errors_total)])
        cumulative = []
        for bound, count in zip(DECISION_BUCKETS_S, self.decision_counts):
            cumulative.append(("_bucket", {"le": repr(bound)}, count))
        cumulative.append(("_bucket", {"le": "+Inf"}, self.decision_count))
        cumulative.append(("_sum", {}, self.decision_sum_s))
        cumulative.append(("_count", {}, self.decision_count))
        w.family("tetriserve_round_decision_seconds", "histogram", "Time the policy took to plan a round.",
                 [], cumulative)
        w.family("tetriserve_step_time_drift_ratio", "gauge",
                 "Measured / predicted step time (moving average) by model and degree.",
                 [({"model": m, "sp_degree": k}, d.ratio) for (m, k), d in sorted(self.drift.items())])
        w.family("tetriserve_cost_model_drift_ratio", "gauge", "The cost model's own drift report.",
                 [({"key": key}, value) for key, value in sorted(cost_drift.items())])
        w.family("tetriserve_http_errors_total", "counter",
                 "Requests answered with an error, by status (4xx: refused input; counted even when the client left).",
                 [({"status": st}, n) for st, n in sorted(self.http_errors.items())])
        w.family("tetriserve_jobs_held", "gauge", "Jobs the service holds (unfinished, or ended with the result kept).",
                 [({}, jobs_held)])
        w.family("tetriserve_jobs_requeued_total", "counter", "Jobs put back in the queue after a device fault.",
                 [({}, self.jobs_requeued_total)])
        w.family("tetriserve_jobs_lost_in_restart_total", "counter",
                 "Jobs an earlier run of the service accepted and never finished (found in the journal at start).",
                 [({}, self.jobs_lost_in_restart_total)])
        if recovery is not None:
            w.family("tetriserve_executor_state", "gauge", "The executor's recovery state (1 for the current one).",
                     [({"state": st}, int(recovery["state"] == st)) for st in RECOVERY_STATES])
            w.family("tetriserve_worker_faults_total", "counter",
                     "Device faults (workers that died or ran out of memory).",
                     [({}, recovery["num_faults"])])
            w.family("tetriserve_pool_restarts_total", "counter", "Times the worker pool was rebuilt.",
                     [({}, recovery["num_restarts"])])
            w.family("tetriserve_quarantined_devices", "gauge",
                     "Devices out of the plan until the service restarts (--max-device-faults).",
                     [({}, len(recovery.get("quarantined") or {}))])
        return "\n".join(w.lines) + "\n"
