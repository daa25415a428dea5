"""Seeded workloads in the paper's shape."""
from __future__ import annotations

import pytest

from comfy_tetriserve.errors import InvalidRequest
from comfy_tetriserve.sim.workload import MIXES, WorkloadSpec, make_random_view, make_trace


def test_skewed_mix_is_the_papers():
    assert [round(p, 3) for p in MIXES["skewed"]] == [0.167, 0.175, 0.211, 0.447]
    assert MIXES["uniform"] == (0.25, 0.25, 0.25, 0.25)


def test_trace_is_seeded_and_scale_only_moves_deadlines():
    a = make_trace(WorkloadSpec(num_requests=200, seed=3, slo_scale=1.0))
    b = make_trace(WorkloadSpec(num_requests=200, seed=3, slo_scale=1.5))
    c = make_trace(WorkloadSpec(num_requests=200, seed=4, slo_scale=1.0))
    assert [(r.arrival_at, r.height) for r in a] == [(r.arrival_at, r.height) for r in b]
    assert [r.arrival_at for r in a] != [r.arrival_at for r in c]
    base = {256: 1.5, 512: 2.0, 1024: 3.0, 2048: 5.0}
    for ra, rb in zip(a, b):
        assert ra.deadline_at - ra.arrival_at == pytest.approx(base[ra.height])
        assert rb.deadline_at - rb.arrival_at == pytest.approx(1.5 * base[rb.height])
    assert a == make_trace(WorkloadSpec(num_requests=200, seed=3, slo_scale=1.0))


def test_rate_and_mix_statistics():
    trace = make_trace(WorkloadSpec(num_requests=3000, rate_per_min=12, mix="skewed", seed=1))
    span_min = (trace[-1].arrival_at - trace[0].arrival_at) / 60
    assert len(trace) / span_min == pytest.approx(12, rel=0.06)
    share_2048 = sum(r.height == 2048 for r in trace) / len(trace)
    assert share_2048 == pytest.approx(0.447, abs=0.03)
    assert all(r.num_steps == 50 and r.model == "flux-dev" for r in trace)


def test_best_effort_fraction_and_bad_specs():
    trace = make_trace(WorkloadSpec(num_requests=400, best_effort_fraction=0.25, seed=2))
    share = sum(r.deadline_at is None for r in trace) / len(trace)
    assert 0.18 < share < 0.32
    with pytest.raises(InvalidRequest):
        WorkloadSpec(mix="bimodal")
    with pytest.raises(InvalidRequest):
        WorkloadSpec(rate_per_min=0)


def test_random_view_shape():
    view = make_random_view(64, seed=1, running=True)
    assert len(view.requests) == 64 and view.busy_gpu_ids
    running = [r for r in view.requests if r.is_running]
    assert {g for r in running for g in r.gpu_ids} == view.busy_gpu_ids
    assert make_random_view(64, seed=1, running=True) == view
