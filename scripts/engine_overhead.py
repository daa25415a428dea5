#!/usr/bin/env python3
"""The engine's degree-1 step against a bare diffusers forward of the same model and input.

    python scripts/engine_overhead.py [--px 512 256] [--reps 15] [--threads N] [--json FILE]

For the tiny FLUX and SD3 (worker/tiny.py; SD3's positional table widened to 32 patches so that
512 px fits), in one process and with one thread count for both:

- ``bare``: the model's own diffusers forward (its own attention processors) on the packed
  latent, FLUX's position ids and the conditioning, as a pipeline calls it;
- ``engine``: one whole sampler step as a worker runs it (``runner.StepRunner.step``: the
  denoiser, ``LoadedModel.forward`` with our processors, the euler update, the new trajectory);
- ``engine_cfg`` / ``bare_cfg``: the same with CFG where cond and uncond have different text
  lengths (bare: two forwards, as the model's own forward cannot batch them; the engine: its
  default for the device, on CPU one forward per text length); ``engine_cfg_one_forward``: the
  engine forced to one padded, masked forward (what it does on GPUs).

The two run alternately, rep by rep, so load from other processes hits both alike; the numbers
are medians. Ratios above 1 are the engine's overhead.

``--submit N``: event-loop time per submit of 4 MiB of conditioning (64 x 512 x 32 fp32) through a
two-worker CPU pool: CPU time of the loop's thread over ``admit`` and the first one-step assignment
on both workers (the conditioning reaching them), median of N; beside it what pickling the
tensors for each of the two workers on the loop (the previous way) costs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from comfy_tetriserve.worker.models import LoadedModel  # noqa: E402
from comfy_tetriserve.worker.runner import Conditioning, StepRunner  # noqa: E402
from comfy_tetriserve.worker.samplers import compute_sigmas, start_trajectory  # noqa: E402
from comfy_tetriserve.worker.tiny import TINY_FLUX_CONFIG, TINY_SD3_CONFIG, random_model  # noqa: E402

CONFIGS = {"flux": dict(TINY_FLUX_CONFIG), "sd3": {**TINY_SD3_CONFIG, "pos_embed_max_size": 32}}
TEXT_TOKENS = {"flux": 512, "sd3": 333}  # what the real pipelines feed
NEG_TOKENS = {"flux": 77, "sd3": 154}  # a different uncond length (CFG rows)


def bare_call(family: str, module, x, sigma, context, pooled, guidance):
    """The model's own forward, as a diffusers pipeline calls it (ids built per call, as there)."""
    b, c, h, w = x.shape
    if family == "flux":
        def call():
            packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
            ids = torch.zeros(h // 2, w // 2, 3)
            ids[..., 1] = torch.arange(h // 2)[:, None]
            ids[..., 2] = torch.arange(w // 2)[None, :]
            return module(hidden_states=packed, encoder_hidden_states=context, pooled_projections=pooled,
                          timestep=sigma, img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(context.shape[1], 3),
                          guidance=guidance, return_dict=False)[0]
    else:
        def call():
            return module(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                          timestep=sigma * 1000, return_dict=False)[0]
    return call


def measure(family: str, px: int, reps: int, warmup: int) -> dict:
    config = CONFIGS[family]
    module = random_model(config, seed=0)  # diffusers' own attention processors
    model = LoadedModel(name=f"tiny-{family}", family=family, config=config, module=random_model(config, seed=0),
                        dtype=torch.float32, device=torch.device("cpu"), source=f"random:tiny-{family}")
    g = torch.Generator().manual_seed(0)
    lat = px // 8
    noise = torch.randn(1, 16, lat, lat, generator=g)
    ctx = torch.randn(1, TEXT_TOKENS[family], config["joint_attention_dim"], generator=g)
    neg = torch.randn(1, NEG_TOKENS[family], config["joint_attention_dim"], generator=g)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=g)
    guidance = torch.tensor([3.5]) if config.get("guidance_embeds") else None
    sigmas = compute_sigmas(family, "simple", 1000)
    traj = start_trajectory(torch.zeros_like(noise), noise, sigmas, "euler")
    sigma = sigmas[:1]
    x = traj.x
    conds = {"plain": Conditioning("r", model.name, ctx, pooled, guidance=3.5),
             "cfg": Conditioning("r", model.name, ctx, pooled, cfg=4.0, guidance=3.5, neg_context=neg,
                                 neg_pooled=pooled)}
    runner = StepRunner(model, None)
    one_forward = StepRunner(model, None, max_pad_fraction=float("inf"))
    bare = bare_call(family, module, x, sigma, ctx, pooled, guidance)
    bare_neg = bare_call(family, module, x, sigma, neg, pooled, guidance)
    fns = {
        "bare": bare,
        "engine": lambda: runner.step([traj], [conds["plain"]], 0.0),
        "bare_cfg": lambda: (bare(), bare_neg()),
        "engine_cfg": lambda: runner.step([traj], [conds["cfg"]], 0.0),
        "engine_cfg_one_forward": lambda: one_forward.step([traj], [conds["cfg"]], 0.0),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for i in range(warmup + reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "px": px, "image_tokens": model.num_image_tokens(lat, lat), "text_tokens": TEXT_TOKENS[family],
        "neg_text_tokens": NEG_TOKENS[family],
        **{f"{k}_ms": round(v * 1e3, 3) for k, v in med.items()},
        "engine_over_bare": round(med["engine"] / med["bare"], 4),
        "engine_cfg_over_bare_cfg": round(med["engine_cfg"] / med["bare_cfg"], 4),
        "engine_cfg_one_forward_over_bare_cfg": round(med["engine_cfg_one_forward"] / med["bare_cfg"], 4),
    }


async def submit_loop_time(num: int) -> dict:
    import pickle

    from comfy_tetriserve.core.executor import SamplingJob
    from comfy_tetriserve.types import Assignment
    from comfy_tetriserve.worker.pool import WorkerPool, _conditioning
    from comfy_tetriserve.worker.samplers import prepare_noise

    pool = WorkerPool("cpu:2")
    await pool.start()
    try:
        await pool.load_model("flux", "random:tiny-flux", "fp32")
        g = torch.Generator().manual_seed(0)
        loop_s, pickled_s = [], []
        for i in range(num):
            lat = torch.zeros(64, 16, 4, 4)
            job = SamplingJob(request_id=f"s{i}", model="flux", latent=lat, noise=prepare_noise(lat, i),
                              sigmas=compute_sigmas("flux", "simple", 2),
                              context=torch.randn(64, 512, 32, generator=g), pooled=torch.randn(64, 16, generator=g),
                              guidance=3.5)
            t0 = time.thread_time()
            await pool.admit(job)
            t1 = time.thread_time()
            result = await pool.execute(Assignment((job.request_id,), (0, 1), 1))
            loop_s.append(t1 - t0 + time.thread_time() - t1)
            if result.error:
                raise RuntimeError(result.error)
            t0 = time.thread_time()
            for _ in range(2):
                pickle.dumps(("run", {"conds": {job.request_id: _conditioning(job)}}), protocol=pickle.HIGHEST_PROTOCOL)
            pickled_s.append(time.thread_time() - t0)
            await pool.release(job.request_id)
    finally:
        await pool.close()
    return {"conditioning_mib": 4.0 + 64 * 16 * 4 / 2**20, "submits": num,
            "loop_ms_per_submit": round(statistics.median(loop_s) * 1e3, 3),
            "loop_ms_max": round(max(loop_s) * 1e3, 3),
            "pickle_per_rank_on_loop_ms": round(statistics.median(pickled_s) * 1e3, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--px", type=int, nargs="+", default=[512, 256])
    parser.add_argument("--families", nargs="+", default=["flux", "sd3"], choices=sorted(CONFIGS))
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--submit", type=int, default=0, metavar="N",
                        help="also measure the event-loop time of N submits of 4 MiB conditioning (two CPU workers)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": []}
    for px in args.px if args.reps else ():
        for family in args.families:
            row = {"family": family, **measure(family, px, args.reps, args.warmup)}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.submit:
        import asyncio

        out["submit"] = asyncio.run(submit_loop_time(args.submit))
        print(json.dumps(out["submit"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
