"""A smoke run of ``comfy-tetriserve bench`` (the full run is the command in README / docs/planner.md)."""
from __future__ import annotations

import json

from comfy_tetriserve.cli import main
from comfy_tetriserve.sim.bench import ALL_POLICIES, BenchConfig, Bench

REQUIRED = ("tetriserve", "sp1", "sp2", "sp4", "sp8", "rssp", "edf", "sp4-admit", "rssp-admit", "edf-admit")


def test_quick_bench_writes_the_report_and_plots(tmp_path, capsys):
    rc = main(["bench", "--quick", "--jobs", "1", "--out", str(tmp_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "cost model h200" in text and "SAR, uniform mix" in text and "Offline bound" in text
    report = json.loads((tmp_path / "report.json").read_text())
    for mix in ("uniform", "skewed"):
        for scale in ("1.0", "1.5"):
            row = report["sar"][mix][scale]
            assert set(REQUIRED) <= set(row) and all(0.0 <= v <= 1.0 for v in row.values())
    assert set(report["decision_ms"]) == {"16", "64"}
    assert all(v["p50"] > 0 and v["p99"] >= v["p50"] for v in report["decision_ms"].values())
    assert 0.0 < report["bound_ratio"] <= 1.0 + 1e-9
    assert report["cost_model"]["name"] == "h200" and "H200" in report["cost_model"]["device"]
    assert set(report["ablation"]["steps"]["Uniform 1.0x"]) == {"planner only", "+ placement", "+ scale-up",
                                                               "+ batching"}
    assert "groups: all subsets" in report["ablation"]["decisions"]
    assert set(report["granularity"]["sar"]["uniform 12/min"]) == {"1", "5"}
    assert report["gains"]["uniform"]["per_scale"]
    assert set(report["overload"]["sar"]["120/min 1.0x"]) >= {"tetriserve", "edf"}
    assert set(report["probes"]) == {"bursty", "noisy", "slow-engine", "4-gpus", "2x-rate"}
    assert set(report["probes"]["bursty"]["skewed"]["1.0"]) >= {"tetriserve", "edf-admit", "rssp-admit"}
    assert report["gains"]["skewed"]["strongest_baseline"] and report["isolated_bound"]["uniform"]["1.0"] <= 1.0
    assert "vs the strongest baseline" in text and "Probe bursty" in text
    for scale in ("1.0", "1.5"):
        assert set(report["video"]["sar"][scale]) >= {"tetriserve", "sp1", "sp2", "sp4", "sp8", "best-per-class", "edf"}
    assert "modelled" in report["video"]["cost_model"]
    for name in ("sar_vs_scale", "rate_sweep", "sar_per_resolution", "ablation", "granularity", "latency_cdf",
                 "decision_time", "probes"):
        assert (tmp_path / f"{name}.png").stat().st_size > 5000, name


def test_sections_can_be_chosen_and_results_are_deterministic():
    config = BenchConfig(quick=True, jobs=1, sections=("sar",), policies=("tetriserve", "sp4"), plots=False)
    a = Bench(config).run(("sar",), echo=lambda s: None)
    b = Bench(config).run(("sar",), echo=lambda s: None)
    assert a["sar"] == b["sar"] and "bound_ratio" not in a
    assert set(ALL_POLICIES) >= {"tetriserve", "rssp-paper"}


def test_first_seed_reruns_the_bench_on_other_traces():
    from comfy_tetriserve.cost import load_cost_model
    from comfy_tetriserve.policy import make_policy
    from comfy_tetriserve.sim.simulator import SimConfig, simulate
    from comfy_tetriserve.sim.workload import WorkloadSpec, make_trace

    def run(first):
        config = BenchConfig(quick=True, jobs=1, policies=("tetriserve", "edf"), plots=False, first_seed=first)
        return Bench(config).run(("sar", "bound"), echo=lambda s: None)

    base, fresh = run(0), run(7)
    assert fresh["config"]["first_seed"] == 7
    assert fresh["sar"] != base["sar"] and fresh["bound"]["per_setting"] != base["bound"]["per_setting"]
    def on_time(seed, n):
        trace = make_trace(WorkloadSpec(num_requests=n, mix="uniform", slo_scale=1.0, seed=seed))
        return sum(o.met for o in simulate(trace, make_policy("tetriserve"), load_cost_model("h200"),
                                           SimConfig(num_gpus=8)).outcomes)

    # the fresh run's traces are exactly seed 7 (and 1007 for the bound's small traces)
    assert fresh["sar"]["uniform"]["1.0"]["tetriserve"] == on_time(7, 24) / 24
    assert fresh["bound"]["per_setting"]["uniform"]["1.0"]["tetriserve"] == on_time(1007, 12)
