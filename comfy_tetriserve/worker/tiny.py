"""Tiny FLUX and SD3 models with random weights, written in the layouts users have.

The architectures are the real diffusers classes with small numbers (4 heads of 16 channels, a
few blocks, 16 latent channels like the real VAEs), so every code path of the real models runs in
milliseconds on a CPU: joint text+image attention, FLUX's rotary positions and single blocks, SD3's
q/k norms, dual attention and pre-only last context block. ``write_tiny_checkpoint`` saves them
as real safetensors in each layout (``diffusers`` folder, ``bfl`` / ``comfy`` FLUX single file,
``sd3_single``) so the loaders are tested on the files they will meet.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import InvalidRequest
from .convert import FLUX_CLASS, SD3_CLASS, flux_rope_axes, from_diffusers

TINY_FLUX_CONFIG: dict = {
    "_class_name": FLUX_CLASS,
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels x 2 x 2 patch
    "out_channels": 64,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 16,
    "guidance_embeds": True,
    "axes_dims_rope": list(flux_rope_axes(16)),
}

#: The tiny FLUX Fill: the latent's 16 channels plus the masked image's 16 and the mask's 64, packed 2x2.
TINY_FLUX_FILL_CONFIG: dict = {**TINY_FLUX_CONFIG, "in_channels": (16 + 16 + 64) * 4}

TINY_SD3_CONFIG: dict = {
    "_class_name": SD3_CLASS,
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "caption_projection_dim": 64,
    "pooled_projection_dim": 16,
    "pos_embed_max_size": 24,  # latents up to 48 x 48 (384 px)
    "dual_attention_layers": [0],  # SD3.5-style: exercises the image-only second attention
    "qk_norm": "rms_norm",
}

TINY_CONFIGS = {"flux": TINY_FLUX_CONFIG, "sd3": TINY_SD3_CONFIG}
#: Layouts each family can be written in.
FAMILY_LAYOUTS = {"flux": ("diffusers", "bfl", "comfy"), "sd3": ("diffusers", "sd3_single")}


def model_class(config: dict):
    """The diffusers class a config names."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    name = config.get("_class_name")
    if name == FLUX_CLASS:
        return FluxTransformer2DModel
    if name == SD3_CLASS:
        return SD3Transformer2DModel
    raise InvalidRequest(f"unsupported model class {name!r} (FLUX and SD3 transformers only)")


def model_kwargs(config: dict) -> dict:
    """A diffusers config without the bookkeeping entries, ready for ``cls(**kwargs)``."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def random_model(config: dict, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> torch.nn.Module:
    """A diffusers model of ``config`` with seeded random weights (biases and norms too).

    Built directly in ``dtype`` on ``device`` (a full-size FLUX is 24 GB in bf16: no fp32 copy),
    with the random numbers drawn on ``device`` (the same seed gives the same weights per device type).
    """
    cls = model_class(config)
    device = torch.device(device)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**model_kwargs(config))
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Scale 1/sqrt(fan-in) keeps activations O(1) through the blocks; norm scales around one.
            std = p[0].numel() ** -0.5 if p.ndim >= 2 else 0.1
            noise = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * std
            if p.ndim == 1 and "norm" in name:
                noise += 1.0
            p.copy_(noise)
    return model.eval()


#: Variants of a family's architecture: "fill" is FLUX Fill (Kontext has FLUX-dev's architecture).
VARIANTS = {("flux", ""): TINY_FLUX_CONFIG, ("flux", "fill"): TINY_FLUX_FILL_CONFIG, ("sd3", ""): TINY_SD3_CONFIG}


def tiny_state_dict(family: str, seed: int = 0, variant: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, diffusers-named fp32 weights) of the tiny model of ``family`` (and ``variant``)."""
    if family not in TINY_CONFIGS:
        raise InvalidRequest(f"unknown family {family!r} (known: {', '.join(TINY_CONFIGS)})")
    if (family, variant) not in VARIANTS:
        raise InvalidRequest(f"unknown variant {variant!r} of {family!r}")
    config = dict(VARIANTS[family, variant])
    model = random_model(config, seed=seed)
    return config, {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_tiny_checkpoint(family: str, layout: str, path: str | Path, seed: int = 0,
                          dtype: torch.dtype = torch.float32, variant: str = "") -> Path:
    """Write the tiny ``family`` model in ``layout``; returns the folder (diffusers) or file path.

    ``diffusers`` writes ``path/config.json`` and ``path/diffusion_pytorch_model.safetensors``;
    the single-file layouts write ``path`` itself (``.safetensors`` is appended if missing).
    The same seed gives the same weights in every layout. ``variant="fill"`` writes a FLUX Fill.
    """
    if layout not in FAMILY_LAYOUTS.get(family, ()):
        raise InvalidRequest(f"layout {layout!r} does not exist for {family!r} (known: {FAMILY_LAYOUTS.get(family)})")
    config, sd = tiny_state_dict(family, seed, variant)
    sd = {k: v.to(dtype) for k, v in sd.items()}
    path = Path(path)
    if layout == "diffusers":
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        save_file(sd, str(path / "diffusion_pytorch_model.safetensors"))
        return path
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(from_diffusers(family, sd, layout), str(path))
    return path
