"""Key layouts: conversion to diffusers names, config inference from tensors, and independent cross-checks."""
from __future__ import annotations

import pytest
import torch

from comfy_tetriserve.worker.convert import (
    COMFY_PREFIX,
    detect_layout,
    flux_rope_axes,
    from_diffusers,
    infer_config,
    to_diffusers,
)
from comfy_tetriserve.worker.tiny import FAMILY_LAYOUTS, model_class, model_kwargs, tiny_state_dict
from comfy_tetriserve.errors import InvalidRequest


@pytest.fixture(scope="module")
def tiny():
    return {family: tiny_state_dict(family, seed=3) for family in ("flux", "sd3")}


@pytest.mark.parametrize("family,layout", [(f, lay) for f, lays in FAMILY_LAYOUTS.items() for lay in lays])
def test_round_trip_and_config_inference(tiny, family, layout):
    config, sd = tiny[family]
    original = from_diffusers(family, sd, layout)
    assert detect_layout(original) == (family, layout if layout != "sd3_single" else "sd3_single")
    got_family, back = to_diffusers(original)
    assert got_family == family
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert infer_config(family, back) == config


def test_original_layouts_use_the_real_key_names(tiny):
    flux = from_diffusers("flux", tiny["flux"][1], "bfl")
    for key in ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.out_layer.bias",
                "guidance_in.in_layer.weight", "double_blocks.0.img_attn.qkv.weight",
                "double_blocks.0.txt_attn.norm.key_norm.scale", "double_blocks.0.img_mod.lin.weight",
                "double_blocks.0.txt_mlp.2.bias", "single_blocks.1.linear1.weight", "single_blocks.1.linear2.weight",
                "single_blocks.0.modulation.lin.bias", "single_blocks.0.norm.query_norm.scale",
                "final_layer.adaLN_modulation.1.weight", "final_layer.linear.weight"):
        assert key in flux, key
    assert all(k.startswith(COMFY_PREFIX) for k in from_diffusers("flux", tiny["flux"][1], "comfy"))
    sd3 = from_diffusers("sd3", tiny["sd3"][1], "sd3_single")
    for key in ("pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.mlp.2.bias",
                "context_embedder.weight", "joint_blocks.0.x_block.attn.qkv.weight",
                "joint_blocks.0.x_block.attn2.qkv.weight", "joint_blocks.0.context_block.attn.ln_k.weight",
                "joint_blocks.0.x_block.adaLN_modulation.1.weight", "joint_blocks.1.context_block.adaLN_modulation.1.bias",
                "joint_blocks.0.context_block.mlp.fc2.weight", "final_layer.linear.bias"):
        assert key in sd3, key
    # The last block's context stream is pre-only: no output projection and no MLP.
    assert "joint_blocks.1.context_block.attn.proj.weight" not in sd3
    assert "joint_blocks.1.context_block.mlp.fc1.weight" not in sd3


def test_sd3_values_match_diffusers_own_converter(tiny):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    _, sd = tiny["sd3"]
    original = from_diffusers("sd3", sd, "sd3_single")
    prefixed = {COMFY_PREFIX + k: v for k, v in original.items()}
    ref = convert_sd3_transformer_checkpoint_to_diffusers(dict(prefixed))
    assert ref.keys() == sd.keys()
    assert all(torch.equal(ref[k], sd[k]) for k in sd)


def test_flux_keys_and_shapes_match_diffusers_converter_at_full_width():
    """diffusers' FLUX converter assumes hidden size 3072: compare on meta tensors of that width."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    config = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "out_channels": 64,
              "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128, "num_attention_heads": 24,
              "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
              "axes_dims_rope": [16, 56, 56]}
    with torch.device("meta"):
        sd = model_class(config)(**model_kwargs(config)).state_dict()
    original = from_diffusers("flux", sd, "comfy")
    ref = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    _, ours = to_diffusers(original)
    assert ref.keys() == ours.keys() == sd.keys()
    assert all(ref[k].shape == ours[k].shape == sd[k].shape for k in sd)
    assert infer_config("flux", ours) == config


def test_sd3_without_qk_norm_uses_64_channel_heads():
    config = {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
              "out_channels": 16, "num_layers": 2, "attention_head_dim": 64, "num_attention_heads": 3,
              "joint_attention_dim": 32, "caption_projection_dim": 192, "pooled_projection_dim": 16,
              "pos_embed_max_size": 8, "dual_attention_layers": [], "qk_norm": None}
    with torch.device("meta"):
        sd = model_class(config)(**model_kwargs(config)).state_dict()
    _, back = to_diffusers(from_diffusers("sd3", sd, "sd3_single"))
    assert infer_config("sd3", back) == config


def test_all_in_one_sd3_file_ignores_text_encoders_and_vae(tiny):
    _, sd = tiny["sd3"]
    original = {COMFY_PREFIX + k: v for k, v in from_diffusers("sd3", sd, "sd3_single").items()}
    original["text_encoders.clip_l.transformer.text_model.embeddings.position_ids"] = torch.zeros(3)
    original["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2)
    family, back = to_diffusers(original)
    assert family == "sd3" and back.keys() == sd.keys()


def test_rope_axes_follow_flux_proportions():
    assert flux_rope_axes(128) == (16, 56, 56)
    assert flux_rope_axes(16) == (4, 6, 6)
    assert flux_rope_axes(64) == (8, 28, 28)
    for d in (16, 32, 64, 96, 128, 256):
        axes = flux_rope_axes(d)
        assert sum(axes) == d and all(a > 0 and a % 2 == 0 for a in axes)


def test_unknown_and_incomplete_checkpoints_are_refused(tiny):
    with pytest.raises(InvalidRequest, match="not a FLUX or SD3"):
        detect_layout({"model.diffusion_model.input_blocks.0.0.weight": 0})
    original = from_diffusers("flux", tiny["flux"][1], "bfl")
    original["double_blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(InvalidRequest, match="does not know"):
        to_diffusers(original)
    original = from_diffusers("flux", tiny["flux"][1], "bfl")
    del original["double_blocks.0.img_mlp.0.weight"]
    with pytest.raises(InvalidRequest, match="lacks"):
        to_diffusers(original)
