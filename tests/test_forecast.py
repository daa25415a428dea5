"""forecast_finish: the view played forward equals the simulator continuing without new arrivals."""
from __future__ import annotations

import math
import time

import pytest
from factories import make_request, make_view

from comfy_tetriserve.cost import load_cost_model
from comfy_tetriserve.policy import make_policy
from comfy_tetriserve.sim.forecast import forecast_finish
from comfy_tetriserve.sim.simulator import SimConfig, Simulation
from comfy_tetriserve.sim.workload import WorkloadSpec, make_trace

COST = load_cost_model("h200")
EXACT = SimConfig(dispatch_overhead_s=0.0, latent_bytes_per_token=0, link_alpha_s=0.0)


@pytest.mark.parametrize("name", ["tetriserve", "edf", "rssp", "sp2"])
def test_forecast_matches_the_simulation(name):
    trace = make_trace(WorkloadSpec(num_requests=40, mix="skewed", slo_scale=1.3, rate_per_min=30, seed=3))
    cut = trace[25].arrival_at
    head = [r for r in trace if r.arrival_at <= cut]
    sim = Simulation(head, make_policy(name), COST, EXACT).run(until=cut)
    view = sim.engine.view(sim.now)
    assert any(s.is_running for s in view.requests) and len(view.requests) >= 3
    predicted = forecast_finish(view, make_policy(name), COST, exact=True)
    fast = forecast_finish(view, make_policy(name), COST)
    sim.run()
    actual = {o.request.request_id: o.finished_at for o in sim.result().outcomes}
    assert set(predicted) == {s.request_id for s in view.requests}
    for rid, t in predicted.items():
        assert t == pytest.approx(actual[rid], abs=1e-6), rid
    # the fast variant differs only for requests that miss their deadline anyway
    for s in view.requests:
        if actual[s.request_id] <= s.request.deadline_at:
            assert fast[s.request_id] == pytest.approx(actual[s.request_id], abs=1e-6)


def test_forecast_is_fast_for_tens_of_requests():
    reqs = [make_request(res=(256, 512, 1024)[i % 3], deadline_s=8.0, arrival_at=-0.1 * i) for i in range(30)]
    view = make_view(reqs)
    policy = make_policy("tetriserve")
    forecast_finish(view, policy, COST)
    t0 = time.perf_counter()
    out = forecast_finish(view, policy, COST)
    elapsed = time.perf_counter() - t0
    assert all(math.isfinite(t) and t > 0 for t in out.values())
    assert elapsed < 0.25, elapsed  # a few ms on an idle core; generous for a shared CI box


def test_forecast_horizon():
    view = make_view([make_request(res=2048, deadline_s=None)])
    assert forecast_finish(view, make_policy("sp1"), COST, horizon_s=1.0) == {view.requests[0].request_id: math.inf}
