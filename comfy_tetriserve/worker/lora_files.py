"""Random LoRA files in the key formats users have, and the merged weights they stand for.

``write_random_lora`` writes a LoRA for the tiny (or any) model in one of ``FORMATS``;
``merge_lora`` returns the weights with a LoRA merged in (``W + strength * alpha / rank * up @ down``,
``W + strength * diff``, ``b + strength * diff_b``) in the original single-file layout, the way
ComfyUI patches a model. Tests compare the unfused per-job application (lora.py) against models
loaded from merged files, and selfchecks and measurements use the random files.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InvalidRequest
from .convert import from_diffusers

#: kohya (lora_unet_ + original names), peft (transformer. + diffusers names, lora_A/B), bfl
#: (diffusion_model. + original names, lora_up/down), diff (diffusion_model. + .diff/.diff_b)
FORMATS = ("kohya", "peft", "bfl", "diff")
_ORIG_LAYOUT = {"flux": "bfl", "sd3": "sd3_single"}


def _block_weights(sd: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2 and "blocks." in k)


def lora_tensors(family: str, sd: dict[str, torch.Tensor], fmt: str, *, rank: int = 4, seed: int = 0,
                 scale: float = 0.5) -> dict[str, torch.Tensor]:
    """A random LoRA in ``fmt`` for the model whose diffusers-named weights are ``sd``: one term per
    Linear weight of the blocks (original names for kohya/bfl/diff, diffusers names for peft).
    ``scale`` sizes the delta relative to the weights (so a strength of 1 changes outputs visibly)."""
    if fmt not in FORMATS:
        raise InvalidRequest(f"unknown LoRA format {fmt!r} (known: {', '.join(FORMATS)})")
    g = torch.Generator().manual_seed(seed)
    named = sd if fmt == "peft" else from_diffusers(family, sd, _ORIG_LAYOUT[family])
    out: dict[str, torch.Tensor] = {}
    for key in _block_weights(named):
        w = named[key]
        o, i = w.shape
        base = key[: -len(".weight")]
        std = float(w.float().std()) * scale
        if fmt == "diff":
            out[f"diffusion_model.{base}.diff"] = torch.randn(o, i, generator=g) * std
            out[f"diffusion_model.{base}.diff_b"] = torch.randn(o, generator=g) * 0.05
            continue
        down = torch.randn(rank, i, generator=g) / i ** 0.5
        up = torch.randn(o, rank, generator=g) * std
        alpha = torch.tensor(float(rank) / 2)
        if fmt == "kohya":
            name = "lora_unet_" + base.replace(".", "_")
            out.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": alpha})
        elif fmt == "bfl":
            name = "diffusion_model." + base
            out.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": alpha})
        else:
            name = "transformer." + base
            out.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up})
    return out


def write_random_lora(family: str, sd: dict[str, torch.Tensor], fmt: str, path: str | Path, **kwargs) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in lora_tensors(family, sd, fmt, **kwargs).items()}, str(path))
    return path


def merge_lora(family: str, sd: dict[str, torch.Tensor], stack: list[tuple[dict[str, torch.Tensor], float]]
               ) -> dict[str, torch.Tensor]:
    """Original-layout weights of ``sd`` (diffusers names) with every LoRA of ``stack`` merged in, in fp32.

    Only the formats this module writes (``lora_tensors``) are understood."""
    orig = {k: v.float().clone() for k, v in from_diffusers(family, sd, _ORIG_LAYOUT[family]).items()}
    dnames = {k: v.float().clone() for k, v in sd.items()}
    for lora, strength in stack:
        for key, t in lora.items():
            for suffix, kind in ((".lora_down.weight", "down"), (".lora_A.weight", "down"), (".diff", "diff"),
                                 (".diff_b", "diff_b")):
                if not key.endswith(suffix):
                    continue
                base = key[: -len(suffix)]
                if key.startswith("transformer."):
                    target, name = dnames, base[len("transformer."):]
                elif key.startswith("lora_unet_"):
                    target = orig
                    name = next(k[: -len(".weight")] for k in orig
                                if k.endswith(".weight") and k[: -len(".weight")].replace(".", "_") == base[len("lora_unet_"):])
                else:
                    target, name = orig, base[len("diffusion_model."):]
                if kind == "down":
                    up = lora[base + (".lora_up.weight" if suffix == ".lora_down.weight" else ".lora_B.weight")]
                    rank = t.shape[0]
                    alpha = float(lora[base + ".alpha"]) if base + ".alpha" in lora else float(rank)
                    target[name + ".weight"] += strength * alpha / rank * (up.float() @ t.float())
                elif kind == "diff":
                    target[name + ".weight"] += strength * t.float()
                else:
                    target[name + ".bias"] += strength * t.float()
    merged_d = from_diffusers(family, dnames, _ORIG_LAYOUT[family])
    # diffusers-named deltas were applied to dnames; original-named ones to orig: combine both
    base_orig = from_diffusers(family, {k: v.float() for k, v in sd.items()}, _ORIG_LAYOUT[family])
    return {k: orig[k] + (merged_d[k] - base_orig[k]) for k in orig}
