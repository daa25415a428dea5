"""The CPU demo: its workload (pure), its report, and the command end to end on four CPU workers."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_tetriserve.cost import ModelProfile, ProfileCostModel, ProfileRow, ProfileTable
from comfy_tetriserve.demo.replay import JobOutcome, RunResult
from comfy_tetriserve.demo.report import degrees_text, draw_boards, outcome_table, sar_lines, summary_json
from comfy_tetriserve.demo.workload import (JobShape, WorkloadSpec, arrival_rate_per_s, default_shapes,
                                            fastest_step_s, make_workload)

MODELS = {"flux": "tiny-flux.safetensors", "sd3": "tiny-sd3.safetensors"}


def demo_cost() -> ProfileCostModel:
    """A profile shaped like the demo's: degree 2 helps only the largest FLUX size."""
    steps = {("flux", 256): (4.0, 10.0, 28.0), ("flux", 512): (20.0, 19.0, 30.0), ("flux", 768): (84.0, 53.0, 68.0),
             ("sd3", 256): (3.0, 7.0, 19.0), ("sd3", 384): (8.0, 7.8, 25.0)}
    rows = tuple(ProfileRow(MODELS[f], r, r, 1, k, ms / 1000, includes_comm=True)
                 for (f, r), times in steps.items() for k, ms in zip((1, 2, 4), times))
    models = {m: ModelProfile(num_heads=4, num_attention_layers=3, hidden_size=64, num_text_tokens=32)
              for m in MODELS.values()}
    return ProfileCostModel(ProfileTable(models=models, rows=rows))


def test_workload_is_seeded_and_its_deadlines_follow_the_profile():
    cost, shapes = demo_cost(), default_shapes(MODELS)
    spec = WorkloadSpec(num_jobs=60, seed=3)
    jobs = make_workload(cost, shapes, spec)
    assert jobs == make_workload(cost, shapes, spec)  # same seed, same jobs (both policies replay this)
    assert jobs != make_workload(cost, shapes, WorkloadSpec(num_jobs=60, seed=4))
    assert [j.index for j in jobs] == list(range(60))
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(jobs, jobs[1:]))
    assert {j.tenant for j in jobs} == {"client1", "client2", "client3"}
    assert [j.tenant for j in jobs[:4]] == ["client1", "client2", "client3", "client1"]
    assert {(j.shape.family, j.shape.res) for j in jobs} == {(s.family, s.res) for s in shapes}
    best_effort = [j for j in jobs if j.deadline_s is None]
    assert 3 <= len(best_effort) <= 24 and all(j.slo_scale is None for j in best_effort)
    for j in jobs:
        if j.deadline_s is None:
            continue
        fast_s, _ = fastest_step_s(cost, j.shape, spec.num_workers)
        assert j.slo_scale in spec.slo_scales
        assert j.deadline_s == pytest.approx(max(j.slo_scale * j.steps * fast_s + spec.margin_s, spec.min_deadline_s),
                                             abs=1e-3)
        # feasible alone at the fastest degree: the work at that degree fits with room for the margin
        assert j.steps * fast_s + spec.margin_s <= j.deadline_s + 1e-9
    # the fastest degree is the profile's: degree 2 for FLUX 768, degree 1 for FLUX 256
    assert fastest_step_s(cost, JobShape("flux", MODELS["flux"], 768), 4) == (pytest.approx(0.053), 2)
    assert fastest_step_s(cost, JobShape("flux", MODELS["flux"], 256), 4) == (pytest.approx(0.004), 1)
    assert fastest_step_s(cost, JobShape("flux", MODELS["flux"], 768), 1) == (pytest.approx(0.084), 1)


def test_arrival_rate_follows_the_load():
    cost, shapes = demo_cost(), default_shapes(MODELS)
    mean_work_s = statistics.mean(20 * cost.step_time_s(s.model, s.res, s.res, 1, 1) for s in shapes)
    spec = WorkloadSpec(num_jobs=4000, load=0.5, steps=20)
    rate = arrival_rate_per_s(cost, shapes, spec)
    assert rate == pytest.approx(0.5 * 4 / mean_work_s)
    jobs = make_workload(cost, shapes, spec)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(jobs, jobs[1:])]
    assert statistics.mean(gaps) == pytest.approx(1 / rate, rel=0.06)
    for bad in (dict(num_jobs=0), dict(load=0), dict(slo_scales=(0.8,)), dict(best_effort_fraction=1.5)):
        with pytest.raises(ValueError):
            WorkloadSpec(**bad)


def fake_run(policy: str, finish: list[float | None], degrees: list[list[int]]) -> RunResult:
    jobs = make_workload(demo_cost(), default_shapes(MODELS), WorkloadSpec(num_jobs=len(finish), seed=1))
    outcomes, assignments = [], []
    for j, f, ks in zip(jobs, finish, degrees):
        submitted = 1000.0 + j.arrival_s
        o = JobOutcome(j, job_id=f"j-x-{j.index:06d}", status="finished" if f is not None else "failed",
                       submitted_at=submitted, ended_at=None if f is None else submitted + f, degrees=ks)
        o.met_deadline = None if j.deadline_s is None else (f is not None and f <= j.deadline_s)
        outcomes.append(o)
        t = submitted
        for k in ks:
            assignments.append({"job_ids": [o.job_id], "gpu_ids": list(range(k)), "started_at": t,
                                "finished_at": t + 0.1})
            t += 0.1
    board = {"gpu_ids": [0, 1, 2, 3], "assignments": assignments, "jobs": [], "now_at": 1100.0}
    return RunResult(policy=policy, outcomes=outcomes, board=board, started_at=1000.0, replay_s=5.0,
                     service_sar=math.nan, log_path=Path("/dev/null"))


def test_report_table_sar_json_and_board_picture(tmp_path):
    a = fake_run("tetriserve", [0.3, 0.2, 9.0, 0.4], [[1, 2, 2, 4], [1], [2, 1], [1]])
    b = fake_run("sp1", [0.5, None, 9.5, 0.4], [[1], [1], [1], [1]])
    assert degrees_text([1, 2, 2, 4, 1]) == "1,2,4,1" and degrees_text([]) == "-"
    table = outcome_table([a, b])
    lines = table.splitlines()
    assert "tetriserve" in lines[0] and "sp1" in lines[0] and len(lines) == 3 + 4
    assert "1,2,4" in lines[3] and "FAILED" in lines[4]
    deadline_jobs = [o for o in a.outcomes if o.job.deadline_s is not None]
    assert a.sar == sum(bool(o.met_deadline) for o in deadline_jobs) / len(deadline_jobs)
    assert b.finished == 3 and a.finished == 4
    assert "tetriserve" in sar_lines([a, b]) and "3/4 jobs finished" in sar_lines([a, b])
    summary = summary_json([a, b])
    assert set(summary["policies"]) == {"tetriserve", "sp1"}
    assert summary["policies"]["sp1"]["jobs"] == 4 and summary["policies"]["sp1"]["finished"] == 3
    json.dumps(summary)  # serialisable
    png = draw_boards([a, b], tmp_path / "board.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.slow
def test_the_demo_command_end_to_end(tmp_path, monkeypatch):
    """A reduced demo from an empty cache: models built, profile measured, both policies replayed."""
    home = tmp_path / "home"
    out = tmp_path / "out"
    env = {**os.environ, "TETRISERVE_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "comfy_tetriserve", "demo", "--jobs", "6", "--load", "0.2",
                           "--json", str(tmp_path / "demo.json"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for needle in ("[1/4] models", "built", "[2/4]", "profile written", "[3/4] workload",
                   "run 1 of 2: policy tetriserve", "run 2 of 2: policy sp1", "4/4 workers loaded", "finish s",
                   "SAR (", "measured / profiled step time", "board picture:", "every job of both runs finished"):
        assert needle in text, (needle, text[-3000:])
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert set(summary["policies"]) == {"tetriserve", "sp1"}
    for name, p in summary["policies"].items():
        assert p["jobs"] == 6 and p["finished"] == 6, (name, p)
        assert math.isnan(p["sar"]) or 0.0 <= p["sar"] <= 1.0
        if not math.isnan(p["sar"]):
            assert p["service_sar"] == pytest.approx(p["sar"])  # the service counts what the demo counts
        assert all(j["status"] == "finished" and j["degrees"] for j in p["jobs_detail"])
        # the online cost model saw the workers' measured steps (OnlineCostModel behind the profile)
        assert {key.split("/")[0] for key in p["cost_model_drift"]} >= {"tiny-flux.safetensors"}, p["cost_model_drift"]
    assert Path(summary["board_png"]).read_bytes()[:4] == b"\x89PNG"
    assert (out / "results.json").exists() and (out / "service-tetriserve.log").exists()
    # the same jobs under both policies
    a, b = (summary["policies"][n]["jobs_detail"] for n in ("tetriserve", "sp1"))
    assert [(j["model"], j["res"], j["deadline_s"], j["arrival_s"]) for j in a] == \
           [(j["model"], j["res"], j["deadline_s"], j["arrival_s"]) for j in b]
    # the cache: models and profile are reused, nothing is measured again
    from comfy_tetriserve.demo import assets
    from comfy_tetriserve.demo.workload import TEXT_TOKENS, resolutions_by_model

    said: list[str] = []
    monkeypatch.setenv("TETRISERVE_HOME", str(home))
    files = assets.ensure_models(assets.demo_home(), said.append)
    names = {f: p.name for f, p in files.items()}
    path, table, measured = assets.ensure_profile(
        assets.demo_home(), {names[f]: p for f, p in files.items()}, resolutions_by_model(default_shapes(names)),
        "cpu:4", "fp32", TEXT_TOKENS, said.append)
    assert not measured and str(path) == summary["profile"]
    assert all("cached" in line for line in said)
    assert {r.model for r in table.rows} == set(names.values()) and {r.sp_degree for r in table.rows} == {1, 2, 4}
    # measured loaded, with the parallel capacity of the four workers (at least 1, at most 4)
    assert "loaded" in table.how and 1 <= table.extra["parallel_capacity"] <= 4
    assert set(table.extra["step_ms_by_busy_devices"]) == {"1", "2", "3", "4"}


def test_cost_drift_from_the_metrics_by_model_and_degree():
    from comfy_tetriserve.demo.replay import parse_cost_drift
    from comfy_tetriserve.demo.report import drift_by_degree

    text = ('# TYPE tetriserve_cost_model_drift_ratio gauge\n'
            'tetriserve_cost_model_drift_ratio{key="tiny-flux.safetensors/sp1/256tok"} 1.5\n'
            'tetriserve_cost_model_drift_ratio{key="tiny-flux.safetensors/sp1/1024tok"} 0.5\n'
            'tetriserve_cost_model_drift_ratio{key="tiny-sd3.safetensors/sp4/256tok"} 2.0\n'
            'tetriserve_sar 0.5\n')
    drift = parse_cost_drift(text)
    assert drift == {"tiny-flux.safetensors/sp1/256tok": 1.5, "tiny-flux.safetensors/sp1/1024tok": 0.5,
                     "tiny-sd3.safetensors/sp4/256tok": 2.0}
    assert drift_by_degree(drift) == {("tiny-flux.safetensors", 1): 1.0, ("tiny-sd3.safetensors", 4): 2.0}
