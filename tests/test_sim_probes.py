"""Probes of the bench: bursty traces, step-time noise, a slower engine; the isolated bound; the
report's probes section (shape and bound)."""
from __future__ import annotations

import statistics

import pytest
from factories import make_request

from comfy_tetriserve.cost import load_cost_model
from comfy_tetriserve.errors import InvalidRequest
from comfy_tetriserve.policy import make_policy
from comfy_tetriserve.sim.bench import Bench, BenchConfig
from comfy_tetriserve.sim.bound import isolated_bound
from comfy_tetriserve.sim.probes import PROBES, ScaledCostModel
from comfy_tetriserve.sim.simulator import SimConfig, Simulation, simulate
from comfy_tetriserve.sim.workload import WorkloadSpec, make_trace

COST = load_cost_model("h200")


def test_bursts_arrive_together_at_the_same_mean_rate():
    spec = WorkloadSpec(num_requests=1000, rate_per_min=12.0, burst_size=5, seed=3)
    trace = make_trace(spec)
    times = [r.arrival_at for r in trace]
    bursts = [times[i:i + 5] for i in range(0, len(times), 5)]
    assert all(len(set(b)) == 1 for b in bursts)  # five requests at one instant
    starts = [b[0] for b in bursts]
    assert all(b > a for a, b in zip(starts, starts[1:]))  # distinct bursts
    mean_rate_per_min = 60.0 * len(trace) / times[-1]
    assert 10.8 < mean_rate_per_min < 13.2  # same mean rate (1000 requests: +-10 %)
    plain = [r.arrival_at for r in make_trace(WorkloadSpec(num_requests=1000, rate_per_min=12.0, seed=3))]
    assert len(set(plain)) == 1000  # the plain trace has no bursts
    with pytest.raises(InvalidRequest):
        WorkloadSpec(burst_size=0)


def test_step_noise_has_the_configured_coefficient_of_variation():
    # one-step requests far apart on SP=1: each latency is dispatch + one noisy step
    trace = [make_request(res=1024, num_steps=1, arrival_at=10.0 * i, deadline_s=5.0) for i in range(400)]
    step = COST.step_time_s("flux-dev", 1024, 1024, 1, 1)
    quiet = simulate(trace, make_policy("sp1"), COST, SimConfig())
    noisy = simulate(trace, make_policy("sp1"), COST, SimConfig(step_jitter_cv=0.1, seed=1))
    lat_quiet = [o.latency_s - 0.001 for o in quiet.outcomes]
    lat_noisy = [o.latency_s - 0.001 for o in noisy.outcomes]
    assert max(lat_quiet) - min(lat_quiet) < 1e-9 and lat_quiet[0] == pytest.approx(step)
    cv = statistics.pstdev(lat_noisy) / statistics.fmean(lat_noisy)
    assert 0.085 < cv < 0.115, cv
    assert statistics.fmean(lat_noisy) == pytest.approx(step, rel=0.02)


def test_slow_engine_probe_runs_every_step_ten_percent_longer():
    slow = ScaledCostModel(COST, 1.1)
    assert slow.allowed_degrees("flux-dev") == COST.allowed_degrees("flux-dev")
    assert slow.step_time_s("flux-dev", 512, 512, 1, 4) == pytest.approx(1.1 * COST.step_time_s("flux-dev", 512, 512, 1, 4))
    r = make_request(res=1024, arrival_at=0.0, deadline_s=9.0)
    base = simulate([r], make_policy("sp4"), COST).outcomes[0].latency_s
    res = simulate([r], make_policy("sp4"), COST, true_cost=slow).outcomes[0].latency_s
    assert (res - 0.001) == pytest.approx(1.1 * (base - 0.001))
    assert PROBES["slow-engine"].true_cost_scale == 1.1 and PROBES["bursty"].spec == {"burst_size": 5}


def test_online_correction_learns_the_slow_engine_as_the_service_does():
    slow = ScaledCostModel(COST, 1.1)
    trace = make_trace(WorkloadSpec(num_requests=80, slo_scale=1.5, seed=4))
    stale = Simulation(trace, make_policy("tetriserve"), COST, SimConfig(), true_cost=slow).run()
    online = Simulation(trace, make_policy("tetriserve"), COST, SimConfig(online_correction=True),
                        true_cost=slow).run()
    assert stale.cost is COST  # no correction: plans with the profile throughout
    learnt = online.cost.drift()
    assert learnt and all(v == pytest.approx(1.1, abs=1e-9) for v in learnt.values()), learnt
    assert online.cost.observations() == sum(  # every simulated step was fed, as the service feeds them
        st.steps_done for st in online.engine.states())
    # every policy plans with the corrected model: predictions now match the engine
    assert online.cost.step_time_s("flux-dev", 1024, 1024, 1, 4) == pytest.approx(slow.step_time_s("flux-dev", 1024, 1024, 1, 4))
    assert online.result().sar() > stale.result().sar()
    # with the profile right, the correction changes nothing
    plain = simulate(trace, make_policy("tetriserve"), COST)
    same = simulate(trace, make_policy("tetriserve"), COST, SimConfig(online_correction=True))
    assert [o.finished_at for o in same.outcomes] == [o.finished_at for o in plain.outcomes]
    assert PROBES["slow-engine"].sim == {"online_correction": True}


def test_isolated_bound_counts_requests_that_could_make_it_alone():
    # 2048 px: 50 x 116.5 ms = 5.83 s at 8 GPUs: infeasible at scale 1.0 (5 s) and 1.1, feasible at 1.2
    reqs = [make_request(res=res, arrival_at=0.0, deadline_s=scale * base)
            for scale in (1.0, 1.1, 1.2) for res, base in ((512, 2.0), (2048, 5.0))]
    reqs.append(make_request(res=256, deadline_s=None))  # best effort: not counted
    assert isolated_bound(reqs, COST, 8) == pytest.approx(4 / 6)
    assert isolated_bound(reqs, COST, 4) == pytest.approx(3 / 6)  # 2048 px at 4 GPUs: 11 s
    for seed in range(2):  # no policy beats it
        trace = make_trace(WorkloadSpec(num_requests=60, slo_scale=1.0, seed=seed))
        bound = isolated_bound(trace, COST, 8, overhead_s=0.001)
        assert bound < 1.0
        assert simulate(trace, make_policy("tetriserve"), COST).sar() <= bound + 1e-12


def test_report_has_probes_isolated_bound_and_the_strongest_baseline():
    policies = ("tetriserve", "sp4-admit", "edf-admit", "edf")
    config = BenchConfig(quick=True, jobs=1, policies=policies, plots=False, num_requests=16, bound_requests=8,
                         mixes=("uniform",))
    report = Bench(config).run(("sar", "probes"), echo=lambda s: None)
    assert set(report["probes"]) == set(PROBES)
    for probe, by_mix in report["probes"].items():
        assert set(by_mix) == {"uniform"}
        for by_scale in by_mix.values():
            assert set(by_scale) == {"1.0"}
            for row in by_scale.values():
                assert set(row) == set(policies) and all(0.0 <= v <= 1.0 for v in row.values())
        details = report["probe_details"]["probes"][probe]
        assert 0.0 < details["bound"]["ratio"] <= 1.0 + 1e-9
        row = details["rows"]["uniform"]["1.0"]
        assert row["strongest_baseline"] in policies[1:] and 0.0 <= row["isolated_bound"] <= 1.0
        alone = details["bound"].get("bursts_alone")
        if probe == "bursty":  # each burst alone: 8 requests in bursts of 5 -> 2 bursts, bound >= TetriServe
            assert alone["bursts"] == 2 and 0 < alone["tetriserve"] <= alone["bound"] <= 8
            assert alone["ratio"] == pytest.approx(alone["tetriserve"] / alone["bound"])
        else:
            assert alone is None
    for mix in ("uniform",):
        g = report["gains"][mix]
        assert set(g["strongest_baseline"].values()) <= set(policies[1:])
        for s, v in report["sar"][mix].items():
            assert v["tetriserve"] <= report["isolated_bound"][mix][s] + 1e-12
            best = max(x for p, x in v.items() if p != "tetriserve")
            assert g["per_scale_vs_strongest"][s] == pytest.approx((v["tetriserve"] - best) / best)
