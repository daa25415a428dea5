"""Least-GPU-time allocation and placement (shared by the policies)."""
from __future__ import annotations

import itertools

import pytest
from factories import make_request, make_view
from hypothesis import given, settings
from hypothesis import strategies as st

from comfy_tetriserve.plan import aligned_groups
from comfy_tetriserve.policy.common import Placer, nearest_resolution, plan_allocation
from comfy_tetriserve.types import RequestSnapshot


def brute_force(times: dict[int, float], steps: int, budget: float):
    """Least GPU time over every split of the steps between at most two degrees."""
    best = None
    degrees = sorted(times)
    for a, b in itertools.combinations_with_replacement(degrees, 2):
        for s_a in range(steps + 1):
            s_b = steps - s_a
            if a == b and s_b:
                continue
            dur = s_a * times[a] + s_b * times[b]
            if dur > budget + 1e-9:
                continue
            gpu = s_a * a * times[a] + s_b * b * times[b]
            if best is None or gpu < best - 1e-9:
                best = gpu
    return best


@settings(max_examples=300, deadline=None)
@given(
    base=st.floats(0.01, 0.5),
    effs=st.lists(st.floats(0.3, 1.0), min_size=3, max_size=3),
    steps=st.integers(1, 40),
    budget_frac=st.floats(0.05, 1.2),
)
def test_allocation_is_least_gpu_time(base, effs, steps, budget_frac):
    times = {1: base}
    for k, e in zip((2, 4, 8), effs):
        times[k] = min(times[k // 2], base / (k * e))  # faster with more GPUs, sub-linearly
    budget = budget_frac * steps * base
    alloc = plan_allocation(times, steps, budget)
    expected = brute_force(times, steps, budget)
    if expected is None:
        assert alloc is None
        return
    assert alloc is not None
    assert alloc.gpu_time_s == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert sum(s for _, s in alloc.steps) == steps and len(alloc.steps) <= 2
    assert alloc.time_s <= budget + 1e-9


def test_allocation_examples():
    times = {1: 0.168, 2: 0.098, 4: 0.055, 8: 0.036}  # FLUX 1024 px on the H200 profile, roughly
    assert plan_allocation(times, 50, 10.0).steps == ((1, 50),)
    two = plan_allocation(times, 50, 3.0)
    assert two.degrees == (2, 4) and two.time_s <= 3.0  # k=4 alone fits, but k=2/k=4 is cheaper
    assert plan_allocation(times, 50, 1.0) is None


def test_placer_preserves_then_best_fits():
    a, b = make_request(), make_request()
    view = make_view([RequestSnapshot(a, 10, gpu_ids=(2, 3)), b], busy=(0,))
    placer = Placer(view)
    assert placer.place(2, prefer=(2, 3)) == (2, 3)  # placement preservation
    # best fit: GPU 1 shares its pair with busy GPU 0, so a single goes there, not to 4..7
    assert placer.place(1) == (1,)
    # the remaining 4-block is intact for a 4-GPU request
    assert placer.place(4) == (4, 5, 6, 7)
    assert placer.place(1) is None and placer.num_free == 0


def test_placer_first_fit_and_overlap_preference():
    view = make_view([make_request()], busy=(4,))
    assert Placer(view, fit="first").place(1) == (0,)
    assert Placer(view).place(1) == (5,)  # best fit next to the busy GPU
    # a request that had (4, 5) and now wants 1 GPU keeps the free half of its old pair
    assert Placer(view).place(1, prefer=(4, 5)) == (5,)
    assert Placer(view, preserve=False).place(2, prefer=(6, 7)) == (6, 7)  # best fit anyway here
    with pytest.raises(ValueError):
        Placer(view, fit="worst")


def test_can_place_all_does_not_take():
    view = make_view([make_request()], busy=(0, 4))
    placer = Placer(view)
    assert not placer.can_place_all([4])
    assert placer.can_place_all([2, 2, 1, 1])
    assert placer.num_free == 6


def test_nearest_resolution():
    table = (256, 512, 1024, 2048)
    assert nearest_resolution(768, 768, table) == 1024  # nearest in log(tokens)
    assert nearest_resolution(640, 640, table) == 512
    assert nearest_resolution(896, 896, table) == 1024
    assert nearest_resolution(512, 384, table) == 512
    assert aligned_groups(range(8))[0] == tuple(range(8))
