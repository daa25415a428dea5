"""Image conditioning of FLUX Fill and FLUX Kontext, prepared as ComfyUI prepares it.

FLUX Fill (inpainting) takes, besides the noisy latent, the latent of the masked image and the
mask, concatenated to the latent's channels before patching. ComfyUI builds them from the
``concat_latent_image`` / ``concat_mask`` that InpaintModelConditioning puts in the CONDITIONING
(comfy/model_base.py, ``Flux.concat_cond``):

- the image latent is resized to the noise latent's size (bilinear after a centre crop to the
  same aspect ratio), repeated to the batch and moved into model space (process_latent_in);
- the mask (pixels, ``[B, 1, H*8, W*8]``) is averaged over its channels, resized to 8x the latent
  size the same way, and each 8x8 pixel block becomes 64 channels of one latent pixel, channel
  ``8 * i + j`` holding pixel ``(i, j)`` of the block;
- the result ``[B, 16 + 64, H, W]`` follows the latent's 16 channels: 96 channels in all, which a
  Fill model's 2x2 patch embedding takes as 384 packed inputs.

FLUX Kontext takes reference latents (ReferenceLatent appends ``latent["samples"]`` to the
CONDITIONING's ``reference_latents``), each moved into model space and appended to the image
tokens with their own position ids; ``reference_offsets`` gives those positions as ComfyUI's
Flux model computes them for the methods ``offset`` (default), ``index`` and ``uxo``
(FluxKontextMultiReferenceLatentMethod).

Everything here is small tensor arithmetic, run once per job by the service (no model code).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import InvalidRequest
from .latents import process_latent_in

#: The mask packs one 8x8 pixel block per latent pixel.
MASK_BLOCK = 8
FILL_MASK_CHANNELS = MASK_BLOCK * MASK_BLOCK
#: ``reference_latents_method`` values ComfyUI's Flux model knows ("uso"/"uxo/uno" arrive as "uxo").
REFERENCE_METHODS = ("offset", "index", "uxo")
MAX_REFERENCES = 8


def resize_center(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, C, h, w] -> [B, C, height, width]: crop the centre to the target aspect ratio, then bilinear."""
    old_h, old_w = t.shape[-2], t.shape[-1]
    if (old_h, old_w) == (height, width):
        return t
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    cropped = t[..., y:old_h - y, x:old_w - x]
    return F.interpolate(cropped, size=(height, width), mode="bilinear")


def resize_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``t`` with ``batch`` entries: kept, truncated, or spread evenly (ComfyUI's rule for conditioning images)."""
    n = t.shape[0]
    if n == batch:
        return t
    if batch <= 1:
        return t[:batch]
    if batch < n:
        idx = [min(round(i * (n - 1) / (batch - 1)), n - 1) for i in range(batch)]
    else:
        idx = [min(math.floor((i + 0.5) * n / batch), n - 1) for i in range(batch)]
    return t[idx]


def pack_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A pixel mask ([B, H, W] or [B, C, H, W]) -> [B, 64, height, width], one 8x8 block per latent pixel."""
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.ndim != 4:
        raise InvalidRequest(f"concat_mask must be [B, H, W] or [B, C, H, W], got {list(mask.shape)}")
    mask = resize_center(mask.float().mean(dim=1, keepdim=True), height * MASK_BLOCK, width * MASK_BLOCK)
    b = mask.shape[0]
    blocks = mask.view(b, height, MASK_BLOCK, width, MASK_BLOCK).permute(0, 2, 4, 1, 3)
    return blocks.reshape(b, FILL_MASK_CHANNELS, height, width)


def fill_concat(family: str, image: torch.Tensor, mask: torch.Tensor, latent_shape: Sequence[int]) -> torch.Tensor:
    """The extra input channels of a FLUX Fill model for a latent of ``latent_shape`` [B, C, H, W].

    ``image``: the masked image's latent in VAE space [B', C, h, w]; ``mask``: the pixel mask.
    Returns [B, C + 64, H, W] float32 in model space.
    """
    b, c, h, w = (int(v) for v in latent_shape)
    if image.ndim != 4 or image.shape[1] != c:
        raise InvalidRequest(f"concat_latent_image must be [B, {c}, h, w], got {list(image.shape)}")
    img = resize_batch(resize_center(image.float(), h, w), b)
    img = process_latent_in(family, img)
    packed = resize_batch(pack_mask(mask, h, w), b)
    return torch.cat([img, packed], dim=1).contiguous()


def reference_latents(family: str, refs: Sequence[torch.Tensor], channels: int) -> tuple[torch.Tensor, ...]:
    """Reference latents (VAE space, [1 or B, C, h, w] each) moved into model space, float32."""
    if len(refs) > MAX_REFERENCES:
        raise InvalidRequest(f"{len(refs)} reference latents; at most {MAX_REFERENCES} are accepted")
    out = []
    for i, r in enumerate(refs):
        if r.ndim != 4 or r.shape[1] != channels or r.shape[2] < 1 or r.shape[3] < 1:
            raise InvalidRequest(f"reference latent {i} must be [B, {channels}, h, w], got {list(r.shape)}")
        out.append(process_latent_in(family, r.float()).contiguous())
    return tuple(out)


def reference_offsets(latent_hw: tuple[int, int], ref_hws: Sequence[tuple[int, int]], method: str = "offset",
                      patch: int = 2) -> list[tuple[int, int, int]]:
    """(index, row offset, column offset) in tokens of each reference's position ids.

    ``latent_hw``: the generated latent's size, ``ref_hws`` the references' sizes (latent pixels).
    ``offset`` places every reference at index 1, each next one beside (or below) the ones before;
    ``index`` gives reference i index i + 1 at offset 0; ``uxo`` gives index 0 and places the
    references diagonally after the generated image.
    """
    if method not in REFERENCE_METHODS:
        raise InvalidRequest(f"unknown reference_latents_method {method!r} (known: {', '.join(REFERENCE_METHODS)})")
    h_len = (latent_hw[0] + patch // 2) // patch
    w_len = (latent_hw[1] + patch // 2) // patch
    out, h, w, index = [], 0, 0, 0
    for rh, rw in ref_hws:
        if method == "index":
            index, h_off, w_off = index + 1, 0, 0
        elif method == "uxo":
            index, h_off, w_off = 0, h_len * patch + h, w_len * patch + w
            h, w = h + rh, w + rw
        else:
            index, h_off, w_off = 1, 0, 0
            if rh + h > rw + w:
                w_off = w
            else:
                h_off = h
            h, w = max(h, rh + h_off), max(w, rw + w_off)
        out.append((index, (h_off + patch // 2) // patch, (w_off + patch // 2) // patch))
    return out


def num_reference_tokens(ref_hws: Sequence[tuple[int, int]], patch: int = 2) -> int:
    """Image tokens the references add to the sequence (odd sizes are padded to the patch)."""
    return sum(((h + patch - 1) // patch) * ((w + patch - 1) // patch) for h, w in ref_hws)


def check_image_conditioning(job, info) -> None:
    """A SamplingJob's ``concat`` / ``ref_latents`` against its model (core.executor.ModelInfo).

    A Fill model needs the masked image and the mask (ComfyUI would silently sample with an empty
    image and a full mask: refused here, with the nodes that provide them named); other models
    refuse them. Reference latents are for FLUX models that take the latent's channels only.
    """
    lat = job.latent
    b, c, h, w = lat.shape
    need = int(getattr(info, "concat_channels", 0) or 0)
    if need and job.concat is None:
        raise InvalidRequest(f"model {info.name} is a FLUX Fill (inpainting) model: it needs the masked image "
                             "latent and the mask (concat_latent_image and concat_mask, as "
                             "InpaintModelConditioning sets them)")
    if job.concat is not None:
        if not need:
            raise InvalidRequest(f"model {info.name} takes no inpainting channels (concat_latent_image/concat_mask "
                                 "are for FLUX Fill models)")
        if tuple(job.concat.shape) != (b, need, h, w):
            raise InvalidRequest(f"Fill channels must be [{b}, {need}, {h}, {w}], got {list(job.concat.shape)}")
    if job.ref_latents:
        if info.family != "flux" or need:
            raise InvalidRequest(f"model {info.name} does not take reference latents (FLUX Kontext / FLUX-dev "
                                 "architectures do)")
        if len(job.ref_latents) > MAX_REFERENCES:
            raise InvalidRequest(f"{len(job.ref_latents)} reference latents; at most {MAX_REFERENCES} are accepted")
        for i, r in enumerate(job.ref_latents):
            if r.ndim != 4 or r.shape[1] != c or r.shape[0] not in (1, b):
                raise InvalidRequest(f"reference latent {i} must be [1 or {b}, {c}, h, w], got {list(r.shape)}")
    if job.ref_method not in REFERENCE_METHODS:
        raise InvalidRequest(f"unknown reference_latents_method {job.ref_method!r} "
                             f"(known: {', '.join(REFERENCE_METHODS)})")
