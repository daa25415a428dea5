"""Names both sides share without torch: model families with their latent formats and model-sampling
constants, and the sampler and scheduler names the service runs (the ComfyUI nodes list these)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidRequest
from .video_latents import WAN21_MEAN, WAN21_STD, WAN22_MEAN, WAN22_STD

#: samplers the workers run (ComfyUI's names); worker/samplers.py implements exactly these
SAMPLER_NAMES = ("euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2s_ancestral", "lcm", "ipndm",
                 "gradient_estimation")
#: weight dtypes a model may be loaded with: float, or fp8 storage as ComfyUI's UNETLoader offers
#: (GGUF and fp8 files stay quantised whatever is asked; worker/quant.py)
WEIGHT_DTYPES = ("bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
#: schedulers (ComfyUI's names), in ComfyUI's order; sampling/schedules.py computes exactly these
SCHEDULER_NAMES = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                   "linear_quadratic", "kl_optimal")


@dataclass(frozen=True)
class FamilySpec:
    """Per model family: latent format and the model-sampling object ComfyUI builds for it."""

    name: str
    latent_scale: float  # process_in: (x - shift) * scale
    latent_shift: float
    sampling: str  # "discrete_flow" (SD3, FLUX-schnell) | "flux" (FLUX-dev)
    shift: float  # discrete_flow: time-SNR shift alpha; flux: mu
    multiplier: float  # timestep = sigma * multiplier
    num_sampling_steps: int  # length of the model-sampling sigma table
    latent_channels: int = 16
    # Per-channel latent formats (Wan VAEs): process_in = (x - mean) / std; scalars unused then.
    latent_mean: tuple[float, ...] | None = None
    latent_std: tuple[float, ...] | None = None
    latent_dims: int = 2  # spatial (H, W) or, 3, video (F, H, W): ComfyUI's latent_dimensions


FAMILIES: dict[str, FamilySpec] = {
    "sd3": FamilySpec("sd3", 1.5305, 0.0609, "discrete_flow", 3.0, 1000.0, 1000),
    "flux": FamilySpec("flux", 0.3611, 0.1159, "flux", 1.15, 1.0, 10000),
    "flux-schnell": FamilySpec("flux-schnell", 0.3611, 0.1159, "discrete_flow", 1.0, 1.0, 1000),
    # ComfyUI: QwenImage (shift 1.15, multiplier 1.0, Wan 2.1 latents); WAN21_T2V (shift 8.0,
    # multiplier 1000); WAN22_T2V, the 5B text/image-to-video model (48-channel Wan 2.2 latents).
    "qwen_image": FamilySpec("qwen_image", 1.0, 0.0, "discrete_flow", 1.15, 1.0, 1000,
                             latent_mean=WAN21_MEAN, latent_std=WAN21_STD, latent_dims=3),
    "wan": FamilySpec("wan", 1.0, 0.0, "discrete_flow", 8.0, 1000.0, 1000,
                      latent_mean=WAN21_MEAN, latent_std=WAN21_STD, latent_dims=3),
    "wan22": FamilySpec("wan22", 1.0, 0.0, "discrete_flow", 8.0, 1000.0, 1000, latent_channels=48,
                        latent_mean=WAN22_MEAN, latent_std=WAN22_STD, latent_dims=3),
}
#: model families whose sampling family depends on the latent channels (Wan 2.2 5B: 48)
VIDEO_FAMILIES = ("wan", "wan22")


def family_spec(family: str) -> FamilySpec:
    try:
        return FAMILIES[family]
    except KeyError:
        raise InvalidRequest(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})") from None


def sampling_family(family: str, guidance_embeds: bool = True, latent_channels: int | None = None) -> str:
    """The sampling family of a loaded model: a FLUX without guidance embedding samples as schnell."""
    if family == "flux" and not guidance_embeds:
        return "flux-schnell"
    if family == "wan" and latent_channels == 48:
        return "wan22"
    family_spec(family)
    return family


def flux_resolution_shift(height: int, width: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The shift ComfyUI's ModelSamplingFlux node sets: linear in the image-token count
    (height * width / 256), ``base_shift`` at 256 tokens and ``max_shift`` at 4096."""
    if height <= 0 or width <= 0:
        raise InvalidRequest("height and width must be positive")
    low_tokens, high_tokens = 256, 4096
    slope = (max_shift - base_shift) / (high_tokens - low_tokens)
    intercept = base_shift - slope * low_tokens
    return (width * height / (8 * 8 * 2 * 2)) * slope + intercept
