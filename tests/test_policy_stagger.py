"""TetriServe under bursts: staggered two-degree plans and the reserve of batched pairs."""
from __future__ import annotations

import pytest
from factories import make_request, make_view

from comfy_tetriserve.cost import load_cost_model
from comfy_tetriserve.plan import validate_plan
from comfy_tetriserve.policy.common import PAPER_BASE_DEADLINE_S
from comfy_tetriserve.policy.tetris import TetriServePolicy
from comfy_tetriserve.sim.simulator import SimConfig, simulate
from comfy_tetriserve.types import GenRequest

COST = load_cost_model("h200")
#: the behaviour before these rules: cheap degree first for every plan, pairs planned without reserve
BEFORE = {"stagger": False, "batch_margin_frac": 0.0}


def _plan(view, **options):
    out = TetriServePolicy(**options).plan_round(view, COST)
    validate_plan(view, out, COST.allowed_degrees)
    return {a.request_ids[0]: a.sp_degree for a in out.assignments}


def _burst(resolutions, scale=1.0):
    """Requests arriving at one instant with the paper's deadlines (x ``scale``)."""
    return [GenRequest(request_id=f"q{i}", model="flux-dev", height=r, width=r, num_steps=50, arrival_at=0.0,
                       deadline_at=scale * PAPER_BASE_DEADLINE_S[r]) for i, r in enumerate(resolutions)]


def _on_time(trace, **options):
    return sum(o.met for o in simulate(trace, TetriServePolicy(**options), COST, SimConfig(num_gpus=8)).outcomes)


def test_a_burst_whose_fast_shares_would_collide_runs_one_of_them_first():
    # three 256 px requests (1.5 s) and a 1024 px one (3 s) at once: cheap-first plans run every 256 px
    # request on one GPU now and on two later, all at the same time (6 GPUs) while the 1024 px request
    # needs 4: the projected demand (10) peaks above the box, so the earliest deadline runs its fast
    # share (two GPUs) first; scale-up is off to see the planned degrees
    reqs = [make_request(res=r, deadline_s=PAPER_BASE_DEADLINE_S[r], request_id=f"q{i}")
            for i, r in enumerate((256, 256, 256, 1024))]
    staggered = _plan(make_view(reqs), scale_up=False)
    assert staggered == {"q0": 2, "q1": 1, "q2": 1, "q3": 2}
    assert _plan(make_view(reqs), scale_up=False, stagger=False) == {"q0": 1, "q1": 1, "q2": 1, "q3": 2}


def test_no_stagger_where_the_projected_demand_fits():
    # two 256 px requests and a 512 px one: 2 + 2 + 2 GPUs at their fast share, the box has 8
    reqs = [make_request(res=r, deadline_s=PAPER_BASE_DEADLINE_S[r], request_id=f"q{i}")
            for i, r in enumerate((256, 256, 512))]
    view = make_view(reqs)
    assert _plan(view, scale_up=False) == _plan(view, scale_up=False, stagger=False)
    out = TetriServePolicy().plan_round(view, COST)
    assert out == TetriServePolicy(stagger=False).plan_round(view, COST)


@pytest.mark.parametrize("resolutions, before", [((256, 256, 256, 512, 512), 4), ((256, 256, 512, 512, 512), 3)])
def test_a_burst_of_small_requests_is_all_kept_where_feasible(resolutions, before):
    # five small requests at once, SLO scale 1.0: all five can make it (the default keeps them all);
    # before, pairs of identical requests were planned to end just at their deadline and missed it
    # together at the first delay (dispatch, a group change)
    trace = _burst(resolutions)
    assert _on_time(trace) == len(trace)
    assert _on_time(trace, **BEFORE) == before
    assert _on_time(trace, batch_margin_frac=0.0) < len(trace)  # the pair's reserve is what keeps them


def test_staggering_keeps_a_request_that_cheap_first_loses():
    # three 256, two 512 and one 1024 px request at once: five can make it with staggered plans, four without
    trace = _burst((256, 256, 256, 512, 512, 1024))
    assert _on_time(trace) == 5
    assert _on_time(trace, stagger=False) == 4


def test_batch_margin_is_validated():
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError):
            TetriServePolicy(batch_margin_frac=bad)
