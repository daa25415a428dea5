"""Admission baselines (sp{k}-admit, rssp-admit, edf-admit): a request that cannot finish by its
deadline at its degree is deferred behind every feasible one, and feasible ones keep their order."""
from __future__ import annotations

from factories import make_request, make_view

from comfy_tetriserve.cost import load_cost_model
from comfy_tetriserve.plan import validate_plan
from comfy_tetriserve.policy import make_policy
from comfy_tetriserve.sim.simulator import simulate
from comfy_tetriserve.types import RequestSnapshot

COST = load_cost_model("h200")


def plan(name, view, **options):
    out = make_policy(name, **options).plan_round(view, COST)
    validate_plan(view, out, COST.allowed_degrees)
    return out


def ids(out):
    return [a.request_ids[0] for a in out.assignments]


def test_fixed_degree_admit_defers_a_hopeless_request_and_keeps_fcfs():
    # 1024 px at 4 GPUs: 50 x 55 ms = 2.8 s; the first request has 1 s left: hopeless at degree 4
    hopeless = make_request(res=1024, arrival_at=0.0, deadline_s=1.0)
    feasible = [make_request(res=1024, arrival_at=0.1 * (i + 1), deadline_s=10.0) for i in range(3)]
    view = make_view([feasible[2], hopeless, feasible[1], feasible[0]], now=0.5)
    assert ids(plan("sp4", view)) == [hopeless.request_id, feasible[0].request_id]  # the paper's FCFS
    out = plan("sp4-admit", view)
    assert ids(out) == [feasible[0].request_id, feasible[1].request_id]  # arrival order kept
    assert all(a.sp_degree == 4 and a.num_steps == 50 for a in out.assignments)
    # nothing feasible waits: the hopeless one runs, as best effort, one step at a time
    out = plan("sp4-admit", make_view([hopeless, feasible[0]], now=0.5))
    assert ids(out) == [feasible[0].request_id, hopeless.request_id]
    assert [a.num_steps for a in out.assignments] == [50, 1]


def test_rssp_admit_never_backfills_a_hopeless_request_past_a_waiting_feasible_one():
    running = make_request(res=512, arrival_at=0.0, request_id="running")
    big = make_request(res=2048, arrival_at=0.5, deadline_s=8.0)  # needs all 8 GPUs, feasible
    late_small = make_request(res=256, arrival_at=0.0, deadline_s=0.6)  # 50 x 26 ms > 0.1 s left
    snaps = [RequestSnapshot(running, 0, (0, 1), running_until_at=3.0, steps_in_flight=50), big, late_small]
    view = make_view(snaps, busy=(0, 1), now=0.5)
    assert ids(plan("rssp", view)) == [late_small.request_id]  # backfilled in front of the 2048 px one
    assert plan("rssp-admit", view).is_empty  # the GPUs stay for the feasible request
    best_effort = make_request(res=256, arrival_at=0.2, deadline_s=None)
    assert ids(plan("rssp-admit", make_view([best_effort, late_small], now=0.5))) == [
        late_small.request_id, best_effort.request_id]  # no feasible work: best effort in arrival order


def test_edf_admit_defers_late_work_while_live_work_waits():
    now = 10.0
    late = make_request(res=512, arrival_at=0.0, deadline_s=10.5)
    soon = make_request(res=1024, arrival_at=9.0, deadline_s=4.0)
    later = make_request(res=1024, arrival_at=8.0, deadline_s=8.0)
    third = make_request(res=1024, arrival_at=7.0, deadline_s=9.0)
    view = make_view([RequestSnapshot(third, 0, (0, 1, 2, 3), running_until_at=11.0, steps_in_flight=5), late,
                      later, soon], busy=(0, 1, 2, 3), now=now)
    # 4 free GPUs: the earliest deadline gets them, the later one waits; EDF then backfills nothing
    # (the late 512 px request needs 2 GPUs at its RSSP degree, and none are left)
    assert ids(plan("edf-admit", view)) == [soon.request_id]
    other = make_request(res=512, arrival_at=7.5, deadline_s=9.0)
    small_view = make_view([RequestSnapshot(third, 0, (0, 1, 2, 3), running_until_at=11.0, steps_in_flight=5),
                            RequestSnapshot(other, 0, (4, 5), running_until_at=11.0, steps_in_flight=5), late, later],
                           now=now, busy=(0, 1, 2, 3, 4, 5))
    # 2 free GPUs: too few for the live 1024 px request (4), which waits; plain EDF gives them to
    # the late request, edf-admit keeps them free
    assert ids(plan("edf", small_view)) == [late.request_id]
    assert plan("edf-admit", small_view).is_empty


def test_in_the_simulator_the_deferred_request_no_longer_costs_a_feasible_one():
    # a hopeless 2048 px request arrives first, then a 1024 px one that is feasible at degree 4
    # alone; plain SP=8 runs the 2048 px request to completion (5.8 s) and misses the second
    hopeless = make_request(res=2048, arrival_at=0.0, deadline_s=5.0)
    feasible = make_request(res=1024, arrival_at=0.5, deadline_s=3.0)
    plain = simulate((hopeless, feasible), make_policy("sp8"), COST)
    admit = simulate((hopeless, feasible), make_policy("sp8-admit"), COST)
    assert plain.sar() == 0.0 and admit.sar() == 0.5
    by_id = {o.request.request_id: o for o in admit.outcomes}
    assert by_id[feasible.request_id].met
    assert by_id[hopeless.request_id].finished_at is not None  # best effort: it still finishes
    assert by_id[hopeless.request_id].finished_at > by_id[feasible.request_id].finished_at
