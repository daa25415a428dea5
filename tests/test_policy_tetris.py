"""The TetriServe planner: validity over random views, the knapsack against brute force, the decisions."""
from __future__ import annotations

import itertools
import random

import pytest
from factories import make_request, make_view
from hypothesis import given, settings
from hypothesis import strategies as st

from comfy_tetriserve.cost import load_cost_model
from comfy_tetriserve.plan import all_subset_groups, validate_plan
from comfy_tetriserve.policy import make_policy, policy_names
from comfy_tetriserve.policy.packing import admit_by_deadline, choose_round_end, group_knapsack
from comfy_tetriserve.policy.tetris import TetriServePolicy
from comfy_tetriserve.sim.simulator import SimConfig, Simulation
from comfy_tetriserve.sim.workload import make_random_view
from comfy_tetriserve.types import RequestSnapshot, SchedulerView

COST = load_cost_model("h200")


def run(view, **options):
    policy = TetriServePolicy(**options)
    out = policy.plan_round(view, COST)
    validate_plan(view, out, COST.allowed_degrees)
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), size=st.sampled_from([1, 2, 3, 5, 8, 16, 40]), running=st.booleans(),
       best_effort=st.sampled_from([0.0, 0.3]), all_groups=st.booleans(), num_gpus=st.sampled_from([4, 8]))
def test_every_policy_plans_validly_and_deterministically(seed, size, running, best_effort, all_groups, num_gpus):
    view = make_random_view(size, seed=seed, running=running, best_effort_fraction=best_effort, num_gpus=num_gpus)
    if all_groups:
        view = SchedulerView(view.now, view.round_index, view.gpu_ids, all_subset_groups(view.gpu_ids),
                             view.requests, view.busy_gpu_ids)
    for name in policy_names():
        policy = make_policy(name)
        plan = policy.plan_round(view, COST)
        validate_plan(view, plan, COST.allowed_degrees)
        assert policy.plan_round(view, COST) == plan


def brute_knapsack(items, capacity):
    best = -1
    for combo in itertools.product(*[[-1] + list(range(len(opts))) for _, opts in items]):
        gpus = sum(items[i][1][o][0] for i, o in enumerate(combo) if o >= 0)
        if gpus > capacity:
            continue
        value = sum(items[i][1][o][1] if o >= 0 else items[i][0] for i, o in enumerate(combo))
        best = max(best, value)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_group_knapsack_equals_brute_force(seed):
    rng = random.Random(seed)
    capacity = rng.choice([1, 2, 4, 8])
    items = []
    for _ in range(rng.randint(1, 5)):
        none = rng.choice([0, 0, 10, 1000])
        opts = [(k, rng.randint(0, 2000)) for k in rng.sample([1, 2, 4, 8], rng.randint(0, 3))]
        items.append((none, opts))
    picks = group_knapsack(items, capacity)
    gpus = sum(items[i][1][o][0] for i, o in enumerate(picks) if o >= 0)
    value = sum(items[i][1][o][1] if o >= 0 else items[i][0] for i, o in enumerate(picks))
    assert gpus <= capacity
    assert value == brute_knapsack(items, capacity)


def test_lone_request_gets_its_plan_then_idle_gpus():
    r = make_request(res=1024, deadline_s=3.0)  # least GPU time: a k2/k4 mix
    plain = run(make_view([r]), scale_up=False)
    assert [a.sp_degree for a in plain.assignments] in ([2], [4])
    scaled = run(make_view([r]))
    assert scaled.assignments[0].sp_degree == 8  # elastic scale-up: nothing else wants the GPUs


def test_late_requests_get_one_gpu_while_deadlines_need_the_rest():
    live = make_request(res=1024, deadline_s=3.0, request_id="live")
    late_small = make_request(res=512, arrival_at=-5.0, deadline_s=5.5, request_id="late512")  # 0.5 s left
    late_big = make_request(res=2048, arrival_at=-5.0, deadline_s=5.5, request_id="late2048")
    out = run(make_view([live, late_small, late_big]), scale_up=False)
    by_id = {a.request_ids[0]: a for a in out.assignments}
    assert by_id["live"].sp_degree >= 2
    assert by_id["late512"].sp_degree == 1
    assert "late2048" not in by_id  # its one-GPU step (0.85 s) would outlast the round


def test_best_effort_never_takes_what_deadlines_need():
    tight = [make_request(res=1024, deadline_s=2.9, request_id=f"t{i}") for i in range(2)]  # k4 each, 8 GPUs
    best_effort = make_request(res=256, deadline_s=None, request_id="be")
    out = run(make_view(tight + [best_effort]))
    assert {a.request_ids[0] for a in out.assignments} == {"t0", "t1"}
    # alone, the best-effort request runs (in short pieces)
    alone = run(make_view([best_effort]))
    assert alone.assignments and alone.assignments[0].request_ids == ("be",)


def test_identical_small_requests_share_a_batched_step():
    a = make_request(res=256, deadline_s=3.0, request_id="a")
    b = make_request(res=256, deadline_s=3.5, request_id="b")
    out = run(make_view([a, b]))
    assert [set(x.request_ids) for x in out.assignments] == [{"a", "b"}]
    separate = run(make_view([a, b]), batching=False)
    assert len(separate.assignments) == 2


def test_placement_is_preserved():
    r = make_request(res=1024, deadline_s=3.0)
    snap = RequestSnapshot(r, steps_done=10, gpu_ids=(4, 5, 6, 7))
    other = make_request(res=1024, deadline_s=3.0)
    out = run(make_view([snap, other]), scale_up=False)
    mine = next(a for a in out.assignments if a.request_ids == (r.request_id,))
    if mine.sp_degree == 4:
        assert mine.gpu_ids == (4, 5, 6, 7)
    assert set(mine.gpu_ids) <= {4, 5, 6, 7}


def test_gap_mode_fills_free_gpus_within_the_running_round():
    running = RequestSnapshot(make_request(res=1024, deadline_s=3.0), 10, gpu_ids=(0, 1, 2, 3),
                              running_until_at=0.4, steps_in_flight=7)
    newcomer = make_request(res=512, deadline_s=2.0)
    out = run(make_view([running, newcomer], busy=(0, 1, 2, 3)))
    (a,) = out.assignments
    assert set(a.gpu_ids) <= {4, 5, 6, 7}
    t = COST.step_time_s("flux-dev", 512, 512, 1, a.sp_degree)
    assert a.num_steps * t <= 0.4 + 1e-9  # ends by the running round's end


def test_admission_keeps_the_request_that_can_still_make_it():
    # two 2048 px requests that each need the whole box for 5.8 s of their 6 s: only one can finish
    ahead = RequestSnapshot(make_request(res=2048, deadline_s=6.0, request_id="ahead", arrival_at=-0.5), 5)
    fresh = make_request(res=2048, deadline_s=6.0, request_id="fresh", arrival_at=0.0)
    out = run(make_view([ahead, fresh], now=0.0))
    degrees = {a.request_ids[0]: a.sp_degree for a in out.assignments}
    assert degrees.get("ahead") == 8 and "fresh" not in degrees


def test_idle_engine_never_gets_an_empty_plan():
    be = make_request(res=2048, deadline_s=None)
    out = run(make_view([be]), background_round_s=0.01)  # no piece fits: one step anyway
    assert out.assignments and out.assignments[0].num_steps == 1


def test_bad_options_are_rejected():
    for bad in ({"tau_rule": "x"}, {"tie_break": "x"}, {"mix_order": "x"}, {"granularity_steps": 0},
                {"admit_margin_frac": 1.0}, {"plan_margin_frac": -0.1}, {"scale_up_reserve": -1},
                {"scale_up_commit_s": -1.0}, {"burst_window_s": -0.001}):
        with pytest.raises(ValueError):
            TetriServePolicy(**bad)


def test_round_end_avoids_idle_gpus():
    # a 4-GPU request stepping 0.22 s and a 4-GPU one stepping 0.055 s, tau 0.58 s: ending at 0.58 s
    # would idle the first for 0.14 s; 0.44 s (2 steps) or 0.66 s (3 steps) waste almost nothing
    end = choose_round_end([(4, 0.22, 50), (4, 0.055, 50)], 0.58)
    assert min(abs(end - 0.44), abs(end - 0.66)) < 1e-9
    # one step longer than tau: the round is that step
    assert choose_round_end([(8, 0.9, 50), (1, 0.03, 50)], 0.2) == pytest.approx(0.9)
    # a request with one step left ends the round with it rather than idling 8 GPUs to tau
    assert choose_round_end([(8, 0.1, 1)], 0.5) == pytest.approx(0.1)


# ------------------------------------------------------------------ contention margins and arrivals
def _fluid_feasible(jobs, capacity, now=0.0):
    cum = 0.0
    for d, w, _ in sorted(jobs):
        cum += w
        if cum > capacity * (d - now) + 1e-9:
            return False
    return True


@pytest.mark.parametrize("seed", range(30))
def test_admission_keeps_as_many_as_brute_force(seed):
    rng = random.Random(seed)
    jobs = [(rng.choice([0.5, 1.0, 1.5, 2.0, 3.0]), rng.choice([0.5, 1.0, 2.0, 4.0, 6.0]), True)
            for _ in range(rng.randint(1, 7))]
    capacity = rng.choice([2.0, 4.4, 8.0])
    dropped = admit_by_deadline(jobs, capacity, 0.0)
    kept = [j for i, j in enumerate(jobs) if i not in dropped]
    assert _fluid_feasible(kept, capacity)
    best = max(len(c) for r in range(len(jobs) + 1) for c in itertools.combinations(jobs, r)
               if _fluid_feasible(c, capacity))
    assert len(kept) == best


def test_admission_drops_the_most_work_and_never_a_running_request():
    jobs = [(1.0, 4.0, True), (2.0, 6.0, True), (2.0, 8.0, True)]
    assert admit_by_deadline(jobs, 8.0, 0.0) == {2}  # 18 GPU s due by 2 s on 8 GPUs: the biggest goes
    assert admit_by_deadline(jobs, 8.0 * 0.55, 0.0) == {1, 2}  # less capacity, fewer admitted
    running = [(1.0, 7.0, False), (1.0, 2.0, True)]
    assert admit_by_deadline(running, 8.0, 0.0) == {1}  # the running request has more work but stays


def test_admission_margin_grows_with_contention():
    # eight 256 px requests (3 s, one GPU each) and two 1024 px ones: the fluid test admits one
    # 1024 px request; under this contention (10 live on 8 GPUs) the margin keeps both back
    # (arrivals 0.1 s apart: sustained contention, not a burst; deadlines as if all arrived at 0)
    small = [make_request(res=256, arrival_at=-0.1 * i, deadline_s=3.0 + 0.11 * i, request_id=f"s{i}")
             for i in range(8)]
    big = [make_request(res=1024, arrival_at=-0.8 - 0.1 * i, deadline_s=4.8 + 0.1 * i, request_id=f"b{i}")
           for i in range(2)]
    view = make_view(small + big)
    assert "admitted=8 doomed=2" in run(view, batching=False).note
    assert "admitted=9 doomed=1" in run(view, batching=False, admit_margin_frac=0.0).note
    # with two live requests there is no contention: both margins are zero, the plan is the paper's
    pair = make_view([make_request(res=1024, deadline_s=3.0), make_request(res=512, deadline_s=2.0)])
    assert run(pair) == run(pair, plan_margin_frac=0.0, admit_margin_frac=0.0)


def _burst(arrival_gap_s):
    # ten small requests (five 256 px, five 512 px) with deadlines as if all arrived at 0: the
    # fluid test fits them all on the whole box, not on the box less the contention margin
    reqs = [make_request(res=256 if i % 2 else 512, arrival_at=-arrival_gap_s * i,
                         deadline_s=3.0 + arrival_gap_s * i, request_id=f"q{i}") for i in range(10)]
    return make_view(reqs)


def test_a_burst_of_small_requests_is_admitted_where_it_is_feasible():
    policy = TetriServePolicy()
    assert policy.burst_window_s > 0
    burst = _burst(0.0)  # submitted together
    assert "admitted=8 doomed=0" in run(burst).note  # (two pairs share batched steps)
    # the same requests arriving apart are sustained contention: the margin keeps some back
    spread = _burst(0.05)
    assert "doomed=0" not in run(spread).note
    # the margin is what dooms them: without it (or with bursts not told apart) the spread set and
    # the burst are planned alike
    assert "doomed=0" in run(spread, admit_margin_frac=0.0).note
    assert "doomed=0" not in run(burst, burst_window_s=0.0).note
    # the burst rule touches the admission margin only: the plan margin still counts every request
    assert run(burst, burst_window_s=0.0, admit_margin_frac=0.0) == run(burst, admit_margin_frac=0.0)


def test_a_burst_is_admitted_in_the_simulation_too():
    # bursts of 5 small requests at one instant, beyond what the box can serve: counting each arrival of
    # a burst towards the admission margin dooms requests the box could serve (SAR 0.35 against 0.45)
    from comfy_tetriserve.sim.simulator import simulate
    from comfy_tetriserve.sim.workload import WorkloadSpec, make_trace

    trace = make_trace(WorkloadSpec(num_requests=40, rate_per_min=60.0, mix="small", slo_scale=1.0, seed=3,
                                    burst_size=5))
    sar = {w: simulate(trace, TetriServePolicy(burst_window_s=w), COST, SimConfig(num_gpus=8)).sar()
           for w in (0.0, TetriServePolicy().burst_window_s)}
    assert sar[TetriServePolicy().burst_window_s] > sar[0.0] + 0.05, sar


def test_scale_up_reserve_keeps_gpus_out_of_scale_up():
    r = make_request(res=1024, deadline_s=3.0)
    assert sum(a.sp_degree for a in run(make_view([r])).assignments) == 8
    reserved = run(make_view([r]), scale_up_reserve=1)
    assert sum(a.sp_degree for a in reserved.assignments) <= 7


def test_scale_up_grant_is_bounded_and_planned_steps_are_not():
    r = make_request(res=1024, deadline_s=3.0, request_id="lone")
    t8 = COST.step_time_s("flux-dev", 1024, 1024, 1, 8)
    (free,) = run(make_view([r])).assignments
    assert free.sp_degree == 8 and free.num_steps * t8 > 0.1  # unbounded: the grant fills the round
    (bounded,) = run(make_view([r]), scale_up_commit_s=0.04).assignments
    assert bounded.sp_degree == 8 and bounded.num_steps * t8 <= max(0.04, t8) + 1e-9
    # a request running at its planned degree keeps its steps: only grants beyond the plan are cut
    tight = [make_request(res=1024, deadline_s=2.78, request_id=f"t{i}") for i in range(2)]  # plan: k4 only
    plain = run(make_view(tight), scale_up_commit_s=0.04)
    assert [a.sp_degree for a in plain.assignments] == [4, 4]
    assert all(a.num_steps * COST.step_time_s("flux-dev", 1024, 1024, 1, 4) > 0.04 for a in plain.assignments)


def test_an_arrival_is_not_blocked_by_a_scale_up_grant_beyond_the_bound():
    first = make_request(res=512, deadline_s=4.0, request_id="first")  # alone: scaled up to 8 GPUs
    second = make_request(res=512, deadline_s=4.0, arrival_at=0.03, request_id="second")
    t8 = COST.step_time_s("flux-dev", 512, 512, 1, 8)
    waits = {}
    for bound in (0.0, 0.03):
        sim = Simulation([first, second], make_policy("tetriserve", scale_up_commit_s=bound), COST, SimConfig())
        sim.run()
        st = sim.engine.state("second")
        assert st.met_deadline
        waits[bound] = st.first_step_at - second.arrival_at
    assert waits[0.0] > 0.1  # waits for the round that scale-up filled (5 steps at 8 GPUs)
    assert waits[0.03] <= 0.03 + t8 + 0.002  # the grant ends within the bound (+ the step in flight)


def test_round_length_can_follow_the_tightest_slack():
    big = make_request(res=2048, deadline_s=6.0)  # 0.17 s of slack at 8 GPUs
    t8 = COST.step_time_s("flux-dev", 2048, 2048, 1, 8)
    (a,) = run(make_view([big])).assignments
    assert a.num_steps >= 5
    (b,) = run(make_view([big]), tau_slack_frac=0.5).assignments
    assert b.num_steps == 1 and b.num_steps * t8 >= 0.5 * 0.17  # never shorter than one step


def test_scale_up_and_background_stay_within_the_parallel_capacity():
    import dataclasses

    from comfy_tetriserve.cost import ProfileCostModel

    shared = ProfileCostModel(dataclasses.replace(COST.table, extra={"parallel_capacity": 4}))
    lone = make_view([make_request(res=1024, deadline_s=3.0)])
    (a,) = TetriServePolicy().plan_round(lone, shared).assignments
    assert a.sp_degree == 4  # 8 without the capacity (test_lone_request_gets_its_plan_then_idle_gpus)
    assert TetriServePolicy(use_parallel_capacity=False).plan_round(lone, shared).assignments[0].sp_degree == 8
    # planned work is not bounded: two requests that each need 4 GPUs both run
    tight = make_view([make_request(res=1024, deadline_s=2.78, request_id=f"t{i}") for i in range(2)])
    plan = TetriServePolicy().plan_round(tight, shared)
    validate_plan(tight, plan, shared.allowed_degrees)
    assert sum(x.sp_degree for x in plan.assignments) == 8
    # best-effort pieces never make more GPUs busy than the capacity
    busy = RequestSnapshot(make_request(res=1024, deadline_s=3.0), 0, gpu_ids=(0, 1, 2),
                           running_until_at=0.2, steps_in_flight=2)
    pieces = [make_request(res=256, deadline_s=None, request_id=f"be{i}") for i in range(4)]
    out = TetriServePolicy().plan_round(make_view([busy] + pieces, busy=(0, 1, 2)), shared)
    assert sum(x.sp_degree for x in out.assignments) == 1
