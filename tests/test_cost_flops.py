"""Size-aware pricing: step FLOPs of an architecture, and models priced by their own size."""
from __future__ import annotations

import logging

import pytest
import torch

from comfy_tetriserve.cost import FlopScaledCostModel, ModelProfile, load_cost_model, step_flops
from comfy_tetriserve.service.catalog import ModelCost
from comfy_tetriserve.worker.models import PRESETS, info_of_config

FLUX = ModelProfile(num_heads=24, num_attention_layers=57, hidden_size=3072, num_text_tokens=512)
SD3M = ModelProfile(num_heads=24, num_attention_layers=24, hidden_size=1536, num_text_tokens=333)


def test_step_flops_by_hand():
    # 1024 px: 4096 image + 512 text tokens; per layer 2 T (4 + 8) h^2 + 4 T^2 h
    t, h = 4608.0, 3072.0
    assert step_flops(FLUX, 1024, 1024) == pytest.approx(57 * (24 * t * h * h + 4 * t * t * h))
    assert step_flops(FLUX, 1024, 1024, 2) == pytest.approx(2 * step_flops(FLUX, 1024, 1024))
    # attention is quadratic: 4x the image tokens cost more than 4x the FLOPs
    assert step_flops(FLUX, 2048, 2048) > 4 * step_flops(FLUX, 1024, 1024)


def test_flop_ratio_tracks_the_measured_h200_ratio_within_2x():
    """The formula against measurement: FLUX.1-dev vs SD3-medium step times on the shipped profile."""
    h200 = load_cost_model("h200")
    for px in (512, 1024, 2048):
        measured = h200.step_time_s("flux-dev", px, px, 1, 1) / h200.step_time_s("sd3-medium", px, px, 1, 1)
        modelled = step_flops(FLUX, px, px) / step_flops(SD3M, px, px)
        assert measured > 5 and 0.5 < modelled / measured < 2.0


def _info(preset: str, name: str):
    return info_of_config(name, dict(PRESETS[preset]), torch.bfloat16, f"random:{preset}")


def test_architecture_read_from_the_config():
    large, medium = _info("sd3.5-large", "sd35l"), _info("sd3-medium", "sd3m")
    assert (large.num_attention_layers, large.hidden_size, large.num_text_tokens) == (38, 2432, 333)
    assert (medium.num_attention_layers, medium.hidden_size) == (24, 1536)
    flux = _info("flux-dev", "f")
    assert (flux.num_attention_layers, flux.hidden_size, flux.num_text_tokens) == (57, 3072, 512)


def test_sd35_large_and_sd3_medium_get_different_prices(caplog):
    cost = ModelCost(load_cost_model("h200"), {"sd3": "sd3-medium", "flux": "flux-dev"})
    with caplog.at_level(logging.WARNING, logger="comfy_tetriserve.service.catalog"):
        cost.register(_info("sd3.5-large", "sd35-large"))
        cost.register(_info("sd3-medium", "my-sd3-medium"))
    assert any("sd35-large" in r.message and "FLOPs" in r.message and "modelled" in r.message
               for r in caplog.records)
    large = cost.step_time_s("sd35-large", 1024, 1024, 1, 1)
    medium = cost.step_time_s("my-sd3-medium", 1024, 1024, 1, 1)
    assert medium == pytest.approx(cost.base.step_time_s("sd3-medium", 1024, 1024, 1, 1))
    assert 3.0 < large / medium < 4.0  # 38 layers x 2432 wide vs 24 x 1536
    assert cost.pricing("sd35-large")["modelled"] is True
    assert cost.pricing("sd35-large")["flop_ratio_1024"] == pytest.approx(large / medium, rel=1e-3)
    # an unprofiled model of the profiled model's own size is priced as that model (ratio 1)
    assert cost.pricing("my-sd3-medium")["flop_ratio_1024"] == pytest.approx(1.0)
    assert cost.pricing("sd3-medium") == {"priced_as": "sd3-medium", "modelled": False}
    # heads 38: only degrees dividing 38 (1, 2)
    assert cost.allowed_degrees("sd35-large") == (1, 2)


def test_observed_steps_of_a_modelled_model_correct_the_reference_in_its_own_units():
    from comfy_tetriserve.cost import OnlineCostModel
    raw = load_cost_model("h200")
    cost = ModelCost(OnlineCostModel(raw), {"sd3": "sd3-medium"}, raw=raw)
    cost.register(_info("sd3.5-large", "sd35-large"))
    predicted = cost.step_time_s("sd35-large", 1024, 1024, 1, 1)
    for _ in range(5):  # exactly as predicted: the reference's factor stays 1
        cost.observe("sd35-large", 1024, 1024, 1, 1, predicted)
    assert cost.step_time_s("sd3-medium", 1024, 1024, 1, 1) == pytest.approx(raw.step_time_s(
        "sd3-medium", 1024, 1024, 1, 1))
    assert cost.uncorrected().step_time_s("sd35-large", 1024, 1024, 1, 1) == pytest.approx(predicted)


def test_flop_scaled_cost_model_standalone():
    h200 = load_cost_model("h200")
    big = ModelProfile(num_heads=24, num_attention_layers=76, hidden_size=3072, num_text_tokens=512)
    cost = FlopScaledCostModel(h200, h200.model_profile)
    ratio = cost.add("flux-big", "flux-dev", big)
    assert ratio == pytest.approx(76 / 57)
    assert cost.is_modelled("flux-big") and not cost.is_modelled("flux-dev")
    assert cost.step_time_s("flux-big", 1024, 1024, 1, 4) == pytest.approx(
        h200.step_time_s("flux-dev", 1024, 1024, 1, 4) * 76 / 57)
    assert cost.allowed_degrees("flux-big") == h200.allowed_degrees("flux-dev")


def test_qwen_image_and_wan_are_priced_by_flops_from_flux_by_default():
    """A loaded Qwen-Image or Wan file needs no flag: the default --profile-as maps both families to the
    profiled FLUX, scaled by the FLOP ratio and flagged modelled; a 720p Wan clip (21 latent frames folded
    into the height, as the service prices video) costs far more than one 720p image of the same model."""
    from comfy_tetriserve.service.settings import ServiceConfig
    from comfy_tetriserve.service.wiring import parse_pairs

    cost = ModelCost(load_cost_model("h200"), parse_pairs(ServiceConfig().profile_as, "profile_as"))
    qwen, wan14 = _info("qwen-image", "qwen"), _info("wan2.1-t2v-14b", "wan14")
    assert (qwen.num_attention_layers, qwen.hidden_size) == (60, 3072)
    assert (wan14.num_attention_layers, wan14.hidden_size) == (40, 5120)
    cost.register(qwen)
    cost.register(wan14)
    flux = cost.base.step_time_s("flux-dev", 1024, 1024, 1, 1)
    assert cost.pricing("qwen")["modelled"] and cost.pricing("wan14")["priced_as"] == "flux-dev"
    assert 0.9 < cost.step_time_s("qwen", 1024, 1024, 1, 1) / flux < 1.3  # 60 vs 57 blocks of the same width
    image = cost.step_time_s("wan14", 720, 1280, 1, 1)
    clip = cost.step_time_s("wan14", 720 * 21, 1280, 1, 1)
    assert clip > 21 * image > 0
