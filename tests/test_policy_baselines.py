"""Baselines: fixed degree (xDiT-like), RSSP, EDF."""
from __future__ import annotations

import pytest
from factories import make_request, make_view

from comfy_tetriserve.cost import load_cost_model
from comfy_tetriserve.plan import validate_plan
from comfy_tetriserve.policy import make_policy, policy_names
from comfy_tetriserve.policy.baselines import PAPER_RSSP_DEGREES, rssp_degree
from comfy_tetriserve.types import RequestSnapshot

COST = load_cost_model("h200")


def plan(name, view, **options):
    p = make_policy(name, **options)
    out = p.plan_round(view, COST)
    validate_plan(view, out, COST.allowed_degrees)
    return out


def test_registry_names():
    assert set(policy_names()) >= {"tetriserve", "sp1", "sp2", "sp4", "sp8", "rssp", "rssp-paper", "edf"}
    for name in policy_names():
        assert make_policy(name).name == name


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_fixed_degree_holds_k_gpus_for_all_steps_fcfs(k):
    reqs = [make_request(res=1024, arrival_at=float(i)) for i in range(10)]
    out = plan(f"sp{k}", make_view(list(reversed(reqs)), now=10.0))
    assert [a.request_ids[0] for a in out.assignments] == [r.request_id for r in reqs[: 8 // k]]
    assert all(a.sp_degree == k and a.num_steps == 50 for a in out.assignments)


def test_fixed_degree_waits_for_a_free_block():
    a, b = make_request(arrival_at=0.0), make_request(arrival_at=1.0)
    running = RequestSnapshot(a, 0, gpu_ids=(0, 1, 2, 3), running_until_at=5.0, steps_in_flight=50)
    view = make_view([running, b], busy=(0, 1, 2, 3), now=2.0)
    assert plan("sp8", view).is_empty  # the engine allows waiting while something runs
    assert plan("sp4", view).assignments[0].gpu_ids == (4, 5, 6, 7)


def test_rssp_degrees_from_the_profile_and_the_paper_map():
    # cheapest degree meeting the base deadline alone, 50 steps, H200 profile
    got = {res: rssp_degree(COST, "flux-dev", res, res, 1, 50, 8, base)
           for res, base in {256: 1.5, 512: 2.0, 1024: 3.0, 2048: 5.0}.items()}
    assert got == {256: 2, 512: 2, 1024: 4, 2048: 8}  # 2048 meets nothing: the fastest
    reqs = [make_request(res=r, arrival_at=i) for i, r in enumerate((256, 512, 1024, 2048))]
    out = plan("rssp-paper", make_view(reqs))
    assert {a.request_ids[0]: a.sp_degree for a in out.assignments} == {reqs[0].request_id: 1, reqs[1].request_id: 1,
                                                                      reqs[2].request_id: 2}
    assert PAPER_RSSP_DEGREES[2048] == 8


def test_rssp_backfill_versus_strict_fcfs():
    big = make_request(res=2048, arrival_at=0.0)
    small = make_request(res=256, arrival_at=1.0)
    other = make_request(res=512, arrival_at=0.0, request_id="running")
    view = make_view([RequestSnapshot(other, 0, (0, 1), running_until_at=3.0, steps_in_flight=50), big, small],
                     busy=(0, 1), now=1.0)
    assert [a.request_ids for a in plan("rssp", view).assignments] == [(small.request_id,)]
    assert plan("rssp", view, backfill=False).is_empty


def test_edf_orders_by_deadline_demotes_late_and_chunks():
    now = 10.0
    late = make_request(res=512, arrival_at=0.0, deadline_s=10.5)  # 0.5 s left, 50 steps: impossible
    soon = make_request(res=1024, arrival_at=9.0, deadline_s=4.0)
    later = make_request(res=1024, arrival_at=8.0, deadline_s=8.0)
    best_effort = make_request(res=256, arrival_at=1.0, deadline_s=None)
    out = plan("edf", make_view([late, later, soon, best_effort], now=now))
    ids = [a.request_ids[0] for a in out.assignments]
    assert ids[:2] == [soon.request_id, later.request_id]  # two 4-GPU requests fill the box
    assert late.request_id not in ids and best_effort.request_id not in ids
    assert all(a.num_steps == 5 for a in out.assignments)
    out = plan("edf", make_view([late, best_effort], now=now))
    assert [a.request_ids[0] for a in out.assignments] == [late.request_id, best_effort.request_id]
