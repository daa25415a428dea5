"""Latent formats and initial noise as ComfyUI computes them (small tensor helpers, no model code)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InvalidRequest
from .names import family_spec, sampling_family


def _channel_stats(f, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if latent.dim() < 2 or latent.shape[1] != len(f.latent_mean):
        raise InvalidRequest(f"{f.name} latents have {len(f.latent_mean)} channels, got shape {tuple(latent.shape)}")
    view = (1, -1) + (1,) * (latent.dim() - 2)
    mean = torch.tensor(f.latent_mean, dtype=latent.dtype, device=latent.device).view(view)
    std = torch.tensor(f.latent_std, dtype=latent.dtype, device=latent.device).view(view)
    return mean, std


def process_latent_in(family: str, latent: torch.Tensor) -> torch.Tensor:
    f = family_spec(family)
    if f.latent_mean is not None:
        mean, std = _channel_stats(f, latent)
        return (latent - mean) / std
    return (latent - f.latent_shift) * f.latent_scale


def process_latent_out(family: str, latent: torch.Tensor) -> torch.Tensor:
    f = family_spec(family)
    if f.latent_mean is not None:
        mean, std = _channel_stats(f, latent)
        return latent * std + mean
    return (latent / f.latent_scale) + f.latent_shift


def fix_empty_latent_channels(family: str, latent: torch.Tensor) -> torch.Tensor:
    """An all-zero latent with another channel count (e.g. a 4-channel empty latent) becomes the
    family's all-zero latent, as ComfyUI does before it draws noise; other mismatches are errors."""
    spec = family_spec(family)
    channels = spec.latent_channels
    if spec.latent_dims == 3:
        # ComfyUI: a 4-D latent of a video-latent family gains a frame axis (an image is one frame)
        if latent.dim() == 4:
            latent = latent.unsqueeze(2)
        if latent.dim() != 5:
            raise InvalidRequest(f"{family} latents are [B, C, F, H, W], got shape {tuple(latent.shape)}")
    elif latent.dim() != 4:
        raise InvalidRequest(f"latent must be [B, C, H, W], got shape {tuple(latent.shape)}")
    if latent.shape[1] == channels:
        return latent
    if torch.count_nonzero(latent) == 0:
        return latent.new_zeros((latent.shape[0], channels, *latent.shape[2:]))
    raise InvalidRequest(f"{family} latents have {channels} channels, got {latent.shape[1]}")


def prepare_latent(family: str, latent: torch.Tensor) -> torch.Tensor:
    """A raw (VAE-space) LATENT as the sampler sees it: channels fixed for an empty latent, then
    the latent format's process_in, applied only when the latent has a non-zero entry (an empty
    text-to-image latent stays all zeros). Draw the noise from the result's shape."""
    latent = fix_empty_latent_channels(family, latent)
    if torch.count_nonzero(latent) > 0:
        latent = process_latent_in(family, latent)
    return latent


def prepare_noise(latent: torch.Tensor, seed: int, batch_inds: Sequence[int] | None = None) -> torch.Tensor:
    """ComfyUI's initial noise: a CPU generator seeded with ``seed``, randn of the latent's shape.

    With ``batch_inds`` (a LATENT's "batch_index"), image k gets the noise of draw batch_inds[k]
    from one generator making [1, C, H, W] draws, as ComfyUI does for latents split from a batch.
    (ComfyUI seeds torch's global generator; a private one gives the same numbers.)
    """
    generator = torch.Generator().manual_seed(check_seed(seed))
    kw = dict(dtype=latent.dtype, layout=latent.layout, generator=generator, device="cpu")
    if batch_inds is None:
        return torch.randn(latent.size(), **kw)
    inds = [int(i) for i in batch_inds]
    if len(inds) != latent.shape[0] or min(inds) < 0:
        raise InvalidRequest("batch_index must give one non-negative index per image")
    wanted = set(inds)
    draws = {}
    for i in range(max(inds) + 1):
        noise = torch.randn([1] + list(latent.size())[1:], **kw)
        if i in wanted:
            draws[i] = noise
    return torch.cat([draws[i] for i in inds], dim=0)


def check_seed(seed: int) -> int:
    """Seeds are what ComfyUI's seed widgets allow: integers in [0, 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
        raise InvalidRequest(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return seed


# ----------------------------------------------------------------- video-latent families
def is_video_family(family: str) -> bool:
    """Families whose latents ComfyUI keeps 5-D [B, C, F, H, W] (Qwen-Image with F = 1, Wan)."""
    from .names import FAMILIES

    return family in FAMILIES and FAMILIES[family].latent_dims == 3


def check_video_latent(family: str, shape: tuple[int, ...]) -> int:
    """Validate a 5-D latent's shape for ``family``; returns its number of latent frames."""
    if len(shape) != 5:
        raise InvalidRequest(f"{family} latents are [B, C, F, H, W], got {list(shape)}")
    if family == "qwen_image" and shape[2] != 1:
        raise InvalidRequest(f"Qwen-Image latents have one frame, got {list(shape)}")
    if shape[2] < 1:
        raise InvalidRequest(f"latent has no frames: {list(shape)}")
    return int(shape[2])


def sampling_family_of(info) -> str:
    """The latent format / model sampling family the service uses for a loaded model's ModelInfo:
    the model family, except Wan 2.2 5B (48 channels), which is 'wan22'."""
    if info.family == "wan":
        return sampling_family("wan", latent_channels=info.in_channels)
    return info.family
