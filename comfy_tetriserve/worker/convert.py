"""Checkpoint key layouts of FLUX and SD3, converted to diffusers' module names.

Users hold DiT weights in three layouts:

- ``diffusers``: a folder with ``config.json`` and safetensors (keys named after diffusers' modules);
- ``bfl``: the original Black Forest Labs FLUX single file (``double_blocks.N.img_attn.qkv.weight``...),
  as ComfyUI's ``models/diffusion_models`` holds it, with or without ComfyUI's
  ``model.diffusion_model.`` prefix (``comfy`` when the prefix is there);
- ``sd3_single``: the Stability AI MMDiT single file (``joint_blocks.N.x_block.attn.qkv.weight``...),
  prefixed or not; all-in-one files also carry text encoders and a VAE, which are ignored.

``to_diffusers`` renames (and splits fused q/k/v projections) into diffusers' names, and
``infer_config`` derives the diffusers model config from the converted tensors alone: layer counts,
hidden size, head size, text and pooled widths, guidance embedding, positional table size. Nothing
assumes the full-size dimensions. Where a number is not stored in the weights, the published
convention of the family is used and documented below (FLUX rotary axes, SD3 head size without
q/k norms). ``from_diffusers`` writes the original layouts back (tiny test checkpoints use it).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import InvalidRequest

COMFY_PREFIX = "model.diffusion_model."
LAYOUTS = ("diffusers", "bfl", "comfy", "sd3_single")
FLUX_CLASS = "FluxTransformer2DModel"
SD3_CLASS = "SD3Transformer2DModel"
#: SAI MMDiT convention when q/k norms are absent: heads of 64 channels (num_heads = depth = hidden / 64).
SD3_DEFAULT_HEAD_DIM = 64

StateDict = dict[str, torch.Tensor]

# --------------------------------------------------------------------- key tables
# One-to-one renames: (original suffix, diffusers suffix). "{i}" is the block index.
_FLUX_TOP = [
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("txt_in", "context_embedder"),
    ("img_in", "x_embedder"),
    ("final_layer.linear", "proj_out"),
]
_FLUX_DOUBLE = [
    ("img_mod.lin", "norm1.linear"),
    ("txt_mod.lin", "norm1_context.linear"),
    ("img_attn.proj", "attn.to_out.0"),
    ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.net.0.proj"),
    ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"),
    ("txt_mlp.2", "ff_context.net.2"),
]
_FLUX_DOUBLE_NORMS = [
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
]
_FLUX_SINGLE = [
    ("modulation.lin", "norm.linear"),
    ("linear2", "proj_out"),
]
_FLUX_SINGLE_NORMS = [
    ("norm.query_norm.scale", "attn.norm_q.weight"),
    ("norm.key_norm.scale", "attn.norm_k.weight"),
]
_SD3_TOP = [
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("context_embedder", "context_embedder"),
    ("final_layer.linear", "proj_out"),
]
_SD3_BLOCK = [  # the context-stream entries are absent in the last (context pre-only) block
    ("x_block.attn.proj", "attn.to_out.0"),
    ("context_block.attn.proj", "attn.to_add_out"),
    ("x_block.mlp.fc1", "ff.net.0.proj"),
    ("x_block.mlp.fc2", "ff.net.2"),
    ("context_block.mlp.fc1", "ff_context.net.0.proj"),
    ("context_block.mlp.fc2", "ff_context.net.2"),
    ("x_block.adaLN_modulation.1", "norm1.linear"),
    ("x_block.attn2.proj", "attn2.to_out.0"),
]
_SD3_BLOCK_NORMS = [
    ("x_block.attn.ln_q.weight", "attn.norm_q.weight"),
    ("x_block.attn.ln_k.weight", "attn.norm_k.weight"),
    ("context_block.attn.ln_q.weight", "attn.norm_added_q.weight"),
    ("context_block.attn.ln_k.weight", "attn.norm_added_k.weight"),
    ("x_block.attn2.ln_q.weight", "attn2.norm_q.weight"),
    ("x_block.attn2.ln_k.weight", "attn2.norm_k.weight"),
]
# Fused q/k/v projections: original -> three diffusers projections.
_FLUX_DOUBLE_QKV = [("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
                    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))]
_SD3_QKV = [("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
            ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
            ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v"))]


# --------------------------------------------------------------------- detection
def strip_prefix(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, bool]:
    """Keep the DiT's keys without ComfyUI's prefix; (keys, whether the prefix was there)."""
    if any(k.startswith(COMFY_PREFIX) for k in sd):
        return {k[len(COMFY_PREFIX):]: v for k, v in sd.items() if k.startswith(COMFY_PREFIX)}, True
    return dict(sd), False


def detect_layout(keys: set[str] | Mapping[str, object]) -> tuple[str, str]:
    """(family, layout) of a checkpoint's key set; raises InvalidRequest for anything else."""
    keys = set(keys)
    prefixed = any(k.startswith(COMFY_PREFIX) for k in keys)
    bare = {k[len(COMFY_PREFIX):] for k in keys if k.startswith(COMFY_PREFIX)} if prefixed else keys
    if "double_blocks.0.img_attn.qkv.weight" in bare and "img_in.weight" in bare:
        return "flux", "comfy" if prefixed else "bfl"
    if "joint_blocks.0.x_block.attn.qkv.weight" in bare:
        return "sd3", "sd3_single"
    if "transformer_blocks.0.attn.to_q.weight" in bare:
        if "single_transformer_blocks.0.proj_out.weight" in bare or "x_embedder.weight" in bare:
            return "flux", "diffusers"
        if "pos_embed.proj.weight" in bare:
            return "sd3", "diffusers"
    raise InvalidRequest("not a FLUX or SD3 DiT checkpoint (no known key layout; a UNet, VAE or text encoder?)")


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """Original final norms emit (shift, scale); diffusers' AdaLayerNormContinuous wants (scale, shift)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _move(src: StateDict, dst: StateDict, old: str, new: str, required: bool = True) -> None:
    """Move ``old.weight``/``old.bias`` (or the exact key ``old``) from src to dst as ``new``."""
    if old in src:
        dst[new] = src.pop(old)
        return
    if required and old + ".weight" not in src:
        raise InvalidRequest(f"checkpoint lacks {old}.weight")
    for suffix in (".weight", ".bias"):
        if old + suffix in src:
            dst[new + suffix] = src.pop(old + suffix)


def _split_qkv(src: StateDict, dst: StateDict, old: str, names: tuple[str, str, str], required: bool = True) -> None:
    if old + ".weight" not in src:
        if required:
            raise InvalidRequest(f"checkpoint lacks {old}.weight")
        return
    for suffix in (".weight", ".bias"):
        if old + suffix in src:
            for name, part in zip(names, src.pop(old + suffix).chunk(3, dim=0)):
                dst[name + suffix] = part.contiguous()


# --------------------------------------------------------------------- to diffusers
def flux_to_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """BFL FLUX keys (prefix already stripped) -> diffusers FluxTransformer2DModel keys."""
    src, out = dict(sd), {}
    for old, new in _FLUX_TOP:
        _move(src, out, old, new, required=not old.startswith("guidance_in"))
    out["norm_out.linear.weight"] = _swap_halves(src.pop("final_layer.adaLN_modulation.1.weight"))
    out["norm_out.linear.bias"] = _swap_halves(src.pop("final_layer.adaLN_modulation.1.bias"))
    dim = out["x_embedder.weight"].shape[0]
    for i in _indices(sd, r"double_blocks\.(\d+)\."):
        o, n = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for old, names in _FLUX_DOUBLE_QKV:
            _split_qkv(src, out, o + old, tuple(n + x for x in names))
        for old, new in _FLUX_DOUBLE + _FLUX_DOUBLE_NORMS:
            _move(src, out, o + old, n + new)
    for i in _indices(sd, r"single_blocks\.(\d+)\."):
        o, n = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        # linear1 fuses q, k, v (dim rows each) and the MLP input projection (the remaining rows).
        for suffix in (".weight", ".bias"):
            fused = src.pop(o + "linear1" + suffix)
            mlp_rows = fused.shape[0] - 3 * dim
            if mlp_rows <= 0:
                raise InvalidRequest(f"{o}linear1 has {fused.shape[0]} rows, fewer than 3 x hidden size {dim}")
            q, k, v, mlp = fused.split([dim, dim, dim, mlp_rows], dim=0)
            for name, part in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
                out[n + name + suffix] = part.contiguous()
        for old, new in _FLUX_SINGLE + _FLUX_SINGLE_NORMS:
            _move(src, out, o + old, n + new)
    _check_consumed(src)
    return out


def sd3_to_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """SAI MMDiT keys (prefix already stripped) -> diffusers SD3Transformer2DModel keys."""
    src = {k: v for k, v in sd.items() if not k.startswith(("text_encoders.", "first_stage_model.", "cond_stage_model."))}
    src.pop("pos_embed_scaling_factor", None)  # unused at inference
    out: StateDict = {"pos_embed.pos_embed": src.pop("pos_embed")}
    for old, new in _SD3_TOP:
        _move(src, out, old, new)
    out["norm_out.linear.weight"] = _swap_halves(src.pop("final_layer.adaLN_modulation.1.weight"))
    out["norm_out.linear.bias"] = _swap_halves(src.pop("final_layer.adaLN_modulation.1.bias"))
    blocks = _indices(sd, r"joint_blocks\.(\d+)\.")
    for i in blocks:
        o, n = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        last = i == blocks[-1]
        for old, names in _SD3_QKV:
            _split_qkv(src, out, o + old, tuple(n + x for x in names), required="attn2" not in old)
        for old, new in _SD3_BLOCK + _SD3_BLOCK_NORMS:
            optional = "attn2" in old or "ln_" in old or (last and old.startswith("context_block."))
            _move(src, out, o + old, n + new, required=not optional)
        mod = src.pop(o + "context_block.adaLN_modulation.1.weight"), src.pop(o + "context_block.adaLN_modulation.1.bias")
        # The pre-only context norm of the last block is continuous (shift, scale): swap like the final norm.
        fix = _swap_halves if last else (lambda t: t)
        out[n + "norm1_context.linear.weight"], out[n + "norm1_context.linear.bias"] = fix(mod[0]), fix(mod[1])
    _check_consumed(src)
    return out


def _check_consumed(src: StateDict) -> None:
    if src:
        extra = sorted(src)[:8]
        raise InvalidRequest(f"checkpoint has {len(src)} keys this converter does not know, e.g. {extra}")


def to_diffusers(sd: Mapping[str, torch.Tensor]) -> tuple[str, StateDict]:
    """(family, diffusers state dict) from a state dict in any supported layout."""
    family, layout = detect_layout(sd)
    bare, _ = strip_prefix(sd)
    if layout == "diffusers":
        return family, bare
    return family, (flux_to_diffusers(bare) if family == "flux" else sd3_to_diffusers(bare))


# --------------------------------------------------------------------- config inference
def flux_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary axes (index, row, column) for a head size: FLUX's published (16, 56, 56) at 128,
    the same 1/8 : 7/16 : 7/16 proportions (each even) for other sizes."""
    side = 2 * ((7 * head_dim) // 32)
    first = head_dim - 2 * side
    if first <= 0 or first % 2 or side <= 0:
        raise InvalidRequest(f"no rotary axis split for head size {head_dim}")
    return (first, side, side)


def infer_config(family: str, sd: Mapping[str, torch.Tensor]) -> dict:
    """diffusers config of the model whose (diffusers-named) weights are ``sd``."""
    return _infer_flux(sd) if family == "flux" else _infer_sd3(sd)


def _infer_flux(sd: Mapping[str, torch.Tensor]) -> dict:
    dim, in_ch = sd["x_embedder.weight"].shape
    head_dim = sd["transformer_blocks.0.attn.norm_q.weight"].shape[0]
    if dim % head_dim:
        raise InvalidRequest(f"hidden size {dim} is not a multiple of the head size {head_dim}")
    mlp = sd["transformer_blocks.0.ff.net.0.proj.weight"].shape[0]
    if mlp != 4 * dim:
        raise InvalidRequest(f"MLP width {mlp} is not 4 x hidden size {dim}: not a FLUX.1 architecture")
    out_ch = sd["proj_out.weight"].shape[0]
    return {
        "_class_name": FLUX_CLASS,
        "patch_size": 1,
        "in_channels": int(in_ch),
        "out_channels": int(out_ch),
        "num_layers": len(_indices(sd, r"transformer_blocks\.(\d+)\.")),
        "num_single_layers": len(_indices(sd, r"single_transformer_blocks\.(\d+)\.")),
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(dim // head_dim),
        "joint_attention_dim": int(sd["context_embedder.weight"].shape[1]),
        "pooled_projection_dim": int(sd["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in sd,
        "axes_dims_rope": list(flux_rope_axes(int(head_dim))),
    }


def _infer_sd3(sd: Mapping[str, torch.Tensor]) -> dict:
    proj = sd["pos_embed.proj.weight"]
    dim, in_ch, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    qk = sd.get("transformer_blocks.0.attn.norm_q.weight")
    head_dim = int(qk.shape[0]) if qk is not None else SD3_DEFAULT_HEAD_DIM
    if dim % head_dim:
        raise InvalidRequest(f"hidden size {dim} is not a multiple of the head size {head_dim}")
    mlp = sd["transformer_blocks.0.ff.net.0.proj.weight"].shape[0]
    if mlp != 4 * dim:
        raise InvalidRequest(f"MLP width {mlp} is not 4 x hidden size {dim}: not an SD3 architecture")
    num_patches = int(sd["pos_embed.pos_embed"].shape[1])
    side = int(round(num_patches ** 0.5))
    if side * side != num_patches:
        raise InvalidRequest(f"positional table of {num_patches} entries is not square")
    return {
        "_class_name": SD3_CLASS,
        "sample_size": 128,  # only sizes the initial table, which the checkpoint replaces
        "patch_size": patch,
        "in_channels": in_ch,
        "out_channels": int(sd["proj_out.weight"].shape[0]) // (patch * patch),
        "num_layers": len(_indices(sd, r"transformer_blocks\.(\d+)\.")),
        "attention_head_dim": head_dim,
        "num_attention_heads": dim // head_dim,
        "joint_attention_dim": int(sd["context_embedder.weight"].shape[1]),
        "caption_projection_dim": int(sd["context_embedder.weight"].shape[0]),
        "pooled_projection_dim": int(sd["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "pos_embed_max_size": side,
        "dual_attention_layers": _indices(sd, r"transformer_blocks\.(\d+)\.attn2\.to_q\.weight"),
        "qk_norm": "rms_norm" if qk is not None else None,
    }


# --------------------------------------------------------------------- back to original layouts
def _unmove(src: StateDict, dst: StateDict, new: str, old: str) -> None:
    if new in src:
        dst[old] = src.pop(new)
        return
    for suffix in (".weight", ".bias"):
        if new + suffix in src:
            dst[old + suffix] = src.pop(new + suffix)


def _fuse_qkv(src: StateDict, dst: StateDict, names: tuple[str, str, str], old: str) -> None:
    for suffix in (".weight", ".bias"):
        if names[0] + suffix in src:
            dst[old + suffix] = torch.cat([src.pop(n + suffix) for n in names], dim=0)


def from_diffusers(family: str, sd: Mapping[str, torch.Tensor], layout: str) -> StateDict:
    """diffusers-named weights -> the original single-file layout (``bfl``, ``comfy`` or ``sd3_single``)."""
    if layout == "diffusers":
        return dict(sd)
    src, out = dict(sd), {}
    if family == "flux" and layout in ("bfl", "comfy"):
        for old, new in _FLUX_TOP:
            _unmove(src, out, new, old)
        out["final_layer.adaLN_modulation.1.weight"] = _swap_halves(src.pop("norm_out.linear.weight"))
        out["final_layer.adaLN_modulation.1.bias"] = _swap_halves(src.pop("norm_out.linear.bias"))
        for i in _indices(sd, r"transformer_blocks\.(\d+)\."):
            o, n = f"double_blocks.{i}.", f"transformer_blocks.{i}."
            for old, names in _FLUX_DOUBLE_QKV:
                _fuse_qkv(src, out, tuple(n + x for x in names), o + old)
            for old, new in _FLUX_DOUBLE + _FLUX_DOUBLE_NORMS:
                _unmove(src, out, n + new, o + old)
        for i in _indices(sd, r"single_transformer_blocks\.(\d+)\."):
            o, n = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
            for suffix in (".weight", ".bias"):
                parts = [src.pop(n + x + suffix) for x in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
                out[o + "linear1" + suffix] = torch.cat(parts, dim=0)
            for old, new in _FLUX_SINGLE + _FLUX_SINGLE_NORMS:
                _unmove(src, out, n + new, o + old)
        if layout == "comfy":
            out = {COMFY_PREFIX + k: v for k, v in out.items()}
    elif family == "sd3" and layout == "sd3_single":
        out["pos_embed"] = src.pop("pos_embed.pos_embed")
        for old, new in _SD3_TOP:
            _unmove(src, out, new, old)
        out["final_layer.adaLN_modulation.1.weight"] = _swap_halves(src.pop("norm_out.linear.weight"))
        out["final_layer.adaLN_modulation.1.bias"] = _swap_halves(src.pop("norm_out.linear.bias"))
        blocks = _indices(sd, r"transformer_blocks\.(\d+)\.")
        for i in blocks:
            o, n = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
            for old, names in _SD3_QKV:
                _fuse_qkv(src, out, tuple(n + x for x in names), o + old)
            for old, new in _SD3_BLOCK + _SD3_BLOCK_NORMS:
                _unmove(src, out, n + new, o + old)
            fix = _swap_halves if i == blocks[-1] else (lambda t: t)
            out[o + "context_block.adaLN_modulation.1.weight"] = fix(src.pop(n + "norm1_context.linear.weight"))
            out[o + "context_block.adaLN_modulation.1.bias"] = fix(src.pop(n + "norm1_context.linear.bias"))
    else:
        raise InvalidRequest(f"no {layout!r} layout for family {family!r}")
    if src:
        raise InvalidRequest(f"{len(src)} diffusers keys have no place in the {layout} layout, e.g. {sorted(src)[:5]}")
    return out
