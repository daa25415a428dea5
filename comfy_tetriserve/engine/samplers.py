"""Sampling with ComfyUI's semantics, resumable step by step.

A request's sampling state is a ``Trajectory``: the current latent, the sigmas, the next step
index and whatever memory the sampler keeps (the previous denoised estimate, an RNG state). The
workers run a few steps of it per round and may hand it to another device group in between;
running steps [0, a) and then [a, n) gives exactly the same latent as running [0, n) at once.

Definitions follow ComfyUI (comfy/model_sampling.py, comfy/samplers.py,
comfy/k_diffusion/sampling.py, comfy/sample.py): flow models (FLUX, SD3) use
``x = sigma * noise + (1 - sigma) * latent`` and ``denoised = x - model_output * sigma``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..errors import InvalidRequest

#: denoise_fn(x, sigma) -> denoised: the model (with CFG folded in) at noise level sigma
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FamilySpec:
    """Per model family: latent format and the model-sampling object ComfyUI builds for it."""

    name: str
    latent_scale: float  # process_in: (x - shift) * scale
    latent_shift: float
    sampling: str  # "discrete_flow" (SD3) | "flux"
    shift: float  # SD3: time-SNR shift alpha; FLUX: mu
    multiplier: float  # timestep = sigma * multiplier
    num_sampling_steps: int  # length of the model-sampling sigma table


FAMILIES: dict[str, FamilySpec] = {
    "sd3": FamilySpec("sd3", 1.5305, 0.0609, "discrete_flow", 3.0, 1000.0, 1000),
    "flux": FamilySpec("flux", 0.3611, 0.1159, "flux", 1.15, 1.0, 10000),
}


def family_spec(family: str) -> FamilySpec:
    try:
        return FAMILIES[family]
    except KeyError:
        raise InvalidRequest(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})") from None


def process_latent_in(family: str, latent: torch.Tensor) -> torch.Tensor:
    f = family_spec(family)
    return (latent - f.latent_shift) * f.latent_scale


def process_latent_out(family: str, latent: torch.Tensor) -> torch.Tensor:
    f = family_spec(family)
    return latent / f.latent_scale + f.latent_shift


def sigma_of_t(spec: FamilySpec, t: torch.Tensor, shift: float | None = None) -> torch.Tensor:
    """sigma for a normalised time t in (0, 1]."""
    s = spec.shift if shift is None else shift
    if spec.sampling == "discrete_flow":
        return t if s == 1.0 else s * t / (1 + (s - 1) * t)
    return math.exp(s) / (math.exp(s) + (1 / t - 1))


def model_sigmas(family: str, shift: float | None = None) -> torch.Tensor:
    """The model-sampling sigma table (ascending), as ComfyUI registers it."""
    spec = family_spec(family)
    n = spec.num_sampling_steps
    t = torch.arange(1, n + 1, 1) / n
    return sigma_of_t(spec, t, shift)


def timestep_of_sigma(family: str, sigma: torch.Tensor) -> torch.Tensor:
    return sigma * family_spec(family).multiplier


def simple_sigmas(table: torch.Tensor, steps: int) -> torch.Tensor:
    step_span = len(table) / steps
    sigs = [float(table[-(1 + int(x * step_span))]) for x in range(steps)]
    sigs.append(0.0)
    return torch.FloatTensor(sigs)


SCHEDULERS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "simple": simple_sigmas,
}


def compute_sigmas(family: str, scheduler: str, steps: int, denoise: float = 1.0,
                   shift: float | None = None) -> torch.Tensor:
    """Sigmas for ``steps`` steps, as ComfyUI's KSampler computes them (``denoise < 1`` keeps the tail)."""
    if scheduler not in SCHEDULERS:
        raise InvalidRequest(f"unknown scheduler {scheduler!r} (known: {', '.join(SCHEDULERS)})")
    if steps < 1:
        raise InvalidRequest("steps must be >= 1")
    if not 0.0 < denoise <= 1.0:
        raise InvalidRequest("denoise must be in (0, 1]")
    table = model_sigmas(family, shift)
    if denoise >= 0.9999:
        return SCHEDULERS[scheduler](table, steps)
    total = int(steps / denoise)
    return SCHEDULERS[scheduler](table, total)[-(steps + 1):]


def prepare_noise(latent: torch.Tensor, seed: int) -> torch.Tensor:
    """ComfyUI's initial noise: a CPU generator seeded with ``seed``, randn of the latent's shape."""
    generator = torch.manual_seed(seed)
    return torch.randn(latent.size(), dtype=latent.dtype, layout=latent.layout, generator=generator, device="cpu")


@dataclass(frozen=True)
class Trajectory:
    """One request's sampling state between steps; plain tensors, movable between devices."""

    x: torch.Tensor
    sigmas: torch.Tensor
    step_index: int
    sampler: str
    seed: int = 0
    memory: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return int(self.sigmas.numel()) - 1

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps

    def to(self, device: torch.device | str) -> "Trajectory":
        return replace(self, x=self.x.to(device), sigmas=self.sigmas.to(device),
                       memory={k: v.to(device) for k, v in self.memory.items()})


def start_trajectory(latent: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, sampler: str,
                     seed: int = 0) -> Trajectory:
    """Noise scaling at sigmas[0] (flow models), ready for step 0."""
    if sampler not in SAMPLERS:
        raise InvalidRequest(f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
    sigma0 = sigmas[0]
    x = sigma0 * noise + (1.0 - sigma0) * latent
    return Trajectory(x=x, sigmas=sigmas, step_index=0, sampler=sampler, seed=seed)


def _euler(traj: Trajectory, denoise_fn: DenoiseFn) -> Trajectory:
    i = traj.step_index
    sigma = traj.sigmas[i]
    s_in = traj.x.new_ones([traj.x.shape[0]])
    denoised = denoise_fn(traj.x, sigma * s_in)
    d = (traj.x - denoised) / sigma
    x = traj.x + d * (traj.sigmas[i + 1] - sigma)
    return replace(traj, x=x, step_index=i + 1)


SAMPLERS: dict[str, Callable[[Trajectory, DenoiseFn], Trajectory]] = {
    "euler": _euler,
}


def step(traj: Trajectory, denoise_fn: DenoiseFn) -> Trajectory:
    """Advance one sampler step (one or more model evaluations through ``denoise_fn``)."""
    if traj.done:
        raise InvalidRequest("trajectory already finished")
    return SAMPLERS[traj.sampler](traj, denoise_fn)


def finish_latent(traj: Trajectory) -> torch.Tensor:
    """The sampled latent in model space (inverse noise scaling at the last sigma)."""
    sigma = traj.sigmas[-1]
    return traj.x / (1.0 - sigma)


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, cfg: float) -> torch.Tensor:
    """ComfyUI's classifier-free guidance on denoised estimates."""
    return uncond + (cond - uncond) * cfg
