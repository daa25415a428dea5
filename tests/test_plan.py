from __future__ import annotations

import pytest
from factories import PowerLawCost, make_request, make_view

from comfy_tetriserve.errors import PlanError
from comfy_tetriserve.plan import aligned_groups, all_subset_groups, power_of_two_degrees, validate_plan
from comfy_tetriserve.types import Assignment, RequestSnapshot, RoundPlan

COST = PowerLawCost()


def test_power_of_two_degrees():
    assert power_of_two_degrees(8) == (1, 2, 4, 8)
    assert power_of_two_degrees(6) == (1, 2, 4)
    assert power_of_two_degrees(1) == (1,)


def test_aligned_groups_eight():
    groups = aligned_groups(range(8))
    assert len(groups) == 15
    assert groups[0] == tuple(range(8))
    assert (0, 1, 2, 3) in groups and (4, 5, 6, 7) in groups and (2, 3, 4, 5) not in groups
    assert (2, 3) in groups and (1, 2) not in groups


def test_aligned_groups_six_and_holes():
    assert aligned_groups(range(6)) == ((0, 1, 2, 3), (0, 1), (2, 3), (4, 5), (0,), (1,), (2,), (3,), (4,), (5,))
    # ids need not be contiguous: alignment is by position
    assert aligned_groups([0, 2, 5, 7])[0] == (0, 2, 5, 7)


def test_all_subset_groups_counts():
    groups = all_subset_groups(range(8))
    assert len(groups) == 1 + 70 + 28 + 8


def plan(*assignments, round_index=0):
    return RoundPlan(round_index=round_index, duration_s=0.5, assignments=tuple(assignments))


def test_valid_plan_passes():
    a, b = make_request(), make_request()
    view = make_view([a, b])
    validate_plan(view, plan(Assignment((a.request_id,), (0, 1), 5), Assignment((b.request_id,), (4,), 50)),
                  COST.allowed_degrees)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda a, b: [Assignment((a,), (0, 1), 5), Assignment((b,), (1,), 5)], "booked twice"),
        (lambda a, b: [Assignment((a,), (1, 2), 5)], "not one of the executor's groups"),
        (lambda a, b: [Assignment((a,), (0,), 51)], "50 left"),
        (lambda a, b: [Assignment((a,), (0,), 0)], "num_steps"),
        (lambda a, b: [Assignment(("nope",), (0,), 1)], "unknown request"),
        (lambda a, b: [Assignment((a,), (0,), 1), Assignment((a,), (1,), 1)], "assigned twice"),
        (lambda a, b: [Assignment((a,), (6,), 1)], "busy"),
        (lambda a, b: [Assignment((a,), (1, 0), 1)], "sorted"),
        (lambda a, b: [Assignment((a, b), (0,), 1)], "differ in shape"),
        (lambda a, b: [], "empty plan"),
    ],
)
def test_invalid_plans_rejected(bad, message):
    a, b = make_request(res=512), make_request(res=1024)
    view = make_view([a, b], busy=(6, 7))
    with pytest.raises(PlanError, match=message):
        validate_plan(view, plan(*bad(a.request_id, b.request_id)), COST.allowed_degrees)


def test_degree_must_be_allowed_for_model():
    a = make_request()
    view = make_view([a])
    with pytest.raises(PlanError, match="degree 4 not allowed"):
        validate_plan(view, plan(Assignment((a.request_id,), (0, 1, 2, 3), 1)), lambda model: (1, 2))


def test_running_request_cannot_be_planned_and_empty_plan_allowed_while_running():
    a, b = make_request(), make_request()
    running = RequestSnapshot(request=a, steps_done=5, gpu_ids=(0,), running_until_at=1.0)
    view = make_view([running, b], busy=(0,))
    with pytest.raises(PlanError, match="still running"):
        validate_plan(view, plan(Assignment((a.request_id,), (1,), 1)), COST.allowed_degrees)
    validate_plan(view, plan(), COST.allowed_degrees)  # waiting for the running one is fine


def test_round_index_must_match():
    a = make_request()
    with pytest.raises(PlanError, match="round"):
        validate_plan(make_view([a]), plan(Assignment((a.request_id,), (0,), 1), round_index=3), COST.allowed_degrees)
