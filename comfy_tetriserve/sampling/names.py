"""Names both sides share without torch: model families with their latent formats and model-sampling
constants, and the sampler and scheduler names the service runs (the ComfyUI nodes list these)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidRequest

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


FAMILIES: dict[str, FamilySpec] = {
    "sd3": FamilySpec("sd3", 1.5305, 0.0609, "discrete_flow", 3.0, 1000.0, 1000),
    "flux": FamilySpec("flux", 0.3611, 0.1159, "flux", 1.15, 1.0, 10000),
    "flux-schnell": FamilySpec("flux-schnell", 0.3611, 0.1159, "discrete_flow", 1.0, 1.0, 1000),
}


def family_spec(family: str) -> FamilySpec:
    try:
        return FAMILIES[family]
    except KeyError:
        raise InvalidRequest(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})") from None


def sampling_family(family: str, guidance_embeds: bool = True) -> str:
    """The sampling family of a loaded model: a FLUX without guidance embedding samples as schnell."""
    if family == "flux" and not guidance_embeds:
        return "flux-schnell"
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
