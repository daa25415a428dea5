"""``comfy-tetriserve selfcheck``: sequence-parallel sampling equals single-device sampling.

Builds tiny FLUX and SD3 models (random weights, written as single-file checkpoints in the BFL and
SD3 layouts and loaded through the real loaders), starts a worker pool, and samples the same
request several ways; each result is the relative error ``||out - ref|| / ||ref||`` of the final
latent against the whole trajectory on one device:

- ``k2``, ``k4``: every step on one group of 2 (4) devices;
- ``switching``: every step on a random allowed group (random degree and placement);
- ``handoff``: the latent moves mid-trajectory: a third on {0,1}, a third on {2,3} (no member
  holds it: the pool's checkpoint is sent), the rest on {0..3} (a member broadcasts it).

For FLUX two more checks run image-conditioned requests at degrees 2 and 4 (each value the
worst of the two): ``fill``, a tiny FLUX Fill checkpoint with the masked-image latent and a soft
mask as extra channels, and ``kontext``, two reference latents of odd sizes (5 x 6 and 4 x 5
tokens, the second padded) appended to the image tokens (offset method).

The latent is 14 x 18 (63 image tokens: odd, like 1008 px) with 7 text tokens, so every degree
splits tokens unevenly. FLUX runs with guidance; SD3 with CFG (cond and uncond in one batch).
Samplers that keep memory (the previous denoised, a generator state) are used when available,
so that memory travels with the latent.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..types import Assignment
from ..core.executor import SamplingJob
from .samplers import SAMPLERS, compute_sigmas, prepare_noise
from ..sampling.image_cond import fill_concat, reference_latents
from .tiny import TINY_CONFIGS, write_tiny_checkpoint

log = logging.getLogger(__name__)

LAYOUT = {"flux": "bfl", "sd3": "sd3_single"}
PREFERRED_SAMPLERS = {"flux": ("euler_ancestral", "euler"), "sd3": ("dpmpp_2m", "euler")}
TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 1e-2}


def sampler_for(family: str) -> str:
    return next(s for s in PREFERRED_SAMPLERS[family] if s in SAMPLERS)


def make_job(request_id: str, model: str, family: str, steps: int, seed: int = 0) -> SamplingJob:
    """A text-to-image request for a tiny model: 112 x 144 px, 7 text tokens."""
    cfg = TINY_CONFIGS[family]
    g = torch.Generator().manual_seed(seed + 1)
    latent = torch.zeros(1, 16, 14, 18)
    ctx_dim, pooled_dim = cfg["joint_attention_dim"], cfg["pooled_projection_dim"]
    uncond = family == "sd3"
    return SamplingJob(
        request_id=request_id, model=model, latent=latent, noise=prepare_noise(latent, seed),
        sigmas=compute_sigmas(family, "simple", steps), context=torch.randn(1, 7, ctx_dim, generator=g),
        pooled=torch.randn(1, pooled_dim, generator=g), sampler=sampler_for(family), seed=seed,
        cfg=4.5 if uncond else 1.0, guidance=3.5 if family == "flux" else None,
        neg_context=torch.randn(1, 7, ctx_dim, generator=g) if uncond else None,
        neg_pooled=torch.randn(1, pooled_dim, generator=g) if uncond else None,
    )


def image_conditioned(job: SamplingJob, kind: str, seed: int = 0) -> SamplingJob:
    """``job`` with FLUX Fill inputs (``kind="fill"``) or two Kontext reference latents (``"kontext"``)."""
    g = torch.Generator().manual_seed(seed + 7)
    b, c, h, w = job.latent.shape
    if kind == "fill":
        image = torch.randn(1, c, h, w, generator=g)
        rows = torch.linspace(0.0, 1.0, h * 8).view(-1, 1)
        mask = (rows * torch.ones(1, w * 8)).clamp(0, 1).view(1, 1, h * 8, w * 8)  # a soft top-to-bottom ramp
        return dataclasses.replace(job, concat=fill_concat("flux", image, mask, job.latent.shape))
    refs = (torch.randn(1, c, 10, 12, generator=g), torch.randn(1, c, 7, 9, generator=g))
    return dataclasses.replace(job, ref_latents=reference_latents("flux", refs, c), ref_method="offset")


async def _image_checks(pool, workdir: Path, degrees: tuple[int, ...], steps: int, seed: int,
                        dtype: str) -> dict[str, float]:
    """``fill`` and ``kontext``: the worst rel_err of degrees 2 and 4 against one device."""
    by_size: dict[int, tuple[int, ...]] = {}
    for g in pool.groups:
        by_size.setdefault(len(g), g)
    out: dict[str, float] = {}
    for kind in ("fill", "kontext"):
        if kind == "fill":
            name = "selfcheck-flux-fill"
            path = write_tiny_checkpoint("flux", LAYOUT["flux"], workdir / name, seed=seed, variant="fill")
            await pool.load_model(name, str(path), dtype)
        else:
            name = "selfcheck-flux"
        runs = {}
        for k in (1,) + tuple(d for d in (2, 4) if d in degrees and d in by_size):
            job = image_conditioned(make_job(f"{name}-{kind}-k{k}", name, "flux", steps, seed), kind, seed)
            runs[k] = await sample(pool, job, [(by_size[k], steps)])
        ref = runs.pop(1)
        if runs:
            out[kind] = max(float((o - ref).norm() / ref.norm()) for o in runs.values())
    return out


async def sample(pool, job: SamplingJob, schedule: list[tuple[tuple[int, ...], int]]) -> torch.Tensor:
    """Run ``job`` as the given (group, steps) assignments; returns the final latent."""
    await pool.admit(job)
    try:
        for group, steps in schedule:
            result = await pool.execute(Assignment((job.request_id,), group, steps))
            if result.error or result.steps_done != steps:
                raise RuntimeError(f"{job.request_id} on {group}: {result.error or result.steps_done}")
        return await pool.fetch_result(job.request_id)
    finally:
        await pool.release(job.request_id)


def schedules(groups, degrees: tuple[int, ...], steps: int, rng: random.Random) -> dict[str, list]:
    by_size: dict[int, list] = {}
    for g in groups:
        by_size.setdefault(len(g), []).append(g)
    out: dict[str, list] = {"ref": [(by_size[1][0], steps)]}
    for k in (2, 4):
        if k in by_size and k in degrees:
            out[f"k{k}"] = [(by_size[k][0], steps)]
    usable = [g for g in groups if len(g) in degrees]
    # Every degree at least once (in random order), then random groups of random degrees.
    picks = [rng.choice([g for g in usable if len(g) == k]) for k in rng.sample(degrees, len(degrees))]
    picks += [rng.choice(usable) for _ in range(steps - len(picks))]
    out["switching"] = [(g, 1) for g in picks[:steps]]
    if 2 in by_size and len(by_size[2]) >= 2 and 4 in by_size:
        a, b = steps // 3, steps // 3
        out["handoff"] = [(by_size[2][0], a), (by_size[2][1], b), (by_size[4][0], steps - a - b)]
    elif 2 in by_size:
        out["handoff"] = [(by_size[1][0], steps // 2), (by_size[2][0], steps - steps // 2)]
    return out


async def run_checks(pool, workdir: str | Path, *, steps: int = 6, seed: int = 0, dtype: str = "fp32",
                     families: tuple[str, ...] = ("flux", "sd3")) -> dict[str, dict[str, float]]:
    """The selfcheck on a started pool; returns {family: {check: rel_err}}."""
    from .models import allowed_degrees

    rng = random.Random(seed)
    report: dict[str, dict[str, float]] = {}
    for family in families:
        name = f"selfcheck-{family}"
        path = write_tiny_checkpoint(family, LAYOUT[family], Path(workdir) / name, seed=seed)
        info = await pool.load_model(name, str(path), dtype)
        degrees = allowed_degrees(info.num_heads, len(pool.gpu_ids))
        plans = schedules(pool.groups, degrees, steps, rng)
        latents = {}
        for check, plan in plans.items():
            latents[check] = await sample(pool, make_job(f"{name}-{check}", name, family, steps, seed), plan)
            log.info("%s %s: %s", family, check, [(g, n) for g, n in plan])
        ref = latents.pop("ref")
        report[family] = {check: float((out - ref).norm() / ref.norm()) for check, out in latents.items()}
        if family == "flux":
            report[family].update(await _image_checks(pool, Path(workdir), degrees, steps, seed, dtype))
    return report


async def selfcheck(devices: str, *, steps: int = 6, seed: int = 0, dtype: str = "fp32") -> dict:
    from .pool import WorkerPool

    pool = WorkerPool(devices)
    await pool.start()
    try:
        with tempfile.TemporaryDirectory(prefix="tetriserve-selfcheck-") as d:
            return await run_checks(pool, d, steps=steps, seed=seed, dtype=dtype)
    finally:
        await pool.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", default="cpu:4", help="worker devices: cpu:N, cuda:0-7, ... (default: cpu:4)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results to this JSON file")
    parser.add_argument("--steps", type=int, default=6, help="sampling steps per trajectory (default: 6)")
    parser.add_argument("--seed", type=int, default=0, help="weights, noise and group choice seed (default: 0)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(TOLERANCE), help="model dtype (default: fp32)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest acceptable rel_err (default: 1e-5 in fp32, 1e-2 in bf16/fp16)")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    report = asyncio.run(selfcheck(args.devices, steps=args.steps, seed=args.seed, dtype=args.dtype))
    elapsed = time.perf_counter() - t0
    tol = args.tolerance if args.tolerance is not None else TOLERANCE[args.dtype]
    ok = all(v <= tol for checks in report.values() for v in checks.values())
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    for family, checks in report.items():
        line = "  ".join(f"{k}={v:.2e}" for k, v in checks.items())
        print(f"{family:5s} ({sampler_for(family)}): {line}")
    verdict = "PASS" if ok else "FAIL"
    print(f"{verdict}: every rel_err <= {tol:g} on {args.devices} ({args.dtype}), {elapsed:.1f} s", file=sys.stderr)
    return 0 if ok else 1
