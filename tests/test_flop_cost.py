"""FLOP pricing of Qwen-Image and Wan from the FLUX rows (modelled), and the video bench's pieces."""
from __future__ import annotations

import pytest

from comfy_tetriserve.cost import load_cost_model
from comfy_tetriserve.errors import InvalidRequest
from comfy_tetriserve.flop_cost import FLUX_DEV, WAN_14B_81F, FlopCostModel, flops_per_step


@pytest.fixture(scope="module")
def cost() -> FlopCostModel:
    return FlopCostModel(load_cost_model("h200"))


def test_flops_formulas():
    # FLUX-dev 1024 px: 4096 image + 512 text tokens, 57 blocks of 12 D^2 per token + 2 N^2 D
    n, d = 4096 + 512, 3072
    assert flops_per_step(FLUX_DEV, 1024, 1024) == 2 * 57 * (12 * d * d * n + 2 * n * n * d)
    # Wan 14B, 81 frames at 720p: 21 latent frames x 45 x 80 patches
    assert WAN_14B_81F.tokens(720, 1280) == 21 * 45 * 80
    assert flops_per_step(WAN_14B_81F, 720, 1280, 2) == 2 * flops_per_step(WAN_14B_81F, 720, 1280, 1)
    with pytest.raises(InvalidRequest):
        flops_per_step(FLUX_DEV, 0, 512)


def test_reference_rows_are_reproduced_and_others_are_modelled(cost):
    # FLUX keeps its measured rows; priced by FLOPs through its own curve it lands on them too
    for res in (256, 512, 1024, 2048):
        for k in (1, 2, 4, 8):
            row = next(r for r in cost.base.table.rows if r.model == "flux-dev" and r.height == res and r.batch == 1
                       and r.sp_degree == k)
            f = flops_per_step(FLUX_DEV, res, res)
            assert f / cost.throughput(k, f) == pytest.approx(row.compute_s, rel=1e-9)
            assert cost.step_time_s("flux-dev", res, res, 1, k) == cost.base.step_time_s("flux-dev", res, res, 1, k)
    assert not cost.is_modelled("flux-dev") and cost.is_modelled("wan2.1-t2v-14b") and cost.is_modelled("qwen-image")
    assert cost.allowed_degrees("wan2.1-t2v-14b") == (1, 2, 4, 8)  # 40 heads
    t = [cost.step_time_s("wan2.1-t2v-14b", 720, 1280, 2, k) for k in (1, 2, 4, 8)]
    assert t[0] > t[1] > t[2] > t[3] > 0
    assert 10 < t[0] < 60  # a 720p 81-frame CFG step on one H200: tens of seconds
    # communication: Wan exchanges only its video tokens
    assert cost.comm_s("wan2.1-t2v-14b", 720, 1280, 2, 1) == 0.0
    assert cost.comm_s("wan2.1-t2v-14b", 720, 1280, 2, 8) > 0.0
    assert cost.step_time_s("wan2.1-t2v-14b", 480, 832, 2, 8) < t[3]
    with pytest.raises(InvalidRequest):
        cost.step_time_s("wan2.1-t2v-14b", 720, 1280, 1, 3)


def test_video_bench_classes_deadlines_and_policies(cost):
    from comfy_tetriserve.sim.video_bench import (BASE_FACTOR, VIDEO_CLASSES, base_deadlines, best_latency_s,
                                                  class_degrees, make_video_trace, run_video_task)

    base = base_deadlines(cost, 8)
    for c in VIDEO_CLASSES:
        assert base[c.name] == pytest.approx(BASE_FACTOR * best_latency_s(cost, c, 8))
    assert base["wan-720p"] > base["wan-480p"] > base["flux-2048"] > base["flux-256"]
    degrees = class_degrees(cost, 8)
    assert set(degrees.values()) <= {1, 2, 4, 8}
    trace = make_video_trace(60, 2.5, 1.2, 0, base)
    assert {r.model for r in trace} == {"flux-dev", "wan2.1-t2v-14b"}
    for r in trace:
        c = next(c for c in VIDEO_CLASSES if (c.model, c.height, c.width) == (r.model, r.height, r.width))
        assert r.deadline_at - r.arrival_at == pytest.approx(1.2 * base[c.name])
    a = run_video_task(("h200", "tetriserve", 8, 30, 2.5, 1.2, 0))
    b = run_video_task(("h200", "sp1", 8, 30, 2.5, 1.2, 0))
    assert 0.0 <= b["sar"] <= a["sar"] <= 1.0 and set(a["sar_by_class"]) == {c.name for c in VIDEO_CLASSES}
