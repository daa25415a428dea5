"""/v1/metrics is Prometheus text that prometheus_client's own parser reads: the series the service always
had, histograms of job latency and deadline slack by model and resolution class, model load times and
per-tenant device-seconds, with label cardinality bounded."""
from __future__ import annotations

import asyncio
import math

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from comfy_tetriserve.service.metrics import MAX_MODEL_LABELS, MAX_TENANT_LABELS, ServiceMetrics, resolution_class
from service_helpers import follow_events, job_body, make_service_app, running_service, submit_json


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, for every sample; the parser raises on malformed text."""
    out = {}
    families = list(text_string_to_metric_families(text))
    assert len({f.name for f in families}) == len(families)
    for fam in families:
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_parse_with_prometheus_client_and_carry_latency_slack_load_and_tenant_gpu_seconds():
    async def body():
        app, _ = make_service_app(num_gpus=2)
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            jobs = []
            for i, (tenant, res, deadline) in enumerate([("a", 128, 30.0), ("a", 128, 0.001), ("b", 1024, 30.0),
                                                         ("b", 1024, None)]):
                status, job = await submit_json(s, url, job_body({"steps": 3, "tenant": tenant,
                                                                 "deadline_s": deadline}, res=res, seed=i))
                assert status == 202, job
                jobs.append(job["job_id"])
            for job_id in jobs:
                await follow_events(s, url, job_id)
            async with s.get(url + "/v1/metrics") as resp:
                assert resp.status == 200 and resp.content_type == "text/plain"
                text = await resp.text()
            ended = []
            for job_id in jobs:
                async with s.get(f"{url}/v1/jobs/{job_id}") as resp:
                    ended.append(await resp.json())
        return text, ended

    text, ended = asyncio.run(body())
    m = samples(text)
    assert all(j["status"] == "finished" for j in ended)
    small = (("model", "flux-sim"), ("resolution", "512px"))
    large = (("model", "flux-sim"), ("resolution", "1024px"))
    assert m[("tetriserve_job_latency_seconds_count", small)] == 2
    assert m[("tetriserve_job_latency_seconds_count", large)] == 2
    latency_sum = sum(j["ended_at"] - j["submitted_at"] for j in ended)
    got_sum = m[("tetriserve_job_latency_seconds_sum", small)] + m[("tetriserve_job_latency_seconds_sum", large)]
    assert math.isclose(got_sum, latency_sum, rel_tol=0.05, abs_tol=0.01), (got_sum, latency_sum)
    # slack only for deadline jobs: one late (0.001 s deadline) small job, one on time of each class
    assert m[("tetriserve_deadline_slack_seconds_count", small)] == 2
    assert m[("tetriserve_deadline_slack_seconds_count", large)] == 1
    assert m[("tetriserve_deadline_slack_seconds_bucket", tuple(sorted(small + (("le", "0.0"),))))] == 1  # the late one
    assert m[("tetriserve_sar", ())] == 2 / 3 and m[("tetriserve_sar", (("tenant", "a"),))] == 0.5
    # models loaded at start, each timed once
    assert m[("tetriserve_model_load_seconds_count", (("model", "flux-sim"),))] == 1
    assert m[("tetriserve_model_load_seconds_count", (("model", "sd3-sim"),))] == 1
    # device-seconds by tenant add up to the devices' busy seconds
    tenant_s = {t: m[("tetriserve_tenant_gpu_seconds_total", (("tenant", t),))] for t in ("a", "b")}
    busy_s = sum(v for (name, _), v in m.items() if name == "tetriserve_gpu_busy_seconds_total")
    assert tenant_s["a"] > 0 and tenant_s["b"] > 0
    assert math.isclose(sum(tenant_s.values()), busy_s, rel_tol=1e-6)
    # today's series are still there under their names
    for name in ("tetriserve_info", "tetriserve_jobs_submitted_total", "tetriserve_jobs_ended_total",
                 "tetriserve_queue_depth", "tetriserve_steps_total", "tetriserve_round_decision_seconds_count",
                 "tetriserve_gpus", "tetriserve_leases", "tetriserve_step_time_drift_ratio"):
        assert any(k[0] == name for k in m), name
    assert m[("tetriserve_steps_total", ())] == 12
    assert not any(name.endswith("_created") for name, _ in m)


def test_label_cardinality_is_bounded():
    metrics = ServiceMetrics()
    for i in range(MAX_TENANT_LABELS + 50):
        metrics.on_submit(f"tenant-{i}")
        metrics.on_gpu_seconds(f"tenant-{i}", 1.0)
    for i in range(MAX_MODEL_LABELS + 10):
        metrics.on_job_finished(f"model-{i}", 1024, 1024, 5.0, 1.0)
    text = metrics.render(policy="p", executor="e", gpu_ids=(0,), busy_gpu_ids=frozenset(), queue_depth=0,
                          running_jobs=0, open_leases=0, cost_drift={})
    m = samples(text)
    tenants = {dict(k[1])["tenant"] for k in m if k[0] == "tetriserve_tenant_gpu_seconds_total"}
    models = {dict(k[1])["model"] for k in m if k[0] == "tetriserve_job_latency_seconds_count"}
    assert len(tenants) == MAX_TENANT_LABELS + 1 and "other" in tenants
    assert m[("tetriserve_tenant_gpu_seconds_total", (("tenant", "other"),))] == 50
    assert len(models) == MAX_MODEL_LABELS + 1 and "other" in models
    assert [resolution_class(h, w) for h, w in ((512, 512), (768, 512), (1024, 1024), (1536, 1536), (4096, 4096))] \
        == ["512px", "768px", "1024px", "1536px", "larger"]
