"""The profile cost model, the shipped H200 profile and the online correction."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from comfy_tetriserve.cost import (
    PROFILES_DIR,
    CommModel,
    CostModel,
    ModelProfile,
    OnlineCostModel,
    ProfileCostModel,
    ProfileRow,
    ProfileTable,
    comm_time_s,
    load_cost_model,
    load_profile,
    parallel_capacity,
    save_profile,
)
from comfy_tetriserve.errors import InvalidRequest

FLUX = ModelProfile(num_heads=24, num_attention_layers=57, hidden_size=3072, num_text_tokens=512)


@pytest.fixture(scope="module")
def h200() -> ProfileCostModel:
    return load_cost_model("h200")


def test_shipped_profile_has_provenance_and_the_measured_rows(h200):
    table = h200.table
    assert "H200" in table.device and table.measured_on == "2026-11-28"
    assert "CUDA-graph" in table.how and "alpha 15 us" in table.how
    assert table.comm == CommModel(alpha_s=15e-6, beta_bytes_per_s=300e9, bytes_per_element=2)
    assert table.models["flux-dev"] == FLUX
    assert table.models["sd3-medium"].num_attention_layers == 24 and table.models["sd3-medium"].hidden_size == 1536
    assert len(table.rows) == 64 and not any(r.includes_comm for r in table.rows)
    assert isinstance(h200, CostModel)
    assert h200.models() == ("flux-dev", "sd3-medium")
    # the row as measured: FLUX 1024 px, batch 1, degree 2 = 88.989 ms of compute
    row = next(r for r in table.rows if (r.model, r.height, r.batch, r.sp_degree) == ("flux-dev", 1024, 1, 2))
    assert row.compute_s == pytest.approx(0.088989)


def test_comm_model_by_hand():
    comm = CommModel(alpha_s=15e-6, beta_bytes_per_s=300e9)
    # 1024 px: 4096 image + 512 text tokens; k = 8: 576 tokens x 3072 x 2 bytes x 7/8 per all-to-all
    nbytes = 4608 / 8 * 3072 * 2 * 7 / 8
    expected = 4 * 57 * (15e-6 + nbytes / 300e9)
    assert comm_time_s(comm, FLUX, 1024, 1024, 1, 8) == pytest.approx(expected)
    assert comm_time_s(comm, FLUX, 1024, 1024, 1, 1) == 0.0
    assert comm_time_s(comm, FLUX, 1024, 1024, 2, 8) > comm_time_s(comm, FLUX, 1024, 1024, 1, 8)


def test_step_time_is_row_plus_comm_at_rows(h200):
    for row in h200.table.rows:
        t = h200.step_time_s(row.model, row.height, row.width, row.batch, row.sp_degree)
        assert t == pytest.approx(row.compute_s + h200.comm_s(row.model, row.height, row.width, row.batch, row.sp_degree))
    assert h200.step_time_s("flux-dev", 1024, 1024, 1, 8) == pytest.approx(0.029796 + 0.005766, rel=1e-3)


def test_interpolation_by_tokens_is_monotone_and_between_rows(h200):
    t512 = h200.step_time_s("flux-dev", 512, 512, 1, 4)
    t1024 = h200.step_time_s("flux-dev", 1024, 1024, 1, 4)
    t768 = h200.step_time_s("flux-dev", 768, 768, 1, 4)
    assert t512 < t768 < t1024
    # a non-square size with the tokens of 768x768 costs the same as 768x768
    assert h200.step_time_s("flux-dev", 576, 1024, 1, 4) == pytest.approx(t768)
    # power law between rows: log-linear in tokens
    (lo, hi) = (512 + 512 ** 2 // 256, 512 + 1024 ** 2 // 256)  # text + image tokens
    mid = 512 + 768 ** 2 // 256
    c_lo = 0.021861
    c_hi = 0.047678
    slope = math.log(c_hi / c_lo) / math.log(hi / lo)
    compute = c_lo * (mid / lo) ** slope
    assert t768 == pytest.approx(compute + h200.comm_s("flux-dev", 768, 768, 1, 4))
    # extrapolation beyond the largest row keeps growing
    assert h200.step_time_s("flux-dev", 2560, 2560, 1, 8) > h200.step_time_s("flux-dev", 2048, 2048, 1, 8)


def test_batch_extrapolates_linearly_from_measured_batches(h200):
    b1 = h200.table.rows
    t1 = next(r.compute_s for r in b1 if (r.model, r.height, r.batch, r.sp_degree) == ("flux-dev", 512, 1, 2))
    t2 = next(r.compute_s for r in b1 if (r.model, r.height, r.batch, r.sp_degree) == ("flux-dev", 512, 2, 2))
    t4 = h200.step_time_s("flux-dev", 512, 512, 4, 2) - h200.comm_s("flux-dev", 512, 512, 4, 2)
    assert t4 == pytest.approx(t1 + 3 * (t2 - t1))


def test_allowed_degrees_follow_heads_and_rows():
    rows = tuple(ProfileRow("m", 512, 512, 1, k, 0.1 / k) for k in (1, 2, 4, 8))
    table = ProfileTable(models={"m": ModelProfile(38, 10, 1024, 0)}, rows=rows)
    cost = ProfileCostModel(table)
    assert cost.allowed_degrees("m") == (1, 2)  # 38 heads: only 1 and 2 divide
    with pytest.raises(InvalidRequest, match="not profiled or not allowed"):
        cost.step_time_s("m", 512, 512, 1, 4)
    with pytest.raises(InvalidRequest, match="no profile for model"):
        cost.allowed_degrees("nope")
    with pytest.raises(InvalidRequest):
        cost.model_profile("nope")
    # no comm model: the row is the time
    assert cost.step_time_s("m", 512, 512, 1, 2) == pytest.approx(0.05)


def test_with_table_adds_a_model_and_replaces_its_rows(h200):
    extra = ProfileTable(models={"tiny": ModelProfile(4, 2, 64, 8)},
                         rows=(ProfileRow("tiny", 64, 64, 1, 1, 0.01, includes_comm=True),
                               ProfileRow("tiny", 64, 64, 1, 2, 0.007, includes_comm=True)))
    merged = h200.with_table(extra)
    assert merged.models() == ("flux-dev", "sd3-medium", "tiny")
    assert merged.step_time_s("tiny", 64, 64, 1, 2) == pytest.approx(0.007)  # measured end to end: no comm added
    assert merged.step_time_s("flux-dev", 1024, 1024, 1, 4) == h200.step_time_s("flux-dev", 1024, 1024, 1, 4)
    assert "tiny" not in h200.models()  # the original is unchanged
    again = merged.with_table(ProfileTable(models={"tiny": ModelProfile(4, 2, 64, 8)},
                                           rows=(ProfileRow("tiny", 64, 64, 1, 1, 0.02, includes_comm=True),)))
    assert again.allowed_degrees("tiny") == (1,)


def test_load_cost_model_by_path_and_errors(tmp_path, h200):
    path = tmp_path / "p.json"
    save_profile(h200.table, path)
    again = load_cost_model(str(path))
    assert again.step_time_s("sd3-medium", 1024, 1024, 2, 4) == h200.step_time_s("sd3-medium", 1024, 1024, 2, 4)
    assert load_profile(PROFILES_DIR / "h200.json").rows == h200.table.rows
    with pytest.raises(InvalidRequest, match="neither a shipped profile"):
        load_cost_model("nope")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a profile table"):
        load_cost_model(str(bad))


def test_online_model_learns_the_ratio_and_reports_drift(h200):
    online = OnlineCostModel(h200)
    assert isinstance(online, CostModel)
    base = h200.step_time_s("flux-dev", 1024, 1024, 1, 4)
    for _ in range(30):
        online.observe("flux-dev", 1024, 1024, 1, 4, base * 1.2)
    assert online.step_time_s("flux-dev", 1024, 1024, 1, 4) == pytest.approx(base * 1.2, rel=1e-6)
    # same degree, a neighbouring resolution shares the bucket; another bucket falls back to the degree's mean
    assert online.factor("flux-dev", 1024, 1024, 1, 4) == pytest.approx(1.2)
    assert online.factor("flux-dev", 256, 256, 1, 4) == pytest.approx(1.2)
    assert online.factor("flux-dev", 1024, 1024, 1, 8) == 1.0  # nothing learnt at degree 8
    assert online.drift() == {"flux-dev/sp4/4096tok": 1.2}
    assert online.observations() == 30


def test_online_model_ignores_noise_around_the_profile_but_learns_a_slower_engine(h200):
    import random

    rng = random.Random(7)
    base = h200.step_time_s("flux-dev", 1024, 1024, 1, 4)
    noisy, slow = OnlineCostModel(h200), OnlineCostModel(h200)
    used_noisy = []
    for _ in range(300):  # step times with coefficient of variation 0.1 around the profile, and around 1.1x it
        noise = 1 + rng.gauss(0.0, 0.1)
        noisy.observe("flux-dev", 1024, 1024, 1, 4, base * noise)
        slow.observe("flux-dev", 1024, 1024, 1, 4, base * 1.1 * noise)
        used_noisy.append(noisy.factor("flux-dev", 1024, 1024, 1, 4))
    # the average wanders (an EWMA of noise: about +-2 %), the prediction stays on the profile
    assert noisy.drift()["flux-dev/sp4/4096tok"] != 1.0
    assert sum(f != 1.0 for f in used_noisy) <= 3, [f for f in used_noisy if f != 1.0]
    assert slow.factor("flux-dev", 1024, 1024, 1, 4) == pytest.approx(1.1, abs=0.06)
    # a steady slow engine is learnt at once (its ratios do not vary)
    steady = OnlineCostModel(h200)
    for _ in range(2):
        steady.observe("flux-dev", 1024, 1024, 1, 4, base * 1.1)
    assert steady.factor("flux-dev", 1024, 1024, 1, 4) == pytest.approx(1.1)
    with pytest.raises(InvalidRequest):
        OnlineCostModel(h200, z=-1.0)


def test_online_model_clips_outliers_and_follows_drift(h200):
    online = OnlineCostModel(h200, alpha=0.2, warmup=5)
    base = h200.step_time_s("flux-dev", 512, 512, 1, 2)
    online.observe("flux-dev", 512, 512, 1, 2, base * 50)  # a hiccup: clipped to 2x
    assert online.factor("flux-dev", 512, 512, 1, 2) == pytest.approx(2.0)
    for _ in range(60):
        online.observe("flux-dev", 512, 512, 1, 2, base * 0.9)
    assert online.factor("flux-dev", 512, 512, 1, 2) == pytest.approx(0.9, rel=1e-3)
    online.observe("flux-dev", 512, 512, 1, 2, float("nan"))
    online.observe("flux-dev", 512, 512, 1, 2, -1.0)
    assert online.observations() == 61
    with pytest.raises(InvalidRequest):
        OnlineCostModel(h200, alpha=0.0)


def test_parallel_capacity_comes_from_the_profile_and_passes_through_the_online_model(h200):
    assert h200.parallel_capacity is None and parallel_capacity(h200) is None
    shared = ProfileCostModel(dataclasses.replace(h200.table, extra={"parallel_capacity": 2}))
    assert shared.parallel_capacity == 2 and parallel_capacity(shared) == 2
    online = OnlineCostModel(shared)
    assert online.parallel_capacity == 2 and parallel_capacity(OnlineCostModel(h200)) is None
    assert shared.with_table(h200.table).parallel_capacity == 2  # adding models keeps the box's capacity
