"""Noise schedules of the flow-matching DiTs, computed the way ComfyUI computes them.

A model family fixes the latent format and ComfyUI's *model sampling* object: a table of
``num_sampling_steps`` ascending sigmas plus the sigma <-> timestep maps. Schedulers turn that
object into ``steps + 1`` descending sigmas (ending at 0). Every number here is reproduced
exactly, including float32 rounding, so a request sampled here matches one sampled in ComfyUI:

- SD3 (ComfyUI ``ModelSamplingDiscreteFlow``, shift 3.0, multiplier 1000, 1000 entries):
  ``sigma(t) = shift * t / (1 + (shift - 1) * t)``, timestep = sigma * 1000.
- FLUX-dev (``ModelSamplingFlux``, shift 1.15, 10000 entries):
  ``sigma(t) = e^shift / (e^shift + 1/t - 1)``, timestep = sigma. The ModelSamplingFlux node
  replaces the shift by a resolution-dependent one: see ``flux_resolution_shift``.
- FLUX-schnell (a checkpoint without the guidance embedding): ``ModelSamplingDiscreteFlow`` with
  shift 1.0 and multiplier 1.0 (1000 entries), timestep = sigma.

``compute_sigmas`` applies KSampler's ``denoise`` rule; ``slice_sigmas`` its start/last-step
rule (KSamplerAdvanced); ``validate_sigmas`` checks sigmas a client sends.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InvalidRequest
from .names import SCHEDULER_NAMES, FAMILIES, FamilySpec, family_spec, flux_resolution_shift, sampling_family  # noqa: F401 (re-exported)


def _time_snr_shift(alpha: float, t: torch.Tensor) -> torch.Tensor:
    if alpha == 1.0:
        return t
    return alpha * t / (1 + (alpha - 1) * t)


def _flux_time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def sigma_of_t(spec: FamilySpec, t: torch.Tensor, shift: float | None = None) -> torch.Tensor:
    """sigma for a normalised time t in (0, 1]."""
    s = spec.shift if shift is None else shift
    if spec.sampling == "discrete_flow":
        return _time_snr_shift(s, t)
    return _flux_time_shift(s, t)


@dataclass(frozen=True, eq=False)
class ModelSampling:
    """ComfyUI's model-sampling object of one family and shift: the table and sigma <-> timestep."""

    spec: FamilySpec
    shift: float
    sigmas: torch.Tensor  # ascending, float32, num_sampling_steps entries

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.spec.sampling == "discrete_flow":
            return sigma * self.spec.multiplier
        return sigma

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        if self.spec.sampling == "discrete_flow":
            return _time_snr_shift(self.shift, timestep / self.spec.multiplier)
        return _flux_time_shift(self.shift, timestep)


def model_sampling(family: str, shift: float | None = None) -> ModelSampling:
    spec = family_spec(family)
    s = spec.shift if shift is None else float(shift)
    if not (math.isfinite(s) and s >= 0.0):
        raise InvalidRequest(f"shift must be a finite number >= 0, got {shift!r}")
    n = spec.num_sampling_steps
    t = torch.arange(1, n + 1, 1) / n
    if spec.sampling == "discrete_flow":
        # the table goes through the timestep scale and back, as ComfyUI builds it
        table = _time_snr_shift(s, (t * spec.multiplier) / spec.multiplier)
    else:
        table = _flux_time_shift(s, t)
    return ModelSampling(spec, s, table)


def model_sigmas(family: str, shift: float | None = None) -> torch.Tensor:
    """The model-sampling sigma table (ascending), as ComfyUI registers it."""
    return model_sampling(family, shift).sigmas


def timestep_of_sigma(family: str, sigma: torch.Tensor) -> torch.Tensor:
    """The timestep ComfyUI feeds its model (SD3: sigma * 1000; FLUX: sigma)."""
    return sigma * family_spec(family).multiplier


# ---------------------------------------------------------------- schedulers: (ms, steps) -> sigmas

def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def simple_sigmas(table: torch.Tensor, steps: int) -> torch.Tensor:
    """Evenly strided entries of the table, from the top."""
    step_span = len(table) / steps
    sigs = [float(table[-(1 + int(x * step_span))]) for x in range(steps)]
    sigs.append(0.0)
    return torch.FloatTensor(sigs)


def _simple(ms: ModelSampling, steps: int) -> torch.Tensor:
    return simple_sigmas(ms.sigmas, steps)


def _normal(ms: ModelSampling, steps: int, sgm: bool = False) -> torch.Tensor:
    start, end = ms.timestep(ms.sigma_max), ms.timestep(ms.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(ms.sigma(ts)) for ts in timesteps]
    if append_zero:
        sigs.append(0.0)
    return torch.FloatTensor(sigs)


def _sgm_uniform(ms: ModelSampling, steps: int) -> torch.Tensor:
    return _normal(ms, steps, sgm=True)


def _karras(ms: ModelSampling, steps: int, rho: float = 7.0) -> torch.Tensor:
    sigma_min, sigma_max = float(ms.sigma_min), float(ms.sigma_max)
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def _exponential(ms: ModelSampling, steps: int) -> torch.Tensor:
    sigma_min, sigma_max = float(ms.sigma_min), float(ms.sigma_max)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp())


def _ddim_uniform(ms: ModelSampling, steps: int) -> torch.Tensor:
    table = ms.sigmas
    if math.isclose(float(table[1]), 0, abs_tol=0.00001):
        steps += 1
        sigs: list[float] = []
    else:
        sigs = [0.0]
    stride = max(len(table) // steps, 1)
    sigs += [float(table[x]) for x in range(1, len(table), stride)]
    return torch.FloatTensor(sigs[::-1])


def beta_sigmas(ms: ModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Table entries at the quantiles of a Beta(alpha, beta) distribution (repeats dropped)."""
    import numpy
    try:
        from scipy.stats import beta as beta_dist
    except ImportError as e:  # pragma: no cover - scipy is a dependency
        raise InvalidRequest("the beta scheduler needs scipy") from e
    last = len(ms.sigmas) - 1
    quantiles = 1 - numpy.linspace(0, 1, steps, endpoint=False)
    indices = numpy.rint(beta_dist.ppf(quantiles, alpha, beta) * last)
    sigs: list[float] = []
    previous = -1
    for t in indices:
        if t != previous:
            sigs.append(float(ms.sigmas[int(t)]))
        previous = t
    sigs.append(0.0)
    return torch.FloatTensor(sigs)


def _linear_quadratic(ms: ModelSampling, steps: int, threshold_noise: float = 0.025) -> torch.Tensor:
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        linear_steps = steps // 2
        linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quad_coef = step_diff / (linear_steps * quadratic_steps ** 2)
        lin_coef = threshold_noise / linear_steps - 2 * step_diff / (quadratic_steps ** 2)
        const = quad_coef * (linear_steps ** 2)
        quadratic = [quad_coef * (i ** 2) + lin_coef * i + const for i in range(linear_steps, steps)]
        schedule = [1.0 - v for v in linear + quadratic + [1.0]]
    return torch.FloatTensor(schedule) * ms.sigma_max.cpu()


def _kl_optimal(ms: ModelSampling, steps: int) -> torch.Tensor:
    sigma_min, sigma_max = float(ms.sigma_min), float(ms.sigma_max)
    frac = torch.arange(steps, dtype=torch.float).div_(steps - 1)  # one step: 0/0, refused later
    sigmas = frac.new_zeros(steps + 1)
    sigmas[:-1] = (frac * math.atan(sigma_min) + (1 - frac) * math.atan(sigma_max)).tan_()
    return sigmas


#: scheduler name -> fn(model_sampling, steps) -> descending sigmas; ComfyUI's names and order
SCHEDULERS: dict[str, Callable[[ModelSampling, int], torch.Tensor]] = {
    "simple": _simple,
    "sgm_uniform": _sgm_uniform,
    "karras": _karras,
    "exponential": _exponential,
    "ddim_uniform": _ddim_uniform,
    "beta": beta_sigmas,
    "normal": _normal,
    "linear_quadratic": _linear_quadratic,
    "kl_optimal": _kl_optimal,
}


def compute_sigmas(family: str, scheduler: str, steps: int, denoise: float = 1.0,
                   shift: float | None = None) -> torch.Tensor:
    """Sigmas for ``steps`` steps, as ComfyUI's KSampler computes them.

    ``denoise`` > 0.9999 is a full schedule; otherwise the schedule of ``int(steps / denoise)``
    steps is computed and its last ``steps + 1`` sigmas kept. (ComfyUI returns the input latent
    unchanged for ``denoise`` <= 0; here that is an error.) ``shift`` overrides the family's
    default (the ModelSamplingSD3 / ModelSamplingFlux nodes). A few schedulers may return another
    number of steps than asked, exactly as in ComfyUI (ddim_uniform's stride, beta's repeats).
    """
    if scheduler not in SCHEDULERS:
        raise InvalidRequest(f"unknown scheduler {scheduler!r} (known: {', '.join(SCHEDULERS)})")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidRequest(f"steps must be an integer >= 1, got {steps!r}")
    if not (isinstance(denoise, (int, float)) and 0.0 < denoise <= 1.0):
        raise InvalidRequest(f"denoise must be in (0, 1], got {denoise!r}")
    ms = model_sampling(family, shift)
    if denoise > 0.9999:
        sigmas = SCHEDULERS[scheduler](ms, steps)
    else:
        sigmas = SCHEDULERS[scheduler](ms, int(steps / denoise))[-(steps + 1):]
    if not bool(torch.isfinite(sigmas).all()):
        raise InvalidRequest(f"scheduler {scheduler!r} gives no finite schedule for {steps} steps")
    return sigmas


def slice_sigmas(sigmas: torch.Tensor, start_step: int | None = None, last_step: int | None = None,
                 force_full_denoise: bool = False) -> torch.Tensor | None:
    """KSamplerAdvanced's step window: keep sigmas[start_step : last_step + 1].

    With ``force_full_denoise`` a window that ends early ends at sigma 0. ``None`` means ComfyUI
    skips sampling and returns the input latent unchanged (start_step at or past the end).
    """
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[:last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step < len(sigmas) - 1:
            sigmas = sigmas[start_step:]
        else:
            return None
    return sigmas


def validate_sigmas(sigmas: object) -> torch.Tensor:
    """Check sigmas a client gives (1-D, >= 2 entries, finite, >= 0, non-increasing, 0 only at the
    end, last < 1) and return them as a float tensor, values untouched."""
    if not isinstance(sigmas, torch.Tensor):
        try:
            sigmas = torch.tensor(sigmas, dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise InvalidRequest(f"sigmas must be a list of numbers: {e}") from None
    if not sigmas.is_floating_point():
        sigmas = sigmas.to(torch.float32)
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise InvalidRequest(f"sigmas must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}")
    if not bool(torch.isfinite(sigmas).all()):
        raise InvalidRequest("sigmas must be finite")
    if bool((sigmas < 0).any()):
        raise InvalidRequest("sigmas must be >= 0")
    if bool((sigmas[1:] > sigmas[:-1]).any()):
        raise InvalidRequest("sigmas must be non-increasing")
    if bool((sigmas[:-1] == 0).any()):
        raise InvalidRequest("only the last sigma may be 0")
    if float(sigmas[-1]) >= 1.0:
        raise InvalidRequest("the last sigma must be < 1 (flow models divide by 1 - sigma)")
    return sigmas


assert tuple(SCHEDULERS) == SCHEDULER_NAMES, "names.SCHEDULER_NAMES must list the schedulers in order"
