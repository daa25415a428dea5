"""The DiT families beyond FLUX and SD3 (Qwen-Image, Wan 2.x): one place that dispatches to their
modules (qwen_image.py, wan.py) for class lookup, key layouts, config inference and tiny models.

Layouts a tiny model can be written in (and the loaders read):

- ``qwen_image``: ``diffusers`` (folder), ``comfy`` (single file, ComfyUI's prefix) and
  ``qwen_single`` (single file, no prefix; Qwen-Image files use diffusers' key names);
- ``wan``: ``diffusers`` (folder), ``wan`` (original Wan / ComfyUI key names, no prefix) and
  ``comfy`` (the same with ComfyUI's ``model.diffusion_model.`` prefix).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from ..errors import InvalidRequest
from . import qwen_image, wan

COMFY_PREFIX = "model.diffusion_model."
CLASS_FAMILY = {qwen_image.QWEN_CLASS: "qwen_image", wan.WAN_CLASS: "wan"}
PRESETS: dict[str, dict] = {**qwen_image.PRESETS, **wan.PRESETS, "tiny-qwen-image": qwen_image.TINY_QWEN_CONFIG,
                            "tiny-wan": wan.TINY_WAN_CONFIG, "tiny-wan22": wan.TINY_WAN22_CONFIG}
TINY_CONFIGS = {"qwen_image": qwen_image.TINY_QWEN_CONFIG, "wan": wan.TINY_WAN_CONFIG,
                "wan22": wan.TINY_WAN22_CONFIG}
LAYOUTS = {"qwen_image": ("diffusers", "qwen_single", "comfy"), "wan": ("diffusers", "wan", "comfy"),
           "wan22": ("diffusers", "wan", "comfy")}
#: text tokens of the real text encoders, for pricing and profiling
DEFAULT_TEXT_TOKENS = {"qwen_image": qwen_image.QWEN_TEXT_TOKENS, "wan": wan.WAN_TEXT_TOKENS}


def family_of_class(class_name: str | None) -> str | None:
    return CLASS_FAMILY.get(class_name or "")


def model_class(class_name: str):
    from diffusers import QwenImageTransformer2DModel, WanTransformer3DModel

    return {qwen_image.QWEN_CLASS: QwenImageTransformer2DModel, wan.WAN_CLASS: WanTransformer3DModel}[class_name]


def model_kwargs(config: dict) -> dict:
    kw = {k: v for k, v in config.items() if not k.startswith("_")}
    if config.get("_class_name") == wan.WAN_CLASS:
        kw["patch_size"] = tuple(kw["patch_size"])
    if config.get("_class_name") == qwen_image.QWEN_CLASS:
        kw["axes_dims_rope"] = tuple(kw["axes_dims_rope"])
    return kw


def _bare(sd: Mapping[str, torch.Tensor]) -> tuple[dict, bool]:
    if any(k.startswith(COMFY_PREFIX) for k in sd):
        return {k[len(COMFY_PREFIX):]: v for k, v in sd.items() if k.startswith(COMFY_PREFIX)}, True
    return dict(sd), False


def read_single_file(sd: Mapping[str, torch.Tensor]) -> tuple[dict, dict] | None:
    """(diffusers config, diffusers-named weights) of a Qwen-Image or Wan single file; None when
    the keys belong to neither family (FLUX, SD3 and others are left to convert.py)."""
    bare, _ = _bare(sd)
    keys = set(bare)
    layout = wan.detect(keys)
    if layout is not None:
        dsd = wan.to_diffusers(bare) if layout == "wan" else bare
        return wan.infer_config(dsd), dsd
    if qwen_image.detect(keys) is not None:
        return qwen_image.infer_config(bare), bare
    return None


def tiny_state_dict(family: str, seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, diffusers-named fp32 weights) of a tiny model; built once per (family, seed) and
    process (the tensors are shared: treat them as read-only)."""
    if family not in TINY_CONFIGS:
        raise InvalidRequest(f"unknown family {family!r} (known: {', '.join(TINY_CONFIGS)})")
    config, sd = _tiny_cached(family, seed)
    return dict(config), dict(sd)


@functools.lru_cache(maxsize=8)
def _tiny_cached(family: str, seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    from .tiny import random_model

    config = dict(TINY_CONFIGS[family])
    model = random_model(config, seed=seed)
    return config, {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def to_layout(family: str, sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """diffusers-named weights -> a single-file layout of ``family`` (see the module docstring)."""
    if layout not in LAYOUTS.get(family, ()) or layout == "diffusers":
        raise InvalidRequest(f"layout {layout!r} is not a single-file layout of {family!r}")
    out = wan.from_diffusers(sd) if family in ("wan", "wan22") else dict(sd)
    if layout == "comfy":
        out = {COMFY_PREFIX + k: v for k, v in out.items()}
    return out


# ----------------------------------------------------------------- the forward
def timestep(family: str, config: dict, sigma: torch.Tensor) -> torch.Tensor:
    """ComfyUI's timestep of these families: sigma x the model-sampling multiplier (float32)."""
    from ..sampling.names import family_spec

    fam = wan.sampling_family(config) if family == "wan" else family
    return sigma.float() * family_spec(fam).multiplier


def num_image_tokens(family: str, config: dict, shape: tuple[int, ...]) -> int:
    if family == "wan":
        return wan.num_tokens(config, *shape[2:5])
    h, w = shape[-2:]
    return (h // 2) * (w // 2)


@torch.no_grad()
def forward(model, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, comm=None,
            vote: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``LoadedModel.forward`` for Qwen-Image and Wan: the float32 model output of the latent's
    shape, computed on this rank's token shard and gathered (see parallel.py)."""
    from .parallel import SeqShard, StepBinding, attention_backend, bind, gather_tokens

    degree = comm.degree if comm is not None else 1
    if model.num_heads % degree:
        raise InvalidRequest(f"degree {degree} does not divide the {model.num_heads} heads of {model.name}")
    shape = tuple(x.shape)
    index = comm.index if comm is not None else 0
    t = timestep(model.family, model.config, sigma)
    if model.family == "wan":
        wan.check_latent(model.config, x)
        # Text is not sharded: every rank's cross-attention sees all of it (no text all-to-all).
        shard = SeqShard(index, degree, 0, wan.num_tokens(model.config, *shape[2:]))
        run = lambda: wan.forward_tokens(model, x, t, context, shard)  # noqa: E731
    else:
        img = qwen_image.as_image(x)
        if img.shape[-2] % 2 or img.shape[-1] % 2:
            raise InvalidRequest(f"latent {img.shape[-2]}x{img.shape[-1]} is not a multiple of the patch size 2")
        shard = SeqShard(index, degree, context.shape[1], (img.shape[-2] // 2) * (img.shape[-1] // 2))
        run = lambda: qwen_image.forward_tokens(model, img, t, context, shard)  # noqa: E731
    with attention_backend(model.device), bind(model.processor, StepBinding(comm if degree > 1 else None, shard)):
        local = run()
    if degree > 1:
        tokens, votes = gather_tokens(local, shard.image_sizes, comm, vote)
    else:
        tokens, votes = local, None
    tokens = tokens.float()
    if model.family == "wan":
        return wan.untokenize(model.config, tokens, shape), votes
    out = qwen_image.untokenize(tokens, shape[0], img.shape[-2], img.shape[-1])
    return out.view(shape[0], out.shape[1], *shape[2:]), votes


def install_processor(module: torch.nn.Module, family: str):
    proc = wan.UlyssesWanProcessor() if family == "wan" else qwen_image.UlyssesQwenProcessor()
    module.set_attn_processor(proc)
    return proc


def num_attention_layers(family: str, config: dict) -> int:
    """Attention layers that exchange tokens (Wan's cross-attentions need no exchange)."""
    return int(config["num_layers"])


def latent_channels(family: str, config: dict) -> int:
    return int(config["in_channels"]) // 4 if family == "qwen_image" else int(config["in_channels"])


def context_dim(family: str, config: dict) -> int:
    return int(config["text_dim"] if family == "wan" else config["joint_attention_dim"])


def materialize(module: torch.nn.Module, config: dict, device: torch.device) -> None:
    """Rebuild buffers a meta-device construction left empty (not in any checkpoint): Wan's
    rotary tables (our forward computes its own angles; the module stays complete)."""
    if config.get("_class_name") == wan.WAN_CLASS and getattr(module.rope.freqs_cos, "is_meta", False):
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

        with torch.device(device):
            module.rope = WanRotaryPosEmbed(int(config["attention_head_dim"]), tuple(config["patch_size"]),
                                            int(config["rope_max_seq_len"]))


def check_latent_shape(info, shape: tuple[int, ...]) -> None:
    """A job's latent for a Qwen-Image (4-D, or 5-D with one frame) or Wan (5-D) model."""
    c = info.in_channels
    if info.family == "wan":
        if len(shape) != 5 or shape[1] != c:
            raise InvalidRequest(f"latent must be [B, {c}, F, H, W] for a Wan model, got {list(shape)}")
    elif not (len(shape) == 4 or (len(shape) == 5 and shape[2] == 1)) or shape[1] != c:
        raise InvalidRequest(f"latent must be [B, {c}, H, W] or [B, {c}, 1, H, W] for Qwen-Image, got {list(shape)}")
