"""Taking ComfyUI's CONDITIONING apart into the tensors of a service job.

A CONDITIONING is a list of ``[tensor [B, tokens, dim], {"pooled_output": ..., ...}]`` entries.
The service takes one text context and one pooled vector per branch (and, for FLUX-dev, one
guidance value), so this module accepts exactly what it can sample faithfully:

- FLUX: the T5 context, the CLIP pooled vector, ``guidance`` from the positive branch
  (FluxGuidance sets it; ComfyUI's default is 3.5). The negative branch is used only when
  cfg != 1 (FLUX-dev usually runs cfg 1).
- SD3: the CLIP-L/G + T5 context, the pooled vector, and the negative branch for CFG.

Anything that would change how ComfyUI samples and that the service cannot reproduce (areas,
masks, ControlNets, GLIGEN, hooks, timestep ranges, several entries to be mixed, reference
latents, attention masks) is refused with an error that names it, never silently dropped.

Imports torch but not ComfyUI (tested without it).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

#: ComfyUI's FLUX default when no FluxGuidance node set a value (comfy/model_base.py, Flux.extra_conds)
DEFAULT_FLUX_GUIDANCE = 3.5

#: conditioning keys that change sampling in ways the service does not reproduce -> what they are
UNSUPPORTED_KEYS = {
    "area": "an area (ConditioningSetArea)",
    "mask": "a mask (ConditioningSetMask)",
    "control": "a ControlNet",
    "gligen": "GLIGEN boxes",
    "hooks": "LoRA/model hooks",
    "concat_latent_image": "an image-conditioning latent (inpaint/edit models)",
    "concat_mask": "an inpaint mask",
    "clip_vision_output": "CLIP-vision image conditioning (image-to-video)",
    "reference_latents": "reference latents (FLUX Kontext)",
    "attention_mask": "a text attention mask",
    "unclip_conditioning": "unCLIP image conditioning",
    "noise_augmentation": "noise augmentation",
}
#: keys that are harmless for the families served (bookkeeping ComfyUI nodes add)
IGNORED_KEYS = frozenset({"pooled_output", "guidance", "strength", "start_percent", "end_percent",
                          "model_conds", "uuid", "prompt_type"})


class ConditioningError(ValueError):
    """The conditioning cannot be sampled by the service as ComfyUI would sample it."""


@dataclass(frozen=True)
class JobConditioning:
    """The conditioning part of a job: tensors by the service's names, plus the FLUX guidance."""

    tensors: dict[str, torch.Tensor]
    guidance: float | None


#: families whose text encoders give no pooled vector (Qwen2.5-VL, umT5): the job's pooled is [B, 0]
NO_POOLED_FAMILIES = ("qwen_image", "wan")


def _entry(conditioning: Any, branch: str, needs_pooled: bool = True) -> tuple[torch.Tensor, dict]:
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ConditioningError(f"{branch} conditioning is empty or not a CONDITIONING list")
    if len(conditioning) != 1:
        raise ConditioningError(
            f"{branch} conditioning has {len(conditioning)} entries (e.g. from ConditioningCombine); the TetriServe "
            "Sampler takes exactly one: use ConditioningConcat or a single text encoder node")
    item = conditioning[0]
    if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[1], dict):
        raise ConditioningError(f"{branch} conditioning entry is not [tensor, dict]")
    context, extras = item
    if not isinstance(context, torch.Tensor) or context.ndim != 3:
        shape = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise ConditioningError(f"{branch} text context must be a [batch, tokens, dim] tensor, got {shape}")
    for key, what in UNSUPPORTED_KEYS.items():
        if extras.get(key) is not None:
            raise ConditioningError(f"{branch} conditioning carries {what} ('{key}'), which the TetriServe Sampler "
                                    "does not apply; use the stock KSampler for this workflow")
    start, end = extras.get("start_percent", 0.0), extras.get("end_percent", 1.0)
    if start != 0.0 or end != 1.0:
        raise ConditioningError(f"{branch} conditioning is limited to the timestep range {start}..{end} "
                                "(ConditioningSetTimestepRange); the TetriServe Sampler uses one conditioning "
                                "for all steps")
    strength = extras.get("strength", 1.0)
    if not math.isclose(float(strength), 1.0):
        raise ConditioningError(f"{branch} conditioning has strength {strength}; only 1.0 is supported")
    unknown = sorted(k for k in extras if k not in IGNORED_KEYS and k not in UNSUPPORTED_KEYS)
    if unknown:
        log.warning("%s conditioning: ignoring keys %s", branch, ", ".join(unknown))
    pooled = extras.get("pooled_output")
    if not needs_pooled:
        return context, {**extras, "pooled_output": context.new_zeros((context.shape[0], 0))}
    if not isinstance(pooled, torch.Tensor):
        raise ConditioningError(f"{branch} conditioning has no pooled_output (the pooled CLIP vector); encode the "
                                "text with the model's own text encoders (DualCLIPLoader / TripleCLIPLoader)")
    if pooled.ndim == 1:
        pooled = pooled.unsqueeze(0)
    return context, {**extras, "pooled_output": pooled}


def _check_dims(branch: str, context: torch.Tensor, pooled: torch.Tensor, context_dim: int | None,
                pooled_dim: int | None) -> None:
    if context_dim is not None and context.shape[-1] != context_dim:
        raise ConditioningError(f"{branch} text context has width {context.shape[-1]}, the model takes {context_dim} "
                                "(wrong text encoder for this model?)")
    if pooled_dim is not None and pooled.shape[-1] != pooled_dim:
        raise ConditioningError(f"{branch} pooled vector has width {pooled.shape[-1]}, the model takes {pooled_dim}")


def _own(t: torch.Tensor, others) -> torch.Tensor:
    """``t``, copied if it shares memory with one of ``others``."""
    ptr = t.untyped_storage().data_ptr()
    return t.clone() if any(o.untyped_storage().data_ptr() == ptr for o in others) else t


def job_conditioning(family: str, positive: Any, negative: Any, cfg: float, *, guidance_embeds: bool = True,
                     context_dim: int | None = None, pooled_dim: int | None = None) -> JobConditioning:
    """The job tensors (``context``, ``pooled`` and, when CFG runs, ``neg_context``/``neg_pooled``)
    and the FLUX guidance, for a model of ``family`` ("flux", "sd3", "qwen_image" or "wan"; the last
    two take no pooled vector, their stock text encoders give none).

    The negative branch is read only when cfg != 1 (ComfyUI skips it at cfg 1, math.isclose).
    Raises ConditioningError naming what cannot be sampled.
    """
    if family not in ("flux", "sd3", *NO_POOLED_FAMILIES):
        raise ConditioningError(f"unknown model family {family!r}")
    needs_pooled = family not in NO_POOLED_FAMILIES
    context, extras = _entry(positive, "positive", needs_pooled)
    _check_dims("positive", context, extras["pooled_output"], context_dim, pooled_dim)
    tensors = {"context": context.float().contiguous(), "pooled": extras["pooled_output"].float().contiguous()}
    guidance = None
    if family == "flux" and guidance_embeds:
        value = extras.get("guidance", DEFAULT_FLUX_GUIDANCE)
        guidance = float(value) if value is not None else None
    if not math.isclose(cfg, 1.0):
        if negative is None:
            raise ConditioningError(f"cfg {cfg} needs a negative conditioning (or set cfg to 1)")
        neg_context, neg_extras = _entry(negative, "negative", needs_pooled)
        _check_dims("negative", neg_context, neg_extras["pooled_output"], context_dim, pooled_dim)
        if family == "flux" and guidance_embeds:
            neg_guidance = neg_extras.get("guidance", DEFAULT_FLUX_GUIDANCE)
            if neg_guidance != value:
                raise ConditioningError(f"positive and negative FLUX guidance differ ({value} vs {neg_guidance}); "
                                        "the service runs one guidance value per job")
        # the same CONDITIONING on both inputs is common; a job body holds each tensor once
        tensors["neg_context"] = _own(neg_context.float().contiguous(), tensors.values())
        tensors["neg_pooled"] = _own(neg_extras["pooled_output"].float().contiguous(), tensors.values())
    return JobConditioning(tensors=tensors, guidance=guidance)
