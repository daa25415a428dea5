"""Prometheus metrics of the service, exposed with ``prometheus_client`` (text format 0.0.4).

Two kinds of series: histograms and per-tenant counters that the loop feeds as things happen
(``prometheus_client`` metrics in the service's own registry), and the series read from the live
state at scrape time (a custom collector: SAR, queue depth, device counts, drift).

SAR (SLO attainment ratio) counts jobs that asked for a deadline and ended: finished by the
deadline / (finished + failed). Jobs cancelled by their client (or their lease) do not count;
best-effort jobs do not count. Step time drift is measured / predicted step time per model and
degree, an exponential moving average over recent steps (prediction: the cost model's when the
assignment started), alongside whatever the cost model itself reports as its drift.

Job latency (submission to finish) and deadline slack at finish (deadline minus finish: negative
is late) are histograms by model and resolution class (``resolution_class``: the image's side
rounded up to 512, 768, 1024, 1536, 2048 px, else ``larger``). Label cardinality is bounded: the
first ``MAX_TENANT_LABELS`` tenants (client-chosen names) and ``MAX_MODEL_LABELS`` models get their
own label, later ones share the label ``other``.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .. import __version__

# one sample per counter, not a second ``_created`` series each (Prometheus does not need it)
prometheus_client.disable_created_metrics()

DECISION_BUCKETS_S = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
LATENCY_BUCKETS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
SLACK_BUCKETS_S = (-300.0, -60.0, -20.0, -5.0, -1.0, 0.0, 1.0, 5.0, 20.0, 60.0, 300.0)
LOAD_BUCKETS_S = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
RESOLUTION_CLASSES_PX = (512, 768, 1024, 1536, 2048)
DRIFT_EWMA_ALPHA = 0.2
MAX_TENANT_LABELS = 256
MAX_MODEL_LABELS = 64
OTHER_TENANT = "other"
OTHER = "other"
RECOVERY_STATES = ("ok", "degraded", "draining", "restarting", "broken")


def resolution_class(height: int, width: int) -> str:
    """The label of an image size: its side (square root of the area) rounded up to a class."""
    side = math.sqrt(max(height, 1) * max(width, 1))
    for bound in RESOLUTION_CLASSES_PX:
        if side <= bound:
            return f"{bound}px"
    return "larger"


class BoundedLabels:
    """The first ``limit`` values keep their name; any later one is ``other``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self.limit:
            self._seen.add(value)
            return value
        return OTHER


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
    drift: dict[tuple[str, int], DriftStat] = field(default_factory=lambda: defaultdict(DriftStat))
    jobs_requeued_total: int = 0  # jobs put back in the queue after a device fault
    jobs_lost_in_restart_total: int = 0  # jobs an earlier run accepted and never finished (from the job history)
    http_errors: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # answers >= 400, by status
    label: BoundedLabels = field(default_factory=lambda: BoundedLabels(MAX_TENANT_LABELS))  # tenant -> label
    model_label: BoundedLabels = field(default_factory=lambda: BoundedLabels(MAX_MODEL_LABELS))
    registry: CollectorRegistry = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._live: dict = {}
        self.decision = Histogram("tetriserve_round_decision_seconds", "Time the policy took to plan a round.",
                                  buckets=DECISION_BUCKETS_S, registry=self.registry)
        self.job_latency = Histogram(
            "tetriserve_job_latency_seconds", "Submission to finish of finished jobs, by model and resolution class.",
            ("model", "resolution"), buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.deadline_slack = Histogram(
            "tetriserve_deadline_slack_seconds",
            "Deadline minus finish of jobs that had a deadline and finished (negative: late).",
            ("model", "resolution"), buckets=SLACK_BUCKETS_S, registry=self.registry)
        self.model_load = Histogram("tetriserve_model_load_seconds", "Time to load a model on the devices.",
                                    ("model",), buckets=LOAD_BUCKETS_S, registry=self.registry)
        self.tenant_gpu = Counter("tetriserve_tenant_gpu_seconds",
                                  "Device-seconds of assignments, shared among their jobs, by tenant.",
                                  ("tenant",), registry=self.registry)
        self.registry.register(_LiveCollector(self))

    def on_http_error(self, status: int) -> None:
        self.http_errors[status] += 1

    def on_submit(self, tenant: str) -> None:
        self.jobs_submitted[self.label(tenant)] += 1

    def on_decision(self, seconds: float) -> None:
        self.rounds_total += 1
        self.decision.observe(seconds)

    def on_gpu_seconds(self, tenant: str, seconds: float) -> None:
        if seconds > 0:
            self.tenant_gpu.labels(self.label(tenant)).inc(seconds)

    def on_job_finished(self, model: str, height: int, width: int, latency_s: float, slack_s: float | None) -> None:
        labels = (self.model_label(model), resolution_class(height, width))
        self.job_latency.labels(*labels).observe(max(latency_s, 0.0))
        if slack_s is not None:
            self.deadline_slack.labels(*labels).observe(slack_s)

    def on_model_loaded(self, model: str, seconds: float) -> None:
        self.model_load.labels(self.model_label(model)).observe(seconds)

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
        """The exposition text: the loop's metrics plus the live state given here."""
        self._live = dict(policy=policy, executor=executor, gpu_ids=gpu_ids, busy_gpu_ids=busy_gpu_ids,
                          queue_depth=queue_depth, running_jobs=running_jobs, open_leases=open_leases,
                          cost_drift=cost_drift, jobs_held=jobs_held, recovery=recovery)
        try:
            return prometheus_client.generate_latest(self.registry).decode()
        finally:
            self._live = {}


def _family(kind, name: str, help_text: str, labels: tuple[str, ...], samples) -> object:
    fam = kind(name, help_text, labels=labels)
    for values, value in samples:
        fam.add_metric([str(v) for v in values], value)
    return fam


class _LiveCollector:
    """The series read from the counters above and the live state at scrape time."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.m = metrics

    def describe(self):
        return []  # unchecked: the families depend on the live state

    def collect(self):
        m, live = self.m, self.m._live
        if not live:
            return
        G, C = GaugeMetricFamily, CounterMetricFamily
        deadline_tenants = sorted(m.deadline_jobs)
        yield _family(G, "tetriserve_info", "Service build and configuration.", ("version", "policy", "executor"),
                      [((__version__, live["policy"], live["executor"]), 1)])
        sar = GaugeMetricFamily("tetriserve_sar", "SLO attainment ratio of ended deadline jobs, overall (no label) "
                                                  "and by tenant (NaN before the first).")
        sar.add_sample("tetriserve_sar", {}, m.sar())
        for t in deadline_tenants:
            sar.add_sample("tetriserve_sar", {"tenant": t}, m.sar(t))
        yield sar
        yield _family(C, "tetriserve_deadline_jobs", "Ended jobs that had a deadline (cancelled excluded).",
                      ("tenant",), [((t,), n) for t, n in sorted(m.deadline_jobs.items())])
        yield _family(C, "tetriserve_deadline_met", "Jobs that finished by their deadline.",
                      ("tenant",), [((t,), m.deadline_met.get(t, 0)) for t in deadline_tenants])
        yield _family(C, "tetriserve_jobs_submitted", "Jobs accepted.",
                      ("tenant",), [((t,), n) for t, n in sorted(m.jobs_submitted.items())])
        yield _family(C, "tetriserve_jobs_ended", "Jobs ended, by final status.",
                      ("status", "tenant"), [((st, t), n) for (st, t), n in sorted(m.jobs_ended.items())])
        yield _family(C, "tetriserve_gpu_busy_seconds", "Seconds each device spent in assignments.",
                      ("gpu",), [((g,), m.gpu_busy_s.get(g, 0.0)) for g in live["gpu_ids"]])
        yield _family(G, "tetriserve_gpus", "Healthy devices.", (), [((), len(live["gpu_ids"]))])
        yield _family(G, "tetriserve_gpus_busy", "Devices running an assignment now.",
                      (), [((), len(live["busy_gpu_ids"]))])
        yield _family(G, "tetriserve_queue_depth", "Unfinished jobs not on devices (queued or waiting).",
                      (), [((), live["queue_depth"])])
        yield _family(G, "tetriserve_running_jobs", "Jobs with an assignment in flight.",
                      (), [((), live["running_jobs"])])
        yield _family(G, "tetriserve_leases", "Open leases.", (), [((), live["open_leases"])])
        yield _family(C, "tetriserve_steps", "Denoising steps run.", (), [((), m.steps_total)])
        yield _family(C, "tetriserve_plan_errors", "Plans the policy got wrong (a policy bug).",
                      (), [((), m.plan_errors_total)])
        yield _family(G, "tetriserve_step_time_drift_ratio",
                      "Measured / predicted step time (moving average) by model and degree.", ("model", "sp_degree"),
                      [((mod, k), d.ratio) for (mod, k), d in sorted(m.drift.items())])
        yield _family(G, "tetriserve_cost_model_drift_ratio", "The cost model's own drift report.", ("key",),
                      [((key,), value) for key, value in sorted(live["cost_drift"].items())])
        yield _family(C, "tetriserve_http_errors",
                      "Requests answered with an error, by status (4xx: refused input; counted even when the client "
                      "left).", ("status",), [((st,), n) for st, n in sorted(m.http_errors.items())])
        yield _family(G, "tetriserve_jobs_held", "Jobs the service holds (unfinished, or ended with the result kept).",
                      (), [((), live["jobs_held"])])
        yield _family(C, "tetriserve_jobs_requeued", "Jobs put back in the queue after a device fault.",
                      (), [((), m.jobs_requeued_total)])
        yield _family(C, "tetriserve_jobs_lost_in_restart",
                      "Jobs an earlier run of the service accepted and never finished (found in the history at start).",
                      (), [((), m.jobs_lost_in_restart_total)])
        recovery = live["recovery"]
        if recovery is not None:
            yield _family(G, "tetriserve_executor_state", "The executor's recovery state (1 for the current one).",
                          ("state",), [((st,), int(recovery["state"] == st)) for st in RECOVERY_STATES])
            yield _family(C, "tetriserve_worker_faults", "Device faults (workers that died or ran out of memory).",
                          (), [((), recovery["num_faults"])])
            yield _family(C, "tetriserve_pool_restarts", "Times the worker pool was rebuilt.",
                          (), [((), recovery["num_restarts"])])
            yield _family(G, "tetriserve_quarantined_devices",
                          "Devices out of the plan until the service restarts (--max-device-faults).",
                          (), [((), len(recovery.get("quarantined") or {}))])
