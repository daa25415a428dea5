"""The job body's image conditioning: FLUX Fill's masked image and mask, FLUX Kontext's references.

Optional tensors of a job body (see docs/api.md), always as ComfyUI's CONDITIONING holds them:

- ``concat_latent_image`` [1 or B, C, h, w]: the latent of the masked image, in VAE space;
  ``concat_mask`` [1 or B, H, W] or [1 or B, 1, H, W]: the mask in pixels (1 = repaint). Both or
  neither; a FLUX Fill model needs them, other models refuse them. Sizes other than the latent's
  are resized as ComfyUI resizes them.
- ``ref_latent_0``, ``ref_latent_1``, ... [1 or B, C, h, w]: reference latents in VAE space, in
  order, appended to the image tokens (FLUX models without Fill channels; setting
  ``reference_latents_method`` places them: offset, index or uxo).

``check_image_tensors`` validates shapes against the model and the limits; ``image_inputs`` turns
them into the SamplingJob's model-space ``concat`` and ``ref_latents`` (sampling/image_cond.py);
``cost.priced_size`` is the image size the planner prices a job with references as.
"""
from __future__ import annotations

import torch

from ..core.executor import ModelInfo
from ..errors import InvalidRequest
from ..sampling.image_cond import FILL_MASK_CHANNELS, MAX_REFERENCES, fill_concat, num_reference_tokens, reference_latents
from ..cost import priced_size  # noqa: F401  (re-exported: the service prices Kontext jobs with it)

FILL_TENSORS = ("concat_latent_image", "concat_mask")
REF_TENSORS = tuple(f"ref_latent_{i}" for i in range(MAX_REFERENCES))
IMAGE_TENSORS = FILL_TENSORS + REF_TENSORS


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def reference_names(tensors: dict) -> list[str]:
    """The ``ref_latent_i`` names sent, checked to be numbered from 0 without gaps."""
    names = [n for n in REF_TENSORS if n in tensors]
    if names != list(REF_TENSORS[:len(names)]):
        raise InvalidRequest(f"reference latents must be numbered ref_latent_0, ref_latent_1, ... without gaps, "
                             f"got {', '.join(names)}")
    return names


def check_image_tensors(tensors: dict[str, torch.Tensor], info: ModelInfo, max_image_tokens: int) -> None:
    """Shapes of the image conditioning against the model; raises InvalidRequest naming the tensor."""
    latent = tensors["latent"]
    batch, channels, h, w = latent.shape
    fill = [n for n in FILL_TENSORS if n in tensors]
    if info.concat_channels and info.concat_channels != channels + FILL_MASK_CHANNELS:
        raise InvalidRequest(f"model {info.name} takes {info.concat_channels} conditioning channels (a FLUX Depth / "
                             f"Canny-style model); only FLUX Fill's {channels} + {FILL_MASK_CHANNELS} are served")
    if info.concat_channels and len(fill) < 2:
        raise InvalidRequest(f"model {info.name} is a FLUX Fill (inpainting) model: send concat_latent_image (the "
                             "masked image's latent) and concat_mask (the mask), as InpaintModelConditioning makes them")
    if fill and not info.concat_channels:
        raise InvalidRequest(f"model {info.name} is not a FLUX Fill model: it takes no {' / '.join(fill)}")
    if fill:
        image, mask = tensors["concat_latent_image"], tensors["concat_mask"]
        if image.ndim != 4 or image.shape[0] not in (1, batch) or image.shape[1] != channels:
            raise InvalidRequest(f"concat_latent_image must be [1 or {batch}, {channels}, h, w], got {_shape(image)}")
        if image.shape[2] * image.shape[3] > 4 * max_image_tokens:
            raise InvalidRequest(f"concat_latent_image {_shape(image)} is larger than the image limit")
        if mask.ndim not in (3, 4) or mask.shape[0] not in (1, batch) or (mask.ndim == 4 and mask.shape[1] != 1):
            raise InvalidRequest(f"concat_mask must be [1 or {batch}, H, W] or [1 or {batch}, 1, H, W], "
                                 f"got {_shape(mask)}")
        if mask.shape[-2] * mask.shape[-1] > 256 * max_image_tokens:
            raise InvalidRequest(f"concat_mask {_shape(mask)} is larger than the image limit")
    names = reference_names(tensors)
    if names:
        if info.family != "flux" or info.concat_channels:
            raise InvalidRequest(f"model {info.name} does not take reference latents (FLUX Kontext does)")
        for n in names:
            r = tensors[n]
            if r.ndim != 4 or r.shape[0] not in (1, batch) or r.shape[1] != channels:
                raise InvalidRequest(f"{n} must be [1 or {batch}, {channels}, h, w], got {_shape(r)}")
        tokens = num_reference_tokens([(int(tensors[n].shape[2]), int(tensors[n].shape[3])) for n in names])
        if tokens > max_image_tokens:
            raise InvalidRequest(f"the reference latents add {tokens} image tokens, more than the limit "
                                 f"{max_image_tokens}")


def image_inputs(family: str, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, tuple]:
    """(concat, ref_latents) of a SamplingJob: model space, float32 (after ``check_image_tensors``)."""
    latent = tensors["latent"]
    concat = None
    if "concat_latent_image" in tensors:
        concat = fill_concat(family, tensors["concat_latent_image"], tensors["concat_mask"], latent.shape)
    refs = reference_latents(family, [tensors[n] for n in reference_names(tensors)], int(latent.shape[1]))
    return concat, refs
