"""Sampling with ComfyUI's semantics, resumable step by step.

A request's sampling state is a ``Trajectory``: the current latent, the sigmas, the next step
index and whatever memory the sampler keeps (the previous denoised estimate, derivative history,
the state of its noise generator as a uint8 tensor). Workers run a few steps of it per round and
may hand it to another device group in between: running steps [0, a) and then [a, n) gives
bitwise the same latent as running [0, n) at once, also after pickling the trajectory or sending
its tensors elsewhere. Ranks that hold replicas of one trajectory draw identical noise.

Definitions follow ComfyUI (comfy/model_sampling.py, comfy/samplers.py,
comfy/k_diffusion/sampling.py, comfy/sample.py) for flow models (FLUX, SD3):

- the model sees ``x`` cast to its dtype and timestep ``timestep_of_sigma(family, sigma)``; its
  float32 output ``v`` gives ``denoised = x - v * sigma`` (``denoised_from_model_output``);
- sampling starts from ``x = sigma0 * noise + (1 - sigma0) * latent`` and ends with
  ``x / (1 - sigma_last)``; the latent is in model space (``prepare_latent``);
- initial noise: ``torch.manual_seed(seed)`` then CPU randn of the latent's shape; noise inside
  a stochastic sampler: a separate generator on the sampling device, seeded with the same seed
  when sampling starts (so on CPU its first draw equals the initial noise).

Schedules (``compute_sigmas`` and friends), latent formats and initial noise live in ..sampling and are
re-exported here.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch

from ..errors import InvalidRequest
from ..sampling.schedules import (  # re-exported: this module is the sampling API
    FAMILIES, SCHEDULERS, FamilySpec, ModelSampling, beta_sigmas, compute_sigmas, family_spec,
    flux_resolution_shift, model_sampling, model_sigmas, sampling_family, sigma_of_t,
    simple_sigmas, slice_sigmas, timestep_of_sigma, validate_sigmas,
)
from ..sampling.latents import (  # re-exported
    check_seed, fix_empty_latent_channels, prepare_latent, prepare_noise, process_latent_in, process_latent_out,
)
from ..sampling.names import SAMPLER_NAMES

__all__ = [
    # schedules
    "FAMILIES", "FamilySpec", "family_spec", "sampling_family", "ModelSampling", "model_sampling",
    "model_sigmas", "sigma_of_t", "timestep_of_sigma", "flux_resolution_shift", "SCHEDULERS",
    "simple_sigmas", "beta_sigmas", "compute_sigmas", "slice_sigmas", "validate_sigmas",
    # latent and model space
    "process_latent_in", "process_latent_out", "fix_empty_latent_channels", "prepare_latent",
    "prepare_noise", "check_seed", "noise_scaling", "inverse_noise_scaling", "max_denoise",
    "denoised_from_model_output", "cfg_skips_uncond", "cfg_combine",
    # trajectories
    "DenoiseFn", "RNG_KEY", "SAMPLER_OPTIONS", "SAMPLERS", "Trajectory", "start_trajectory", "step",
    "num_model_calls", "finish_latent",
]

#: denoise_fn(x, sigma) -> denoised: the model (with CFG folded in) at noise level sigma ([B])
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

RNG_KEY = "rng_state"  # memory entry holding the noise generator's state (CPU uint8)


def _sigma_view(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    if sigma.numel() == 1:
        return sigma.reshape(())
    return sigma.reshape(sigma.shape[:1] + (1,) * (ndim - 1))


def noise_scaling(sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """Flow models' noising: ``sigma * noise + (1 - sigma) * latent``."""
    sigma = _sigma_view(sigma, noise.dim())
    return sigma * noise + (1.0 - sigma) * latent


def inverse_noise_scaling(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Undo the flow scaling at the last sigma: ``x / (1 - sigma)`` (identity at sigma 0)."""
    return x / (1.0 - _sigma_view(sigma, x.dim()))


def max_denoise(family: str, sigmas: torch.Tensor, shift: float | None = None) -> bool:
    """ComfyUI's max_denoise flag (the first sigma reaches the model's sigma_max, rel tol 1e-5).
    Flow models' noise scaling ignores it; it is here for callers that report it."""
    top = float(model_sampling(family, shift).sigma_max)
    first = float(sigmas[0])
    return math.isclose(top, first, rel_tol=1e-05) or first > top


def denoised_from_model_output(x: torch.Tensor, model_output: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Flow models' denoised estimate from the raw model output (velocity): ``x - v * sigma``.
    ``x`` is the sampler's float32 latent (not the copy cast to the model's dtype), ``sigma`` a
    scalar or one per batch row (cond and uncond rows batched)."""
    return x - model_output.float() * _sigma_view(sigma, model_output.dim())


def cfg_skips_uncond(cfg: float) -> bool:
    """ComfyUI skips the uncond pass when cfg is 1 (math.isclose)."""
    return math.isclose(cfg, 1.0)


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor | None, cfg: float) -> torch.Tensor:
    """ComfyUI's classifier-free guidance on denoised estimates. A skipped uncond counts as zeros
    (ComfyUI's result is then ``cond * cfg``: exactly ``cond`` for cfg 1)."""
    if uncond is None:
        uncond = torch.zeros_like(cond)
    return uncond + (cond - uncond) * cfg


# ---------------------------------------------------------------- trajectory

#: per sampler: option -> default (ComfyUI's defaults for KSampler and the Sampler* nodes)
SAMPLER_OPTIONS: dict[str, dict[str, float]] = {
    "euler": {},
    "euler_ancestral": {"eta": 1.0, "s_noise": 1.0},
    "heun": {},
    "dpmpp_2m": {},
    "dpmpp_2s_ancestral": {"eta": 1.0, "s_noise": 1.0},
    "lcm": {},
    "ipndm": {},
    "gradient_estimation": {},
}
_IPNDM_MAX_ORDER = 4  # ComfyUI's default (no node changes it)
_GE_GAMMA = 2.0


@dataclass(frozen=True)
class Trajectory:
    """One request's sampling state between steps; plain tensors, movable between devices.

    ``noise_device`` is the device type of the sampler's noise generator ("cpu", "cuda"):
    None until a step first draws noise, then the type of the device that step ran on (ComfyUI
    seeds that generator on the sampling device). Its state is ``memory["rng_state"]``.
    """

    x: torch.Tensor
    sigmas: torch.Tensor
    step_index: int
    sampler: str
    seed: int = 0
    memory: dict[str, torch.Tensor] = field(default_factory=dict)
    options: Mapping[str, float] = field(default_factory=dict)
    noise_device: str | None = None
    #: the sigmas as Python floats, for the samplers' branches (a comparison of a device tensor would
    #: wait for the device every step); filled once from ``sigmas`` and carried along by ``replace``
    host_sigmas: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.host_sigmas) != self.sigmas.numel():
            object.__setattr__(self, "host_sigmas", tuple(self.sigmas.detach().double().cpu().tolist()))

    @property
    def num_steps(self) -> int:
        return int(self.sigmas.numel()) - 1

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps

    def option(self, name: str) -> float:
        return self.options.get(name, SAMPLER_OPTIONS[self.sampler][name])

    def to(self, device: torch.device | str) -> "Trajectory":
        memory = {k: v if k == RNG_KEY else v.to(device) for k, v in self.memory.items()}
        return replace(self, x=self.x.to(device), sigmas=self.sigmas.to(device), memory=memory)


def _check_options(sampler: str, options: Mapping[str, float] | None) -> dict[str, float]:
    known = SAMPLER_OPTIONS[sampler]
    out = {}
    for name, value in (options or {}).items():
        if name not in known:
            raise InvalidRequest(f"sampler {sampler!r} has no option {name!r} (options: {', '.join(known) or 'none'})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InvalidRequest(f"sampler option {name} must be a finite number >= 0, got {value!r}")
        out[name] = value
    return out


def start_trajectory(latent: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, sampler: str,
                     seed: int = 0, options: Mapping[str, float] | None = None,
                     noise_device: str | None = None) -> Trajectory:
    """Noise scaling at sigmas[0] (flow models), ready for step 0.

    ``latent`` is in model space (``prepare_latent``); ``seed`` seeds the sampler's own noise
    (ComfyUI passes the noise seed); ``options`` override SAMPLER_OPTIONS' defaults.
    ``noise_device`` pins the generator's device type ("cpu" gives the same noise on any
    hardware); None follows ComfyUI: the device the first noisy step runs on.
    """
    if sampler not in SAMPLERS:
        raise InvalidRequest(f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
    check_seed(seed)
    if noise.shape != latent.shape:
        raise InvalidRequest(f"noise shape {tuple(noise.shape)} differs from latent shape {tuple(latent.shape)}")
    opts = _check_options(sampler, options)
    validate_sigmas(sigmas)
    x = noise_scaling(sigmas[0], noise, latent)
    if noise_device is not None and noise_device not in ("cpu", "cuda", "mps", "xpu"):
        raise InvalidRequest(f"noise_device must be a device type such as 'cpu' or 'cuda', got {noise_device!r}")
    return Trajectory(x=x, sigmas=sigmas, step_index=0, sampler=sampler, seed=seed, options=opts,
                      noise_device=noise_device)


# ---------------------------------------------------------------- sampler steps

@dataclass
class _Step:
    """What one sampler step may use: the sigmas, the step index, the denoiser at a sigma, a
    noise draw of x's shape, the options, and the memory it reads and rewrites."""

    sigmas: torch.Tensor
    i: int
    model: Callable[[torch.Tensor, torch.Tensor | float], torch.Tensor]
    noise: Callable[[], torch.Tensor]
    option: Callable[[str], float]
    memory: dict[str, torch.Tensor]
    host: tuple[float, ...] = ()  # the sigmas on the host: branch on these, never on a device tensor

    @property
    def next_is_last(self) -> bool:
        """Whether this step ends at sigma 0."""
        return self.host[self.i + 1] == 0


def _euler(x: torch.Tensor, s: _Step) -> torch.Tensor:
    sigma = s.sigmas[s.i]
    denoised = s.model(x, sigma)
    d = (x - denoised) / sigma
    return x + d * (s.sigmas[s.i + 1] - sigma)


def _euler_ancestral(x: torch.Tensor, s: _Step) -> torch.Tensor:
    # the flow-model (CONST) form: step down to sigma_down, then re-noise to sigma_next
    sigma, sigma_next = s.sigmas[s.i], s.sigmas[s.i + 1]
    eta, s_noise = s.option("eta"), s.option("s_noise")
    denoised = s.model(x, sigma)
    if s.next_is_last:
        return denoised
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise = (sigma_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2) ** 0.5
    ratio = sigma_down / sigma
    x = ratio * x + (1 - ratio) * denoised
    if eta > 0:
        x = (alpha_next / alpha_down) * x + s.noise() * s_noise * renoise
    return x


def _heun(x: torch.Tensor, s: _Step) -> torch.Tensor:
    sigma, sigma_next = s.sigmas[s.i], s.sigmas[s.i + 1]
    denoised = s.model(x, sigma)
    d = (x - denoised) / sigma
    dt = sigma_next - sigma
    if s.next_is_last:
        return x + d * dt
    x_2 = x + d * dt
    d_2 = (x_2 - s.model(x_2, sigma_next)) / sigma_next
    return x + ((d + d_2) / 2) * dt


def _dpmpp_2m(x: torch.Tensor, s: _Step) -> torch.Tensor:
    sigma, sigma_next = s.sigmas[s.i], s.sigmas[s.i + 1]
    denoised = s.model(x, sigma)
    t, t_next = sigma.log().neg(), sigma_next.log().neg()
    h = t_next - t
    old = s.memory.get("old_denoised")
    if old is not None and not s.next_is_last:
        r = (t - s.sigmas[s.i - 1].log().neg()) / h
        denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
    else:
        denoised_d = denoised
    s.memory["old_denoised"] = denoised
    return (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised_d


def _dpmpp_2s_ancestral(x: torch.Tensor, s: _Step) -> torch.Tensor:
    # the flow-model (CONST) form: a midpoint evaluation in half-log-SNR, then re-noising
    sigma, sigma_next = s.sigmas[s.i], s.sigmas[s.i + 1]
    eta, s_noise = s.option("eta"), s.option("s_noise")
    denoised = s.model(x, sigma)
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise = (sigma_next ** 2 - sigma_down ** 2 * alpha_next ** 2 / alpha_down ** 2) ** 0.5
    if s.next_is_last:
        x = x + ((x - denoised) / sigma) * (sigma_down - sigma)
    else:
        if s.host[s.i] == 1.0:
            sigma_s = 0.9999
        else:
            lam, lam_down = ((1 - sigma) / sigma).log(), ((1 - sigma_down) / sigma_down).log()
            sigma_s = ((lam + (1 / 2) * (lam_down - lam)).exp() + 1) ** -1
        ratio_s = sigma_s / sigma
        d_mid = s.model(ratio_s * x + (1 - ratio_s) * denoised, sigma_s)
        ratio = sigma_down / sigma
        x = ratio * x + (1 - ratio) * d_mid
    if s.host[s.i + 1] > 0 and eta > 0:
        x = (alpha_next / alpha_down) * x + s.noise() * s_noise * renoise
    return x


def _lcm(x: torch.Tensor, s: _Step) -> torch.Tensor:
    sigma_next = s.sigmas[s.i + 1]
    x = s.model(x, s.sigmas[s.i])
    if s.host[s.i + 1] > 0:
        x = noise_scaling(sigma_next, s.noise(), x)
    return x


#: order -> (weights of d, d_1, d_2, ...; divisor) of the multistep update
_IPNDM_COEFFS = {2: ((3, -1), 2), 3: ((23, -16, 5), 12), 4: ((55, -59, 37, -9), 24)}


def _ipndm(x: torch.Tensor, s: _Step) -> torch.Tensor:
    sigma, sigma_next = s.sigmas[s.i], s.sigmas[s.i + 1]
    max_order = _IPNDM_MAX_ORDER
    denoised = s.model(x, sigma)
    d = (x - denoised) / sigma
    history = [s.memory[f"d_{k}"] for k in range(1, max_order) if f"d_{k}" in s.memory]  # newest first
    order = min(max_order, s.i + 1, len(history) + 1)
    if s.next_is_last:
        x_next = denoised
    elif order == 1:
        x_next = x + (sigma_next - sigma) * d
    else:
        weights, divisor = _IPNDM_COEFFS[order]
        combo = weights[0] * d
        for w, h in zip(weights[1:], history):
            combo = combo + w * h
        x_next = x + (sigma_next - sigma) * combo / divisor
    for k, h in enumerate([d] + history[:max_order - 2], start=1):
        s.memory[f"d_{k}"] = h
    return x_next


def _gradient_estimation(x: torch.Tensor, s: _Step) -> torch.Tensor:
    sigma, sigma_next = s.sigmas[s.i], s.sigmas[s.i + 1]
    denoised = s.model(x, sigma)
    d = (x - denoised) / sigma
    dt = sigma_next - sigma
    old_d = s.memory.get("old_d")
    s.memory["old_d"] = d
    if s.next_is_last:
        return denoised
    x = x + d * dt
    if old_d is not None and s.i >= 1:
        x = x + ((_GE_GAMMA - 1) * (d - old_d)) * dt
    return x


_STEP_FNS: dict[str, Callable[[torch.Tensor, _Step], torch.Tensor]] = {
    "euler": _euler,
    "euler_ancestral": _euler_ancestral,
    "heun": _heun,
    "dpmpp_2m": _dpmpp_2m,
    "dpmpp_2s_ancestral": _dpmpp_2s_ancestral,
    "lcm": _lcm,
    "ipndm": _ipndm,
    "gradient_estimation": _gradient_estimation,
}
assert tuple(_STEP_FNS) == SAMPLER_NAMES, "sampling/names.py must list exactly the samplers implemented here"

_TWO_CALL_SAMPLERS = ("heun", "dpmpp_2s_ancestral")  # a second model call except on the last step


def num_model_calls(sampler: str, sigmas: torch.Tensor, start: int = 0, stop: int | None = None) -> int:
    """Denoiser evaluations of steps [start, stop) (what a step costs relative to euler)."""
    if sampler not in SAMPLERS:
        raise InvalidRequest(f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
    stop = len(sigmas) - 1 if stop is None else stop
    if sampler not in _TWO_CALL_SAMPLERS:
        return stop - start
    return sum(2 if float(sigmas[i + 1]) != 0 else 1 for i in range(start, stop))


def _draw_noise(traj: Trajectory, state: torch.Tensor | None, kind: str | None,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, str]:
    """One randn of x's shape from the trajectory's generator at ``state`` (None: freshly seeded
    with the trajectory's seed); returns (noise, new state, generator device type)."""
    kind = kind or device.type
    if kind == device.type:
        gen_device = device
    elif kind == "cpu":
        gen_device = torch.device("cpu")
    else:
        raise InvalidRequest(f"this trajectory's noise comes from a {kind} generator; step it on a {kind} device")
    generator = torch.Generator(device=gen_device)
    if state is None:
        generator.manual_seed(traj.seed)
    else:
        generator.set_state(state.cpu())
    noise = torch.randn(traj.x.size(), dtype=traj.x.dtype, layout=traj.x.layout, device=gen_device,
                        generator=generator)
    return noise.to(device), generator.get_state(), kind


def _advance(traj: Trajectory, denoise_fn: DenoiseFn) -> Trajectory:
    x = traj.x
    state, kind = traj.memory.get(RNG_KEY), traj.noise_device

    def noise() -> torch.Tensor:
        nonlocal state, kind
        n, state, kind = _draw_noise(traj, state, kind, x.device)
        return n

    memory = {k: v for k, v in traj.memory.items() if k != RNG_KEY}
    s_in = x.new_ones([x.shape[0]])
    ctx = _Step(traj.sigmas, traj.step_index, lambda v, sigma: denoise_fn(v, sigma * s_in), noise, traj.option,
                memory, traj.host_sigmas)
    x_new = _STEP_FNS[traj.sampler](x, ctx)
    if state is not None:
        ctx.memory[RNG_KEY] = state
    return replace(traj, x=x_new, step_index=traj.step_index + 1, memory=ctx.memory, noise_device=kind)


#: sampler name -> fn(trajectory, denoise_fn) -> trajectory one step further
SAMPLERS: dict[str, Callable[[Trajectory, DenoiseFn], Trajectory]] = {name: _advance for name in _STEP_FNS}


def step(traj: Trajectory, denoise_fn: DenoiseFn) -> Trajectory:
    """Advance one sampler step (one or more model evaluations through ``denoise_fn``).

    Several trajectories step together in the worker (``runner.StepRunner``): each one's step
    runs here, and their model evaluations meet in one batched forward there."""
    if traj.done:
        raise InvalidRequest("trajectory already finished")
    return SAMPLERS[traj.sampler](traj, denoise_fn)


def finish_latent(traj: Trajectory) -> torch.Tensor:
    """The sampled latent in model space (inverse noise scaling at the last sigma); apply
    ``process_latent_out`` for ComfyUI's LATENT."""
    return inverse_noise_scaling(traj.sigmas[-1], traj.x)
