"""The round loop's state machine (torch-free), driven by hand like the simulator drives it."""
from __future__ import annotations

import pytest
from factories import PowerLawCost, make_request

from comfy_tetriserve.core.engine import Engine
from comfy_tetriserve.errors import Conflict, NotFound, PlanError
from comfy_tetriserve.types import Assignment, AssignmentResult, RequestStatus, RoundPlan


class OneGpuFifo:
    """Test policy: each plannable request (in order) gets one free GPU for up to ``chunk`` steps."""

    def __init__(self, chunk=10, lazy=False):
        self.chunk, self.lazy = chunk, lazy

    def plan_round(self, view, cost):
        if self.lazy:
            return RoundPlan(view.round_index, 0.0)
        free = list(view.free_gpu_ids)
        out = []
        for snap in view.plannable:
            if not free:
                break
            out.append(Assignment((snap.request_id,), (free.pop(0),), min(self.chunk, snap.steps_left)))
        return RoundPlan(view.round_index, 1.0, tuple(out))


def finish(engine, a, now, steps=None, error=None):
    return engine.apply_result(
        AssignmentResult(a, started_at=now - 1, finished_at=now, steps_done=a.num_steps if steps is None else steps,
                         error=error), now)


def test_request_runs_to_completion_over_rounds():
    eng = Engine(OneGpuFifo(chunk=20), PowerLawCost(), range(2))
    r = make_request(num_steps=50)
    eng.submit(r)
    now = 0.0
    for expected_left in (30, 10, 0):
        plan = eng.plan(now)
        assert plan is not None and len(plan.assignments) == 1
        eng.apply_plan(plan, now)
        assert eng.state(r.request_id).status is RequestStatus.RUNNING
        assert eng.plan(now) is None  # the only request runs: nothing to plan
        now += 1
        (st,) = finish(eng, plan.assignments[0], now)
        assert st.steps_left == expected_left
    assert st.status is RequestStatus.FINISHED and st.finished_at == now
    assert st.met_deadline is True  # 3 s against a 5 s deadline
    assert eng.round_index == 3
    assert len(eng.records()) == 3 and all(rec.finished_at is not None for rec in eng.records())
    assert st.gpu_seconds == pytest.approx(3.0)


def test_busy_gpus_are_not_plannable_and_results_free_them():
    eng = Engine(OneGpuFifo(chunk=50), PowerLawCost(), range(2))
    reqs = [make_request() for _ in range(3)]
    for r in reqs:
        eng.submit(r)
    plan = eng.plan(0.0)
    eng.apply_plan(plan, 0.0)
    assert eng.busy_gpu_ids == {0, 1} and eng.plan(0.5) is None
    finish(eng, plan.assignments[0], 1.0)
    plan2 = eng.plan(1.0)
    assert [a.request_ids for a in plan2.assignments] == [(reqs[2].request_id,)]
    assert plan2.assignments[0].gpu_ids == (0,)


def test_cancel_queued_and_running():
    eng = Engine(OneGpuFifo(chunk=5), PowerLawCost(), range(1))
    a, b = make_request(), make_request()
    eng.submit(a)
    eng.submit(b)
    plan = eng.plan(0.0)
    eng.apply_plan(plan, 0.0)
    assert eng.cancel(b.request_id, 0.1).status is RequestStatus.CANCELLED
    st = eng.cancel(a.request_id, 0.2)
    assert st.status is RequestStatus.RUNNING and st.cancel_requested
    (st,) = finish(eng, plan.assignments[0], 1.0)
    assert st.status is RequestStatus.CANCELLED and st.steps_done == 5
    assert eng.free_gpu_ids == (0,) and eng.plan(1.0) is None
    with pytest.raises(Conflict):
        eng.cancel(a.request_id, 2.0)
    with pytest.raises(NotFound):
        eng.cancel("missing", 2.0)


def test_failed_assignment_fails_request():
    eng = Engine(OneGpuFifo(), PowerLawCost(), range(1))
    r = make_request()
    eng.submit(r)
    plan = eng.plan(0.0)
    eng.apply_plan(plan, 0.0)
    (st,) = finish(eng, plan.assignments[0], 1.0, steps=3, error="worker died")
    assert st.status is RequestStatus.FAILED and st.error == "worker died" and st.steps_done == 3


def test_requeue_keeps_progress():
    eng = Engine(OneGpuFifo(chunk=10), PowerLawCost(), range(1))
    r = make_request()
    eng.submit(r)
    plan = eng.plan(0.0)
    eng.apply_plan(plan, 0.0)
    eng.requeue(plan.assignments[0], steps_done=4, result_at=0.5)
    st = eng.state(r.request_id)
    assert st.status is RequestStatus.WAITING and st.steps_done == 4 and eng.free_gpu_ids == (0,)


def test_unhealthy_gpus_leave_the_view():
    eng = Engine(OneGpuFifo(), PowerLawCost(), range(4))
    eng.set_gpu_health(2, False)
    assert eng.view(0.0).gpu_ids == (0, 1, 3)
    eng.set_gpu_health(2, True)
    assert eng.view(0.0).gpu_ids == (0, 1, 2, 3)


def test_lazy_policy_cannot_stall_an_idle_engine():
    eng = Engine(OneGpuFifo(lazy=True), PowerLawCost(), range(2))
    eng.submit(make_request())
    with pytest.raises(PlanError, match="empty plan"):
        eng.plan(0.0)


def test_duplicate_submit_and_forget():
    eng = Engine(OneGpuFifo(), PowerLawCost(), range(1))
    r = make_request()
    eng.submit(r)
    with pytest.raises(Conflict):
        eng.submit(r)
    with pytest.raises(Conflict):
        eng.forget(r.request_id)
    eng.cancel(r.request_id, 0.0)
    eng.forget(r.request_id)
    with pytest.raises(NotFound):
        eng.state(r.request_id)


def test_records_bounded():
    eng = Engine(OneGpuFifo(chunk=1), PowerLawCost(), range(1), record_limit=3)
    r = make_request(num_steps=10)
    eng.submit(r)
    for i in range(10):
        plan = eng.plan(float(i))
        eng.apply_plan(plan, float(i))
        finish(eng, plan.assignments[0], i + 1.0)
    recs = eng.records()
    assert len(recs) == 3 and all(rec.finished_at is not None for rec in recs)
    assert [rec.round_index for rec in recs] == [7, 8, 9]
