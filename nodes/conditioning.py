"""Taking ComfyUI's CONDITIONING apart into the tensors of a service job.

A CONDITIONING is a list of ``[tensor [B, tokens, dim], {"pooled_output": ..., ...}]`` entries.
The service takes one text context and one pooled vector per branch (and, for FLUX-dev, one
guidance value), so this module accepts exactly what it can sample faithfully:

- FLUX: the T5 context, the CLIP pooled vector, ``guidance`` from the positive branch
  (FluxGuidance sets it; ComfyUI's default is 3.5). The negative branch is used only when
  cfg != 1 (FLUX-dev usually runs cfg 1).
- SD3: the CLIP-L/G + T5 context, the pooled vector, and the negative branch for CFG.
- FLUX Fill: ``concat_latent_image`` and ``concat_mask`` as InpaintModelConditioning sets them
  (sent as job tensors of those names); FLUX Kontext: ``reference_latents`` as ReferenceLatent
  appends them (sent as ``ref_latent_0``, ``ref_latent_1``, ...) and ``reference_latents_method``
  (FluxKontextMultiReferenceLatentMethod). Under CFG the negative branch must carry the same ones
  (the service runs one image conditioning per job).

Anything that would change how ComfyUI samples and that the service cannot reproduce (areas,
masks, ControlNets, GLIGEN, hooks, timestep ranges, several entries to be mixed, attention
masks) is refused with an error that names it, never silently dropped.

Imports torch but not ComfyUI (tested without it).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
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
    "attention_mask": "a text attention mask",
    "unclip_conditioning": "unCLIP image conditioning",
    "noise_augmentation": "noise augmentation",
}
#: FLUX Fill / Kontext keys, sent with the job (image_tensors)
IMAGE_KEYS = ("concat_latent_image", "concat_mask", "reference_latents", "reference_latents_method")
#: keys that are harmless for the families served (bookkeeping ComfyUI nodes add)
IGNORED_KEYS = frozenset({"pooled_output", "guidance", "strength", "start_percent", "end_percent",
                          "model_conds", "uuid", "prompt_type"} | set(IMAGE_KEYS))


class ConditioningError(ValueError):
    """The conditioning cannot be sampled by the service as ComfyUI would sample it."""


@dataclass(frozen=True)
class JobConditioning:
    """The conditioning part of a job: tensors by the service's names, plus the FLUX guidance."""

    tensors: dict[str, torch.Tensor]
    guidance: float | None
    settings: dict = field(default_factory=dict)  # job settings the conditioning implies (reference method)


def _entry(conditioning: Any, branch: str) -> tuple[torch.Tensor, dict]:
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


own_tensor = _own  # for the sampler node: a job body holds each tensor once


def job_conditioning(family: str, positive: Any, negative: Any, cfg: float, *, guidance_embeds: bool = True,
                     context_dim: int | None = None, pooled_dim: int | None = None) -> JobConditioning:
    """The job tensors (``context``, ``pooled`` and, when CFG runs, ``neg_context``/``neg_pooled``)
    and the FLUX guidance, for a model of ``family`` ("flux" or "sd3").

    The negative branch is read only when cfg != 1 (ComfyUI skips it at cfg 1, math.isclose).
    Raises ConditioningError naming what cannot be sampled.
    """
    if family not in ("flux", "sd3"):
        raise ConditioningError(f"unknown model family {family!r}")
    context, extras = _entry(positive, "positive")
    _check_dims("positive", context, extras["pooled_output"], context_dim, pooled_dim)
    tensors = {"context": context.float().contiguous(), "pooled": extras["pooled_output"].float().contiguous()}
    guidance = None
    if family == "flux" and guidance_embeds:
        value = extras.get("guidance", DEFAULT_FLUX_GUIDANCE)
        guidance = float(value) if value is not None else None
    if not math.isclose(cfg, 1.0):
        if negative is None:
            raise ConditioningError(f"cfg {cfg} needs a negative conditioning (or set cfg to 1)")
        neg_context, neg_extras = _entry(negative, "negative")
        _check_dims("negative", neg_context, neg_extras["pooled_output"], context_dim, pooled_dim)
        if family == "flux" and guidance_embeds:
            neg_guidance = neg_extras.get("guidance", DEFAULT_FLUX_GUIDANCE)
            if neg_guidance != value:
                raise ConditioningError(f"positive and negative FLUX guidance differ ({value} vs {neg_guidance}); "
                                        "the service runs one guidance value per job")
        # the same CONDITIONING on both inputs is common; a job body holds each tensor once
        tensors["neg_context"] = _own(neg_context.float().contiguous(), tensors.values())
        tensors["neg_pooled"] = _own(neg_extras["pooled_output"].float().contiguous(), tensors.values())
    image, settings = image_tensors(extras)
    if not math.isclose(cfg, 1.0):
        neg_image, neg_settings = image_tensors(neg_extras)
        if neg_settings != settings or set(neg_image) != set(image) or any(
                not torch.equal(neg_image[k], image[k]) for k in image):
            raise ConditioningError(
                "the negative conditioning carries other image conditioning (inpaint image/mask or reference "
                "latents) than the positive one; the service runs one per job: apply the same "
                "InpaintModelConditioning / ReferenceLatent to both, or set cfg to 1")
    for k, t in image.items():
        tensors[k] = _own(t, tensors.values())
    return JobConditioning(tensors=tensors, guidance=guidance, settings=settings)


def image_tensors(extras: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """FLUX Fill / Kontext inputs of one branch as job tensors (VAE space, float32) and settings."""
    out: dict[str, torch.Tensor] = {}
    image, mask = extras.get("concat_latent_image"), extras.get("concat_mask")
    if (image is None) != (mask is None):
        missing = "concat_mask" if mask is None else "concat_latent_image"
        raise ConditioningError(f"the conditioning has one of concat_latent_image / concat_mask but no {missing}; "
                                "InpaintModelConditioning sets both")
    if image is not None:
        for key, t in (("concat_latent_image", image), ("concat_mask", mask)):
            if not isinstance(t, torch.Tensor):
                raise ConditioningError(f"{key} is not a tensor")
            out[key] = t.float().contiguous()
    refs = extras.get("reference_latents") or []
    if not isinstance(refs, (list, tuple)) or not all(isinstance(r, torch.Tensor) for r in refs):
        raise ConditioningError("reference_latents must be a list of latent tensors (ReferenceLatent)")
    for i, r in enumerate(refs):
        out[f"ref_latent_{i}"] = r.float().contiguous()
    method = extras.get("reference_latents_method")
    settings = {"reference_latents_method": str(method)} if refs and method is not None else {}
    return out, settings
