"""Jobs of the drills and their results computed directly: one device, in this process, no service.

``JobSpec`` describes a job deterministically from its index (model, size, steps, sampler, CFG,
seed); ``Reference.latent(spec)`` samples it with the same loader, the same settings parser and
resolution (``service.schemas``) and the same sampler code as the workers, one model evaluation
at a time on the CPU, and returns the latent in the space the service returns. A service result
that matches it to ``REL_TOL`` proves the job ran every step exactly once, in order, from the right
state, whatever happened to the workers on the way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

REL_TOL = 1e-5  # fp32; sequence-parallel steps differ from one-device steps by ~1e-7


@dataclass(frozen=True)
class JobSpec:
    """One drill job: tensors and settings are derived from ``index`` and ``seed`` alone."""

    index: int
    family: str  # "flux" | "sd3"
    model: str
    res: int
    steps: int
    seed: int
    sampler: str = "euler"
    cfg: float = 1.0
    tokens: int = 5
    image_to_image: bool = False
    context_dim: int = 32  # the tiny models' widths
    pooled_dim: int = 16
    extra: dict = field(default_factory=dict, compare=False)

    def tensors(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(10_000 + self.seed)
        side = self.res // 8
        latent = torch.randn(1, 16, side, side, generator=g) if self.image_to_image else torch.zeros(1, 16, side, side)
        out = {"latent": latent, "context": torch.randn(1, self.tokens, self.context_dim, generator=g),
               "pooled": torch.randn(1, self.pooled_dim, generator=g)}
        if self.cfg != 1.0:
            out["neg_context"] = torch.randn(1, max(self.tokens - 2, 1), self.context_dim, generator=g)
            out["neg_pooled"] = torch.randn(1, self.pooled_dim, generator=g)
        return out

    def settings(self) -> dict:
        s = {"model": self.model, "steps": self.steps, "seed": self.seed, "sampler": self.sampler}
        if self.image_to_image:
            s["denoise"] = 0.75
        if self.cfg != 1.0:
            s["cfg"] = self.cfg
        s.update(self.extra)
        return s

    def body(self, **more) -> bytes:
        from safetensors.torch import save

        return save({k: v.contiguous() for k, v in self.tensors().items()},
                    metadata={"tetriserve": json.dumps({**self.settings(), **more})})


def make_spec(index: int, models: dict[str, str], *, seed: int | None = None, steps: tuple[int, int] = (4, 10),
              resolutions: tuple[int, ...] = (32, 48, 64), dims: dict[str, tuple[int, int]] | None = None) -> JobSpec:
    """A varied job: FLUX and SD3 alternate; sizes, steps, samplers, CFG and image-to-image rotate.

    ``dims``: family -> (context width, pooled width) when the models are not the tiny ones.
    """
    family = "flux" if index % 2 == 0 else "sd3"
    lo, hi = steps
    cfg = 2.5 if family == "sd3" and index % 3 == 0 else 1.0
    sampler = ("euler", "euler_ancestral", "dpmpp_2m")[index % 3] if index % 4 else "euler"
    context_dim, pooled_dim = (dims or {}).get(family, (32, 16))
    return JobSpec(index=index, family=family, model=models[family], res=resolutions[index % len(resolutions)],
                   steps=lo + index % (hi - lo + 1), seed=index if seed is None else seed, sampler=sampler, cfg=cfg,
                   tokens=3 + index % 5, image_to_image=index % 5 == 4, context_dim=context_dim,
                   pooled_dim=pooled_dim)


class Reference:
    """Direct one-device sampling of drill jobs (see the module docstring)."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = dict(paths)  # model name -> checkpoint path
        self._models: dict[str, object] = {}

    def _model(self, name: str):
        if name not in self._models:
            from ..worker.models import load_transformer

            self._models[name] = load_transformer(self.paths[name], dtype="fp32", name=name)
        return self._models[name]

    @torch.inference_mode()
    def latent(self, spec: JobSpec) -> torch.Tensor:
        from ..worker import samplers
        from ..service.schemas import parse_settings, resolve_job
        from ..service.settings import ServiceConfig

        model = self._model(spec.model)
        info = model.info()
        job = resolve_job("reference", parse_settings(spec.settings(), ServiceConfig()), spec.tensors(), info)

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            sigma = sigma.reshape(-1).expand(b) if sigma.numel() == 1 else sigma.reshape(-1)
            g = torch.full((b,), job.guidance) if info.guidance_embeds else None
            den = []
            branches = [(job.context, job.pooled)] + ([(job.neg_context, job.neg_pooled)] if job.uses_cfg else [])
            for ctx, pooled in branches:
                out, _ = model.forward(x, sigma, ctx.expand(b, -1, -1), pooled.expand(b, -1), g)
                den.append(x - out * sigma.view(-1, 1, 1, 1))
            return samplers.cfg_combine(den[0], den[1], job.cfg) if job.uses_cfg else den[0]

        traj = samplers.start_trajectory(job.latent, job.noise, job.sigmas, job.sampler, job.seed)
        while not traj.done:
            traj = samplers.step(traj, denoise)
        return samplers.process_latent_out(spec.family, samplers.finish_latent(traj))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
