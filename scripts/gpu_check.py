#!/usr/bin/env python3
"""The engine's GPU check: real model sizes, random bf16 weights, one GPU, one command.

    python scripts/gpu_check.py                   # on a CUDA machine; writes $OUT/gpu_check.json
    python scripts/gpu_check.py --tiny --out DIR  # the same code path on CPU with tiny models

For FLUX-dev (19 + 38 blocks, 24 heads x 128) and SD3-medium (24 blocks, 24 heads x 64):

A. in this process, at 1024 px (FLUX 512 text tokens, SD3 333), batch 1: the median time of a bare
   diffusers forward (the model's own forward and attention processors) and of the engine's
   forward (our sharding-aware loop and attention processor, cuDNN attention first), same weights;
B. through a one-worker pool: the engine's per-step time at degree 1 (a whole sampler step as the
   worker runs it: forward, sampler arithmetic, stop flag, step report) -> ratio to A's bare forward
   (acceptance: <= 1.02 at 1024 px);
C. through a two-worker gloo pool on the same GPU: the same request sampled on one rank and on both
   ranks (Ulysses degree 2, collectives staged through host memory) at 1008 px (3969 image tokens:
   an uneven split) -> relative error of the final latents (acceptance: bf16 <= 1e-2).

D. in this process, at 256, 512 and 1024 px: the engine's forward eager and replayed from a CUDA
   graph (``worker.graphs.ModelForwards``; capture time included in the report) -> captured over
   eager (acceptance: <= 0.7 at 256-512 px) and the bf16 relative error of the captured output
   against the eager one (acceptance: <= 1e-2);
E. ``profile`` run by the engine itself (a one-worker pool, 256/512/1024 px, CUDA graphs on when
   D measured them faster) -> $OUT/profile-engine.json (to ship as profiles/h200-engine.json).

Phases run in that order while the time budget lasts (default 420 s); each phase's numbers are
written as soon as they exist, so a budget overrun still leaves a readable JSON. On CPU (``--tiny``)
D measures the eager forward only (capture needs CUDA) and E profiles at 64/128 px.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing the package

import torch  # noqa: E402

from comfy_tetriserve.worker.models import DEFAULT_TEXT_TOKENS, PRESETS, LoadedModel  # noqa: E402
from comfy_tetriserve.worker.tiny import random_model  # noqa: E402
from comfy_tetriserve.types import Assignment  # noqa: E402

REAL = {"flux": "flux-dev", "sd3": "sd3-medium"}
TINY = {"flux": "tiny-flux", "sd3": "tiny-sd3"}
RATIO_LIMIT = 1.02
REL_ERR_LIMIT = 1e-2
CAPTURED_LIMIT = 0.7  # captured / eager at 256-512 px


class Report:
    def __init__(self, path: Path, budget_s: float) -> None:
        self.path = path
        self.t0 = time.perf_counter()
        self.budget_s = budget_s
        self.data: dict = {"env": env_info(), "budget_s": budget_s}

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def put(self, *keys_and_value) -> None:
        *keys, last, value = keys_and_value
        d = self.data
        for k in keys:
            d = d.setdefault(k, {})
        d[last] = value
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n", encoding="utf-8")


def env_info() -> dict:
    import diffusers

    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def timed(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median seconds of ``fn()`` (synchronised on CUDA)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def inputs(family: str, config: dict, px: int, tokens: int, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    lat = px // 8
    x = torch.randn(1, 16, lat, lat, generator=g)
    return {"x": x.to(device), "sigma": torch.tensor([0.7], device=device),
            "context": torch.randn(1, tokens, config["joint_attention_dim"], generator=g).to(device, dtype),
            "pooled": torch.randn(1, config["pooled_projection_dim"], generator=g).to(device, dtype),
            "guidance": torch.tensor([3.5], device=device) if config.get("guidance_embeds") else None}


def bare_diffusers_call(family: str, module, inp: dict, dtype: torch.dtype):
    """A closure running the model's own diffusers forward on ``inp``."""
    x = inp["x"]
    b, c, h, w = x.shape
    if family == "flux":
        packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4).to(dtype)
        ids = torch.zeros(h // 2, w // 2, 3, device=x.device)
        ids[..., 1] = torch.arange(h // 2, device=x.device)[:, None]
        ids[..., 2] = torch.arange(w // 2, device=x.device)[None, :]
        kwargs = dict(hidden_states=packed, encoder_hidden_states=inp["context"], pooled_projections=inp["pooled"],
                      timestep=inp["sigma"], img_ids=ids.reshape(-1, 3),
                      txt_ids=torch.zeros(inp["context"].shape[1], 3, device=x.device), guidance=inp["guidance"],
                      return_dict=False)
    else:
        kwargs = dict(hidden_states=x.to(dtype), encoder_hidden_states=inp["context"],
                      pooled_projections=inp["pooled"], timestep=inp["sigma"] * 1000, return_dict=False)

    def call():
        with torch.inference_mode():
            return module(**kwargs)[0]
    return call


def phase_a(report: Report, family: str, preset: str, device: torch.device, dtype: torch.dtype, px: int,
            reps: int) -> None:
    config = dict(PRESETS[preset])
    tokens = DEFAULT_TEXT_TOKENS[family] if not preset.startswith("tiny") else 7
    module = random_model(config, seed=0, dtype=dtype, device=device)
    inp = inputs(family, config, px, tokens, device, dtype)
    bare = timed(bare_diffusers_call(family, module, inp, dtype), device, warmup=2, reps=reps)
    report.put(family, "bare_forward_ms", round(bare * 1e3, 3))
    model = LoadedModel(name=preset, family=family, config=config, module=module, dtype=dtype, device=device,
                        source=f"random:{preset}")

    def engine():
        with torch.inference_mode():
            return model.forward(inp["x"], inp["sigma"], inp["context"], inp["pooled"], inp["guidance"])[0]
    report.put(family, "engine_forward_ms", round(timed(engine, device, warmup=2, reps=reps) * 1e3, 3))
    report.put(family, "px", px)
    report.put(family, "text_tokens", tokens)


def job(rid: str, model: str, family: str, config: dict, px: int, tokens: int, steps: int):
    from comfy_tetriserve.core.executor import SamplingJob
    from comfy_tetriserve.worker.samplers import compute_sigmas, prepare_noise

    g = torch.Generator().manual_seed(1)
    lat = torch.zeros(1, 16, px // 8, px // 8)
    return SamplingJob(request_id=rid, model=model, latent=lat, noise=prepare_noise(lat, 0),
                       sigmas=compute_sigmas(family, "simple", steps),
                       context=torch.randn(1, tokens, config["joint_attention_dim"], generator=g),
                       pooled=torch.randn(1, config["pooled_projection_dim"], generator=g),
                       guidance=3.5 if config.get("guidance_embeds") else None)


async def phase_b(report: Report, presets: dict, device: str, dtype: str, px: int, steps: int) -> None:
    from comfy_tetriserve.worker.pool import WorkerPool

    pool = WorkerPool([device])
    t0 = time.perf_counter()
    await pool.start()
    report.put("pool_start_s", {"one_worker": round(time.perf_counter() - t0, 2)})
    try:
        for family, preset in presets.items():
            if report.left_s() < 30:
                report.put(family, "engine_step_ms", "skipped: time budget")
                continue
            await pool.load_model(preset, f"random:{preset}", dtype)
            config = PRESETS[preset]
            tokens = DEFAULT_TEXT_TOKENS[family] if not preset.startswith("tiny") else 7
            rid = f"b-{family}"
            await pool.admit(job(rid, preset, family, config, px, tokens, steps + 2))
            await pool.execute(Assignment((rid,), (0,), 2))  # warm-up
            result = await pool.execute(Assignment((rid,), (0,), steps))
            await pool.release(rid)
            if result.error:
                report.put(family, "engine_step_ms", f"error: {result.error}")
                continue
            step_s = statistics.median(result.step_times_s)
            report.put(family, "engine_step_ms", round(step_s * 1e3, 3))
            bare = report.data.get(family, {}).get("bare_forward_ms")
            if isinstance(bare, float):
                ratio = step_s * 1e3 / bare
                report.put(family, "step_over_bare_ratio", round(ratio, 4))
                # Judged at real size only: a tiny forward takes a few ms, so fixed costs dominate it.
                report.put(family, "ratio_ok", ratio <= RATIO_LIMIT if report.data["mode"] == "real-size" else None)
    finally:
        await pool.close()


async def phase_c(report: Report, presets: dict, device: str, dtype: str, px: int, steps: int) -> None:
    from comfy_tetriserve.worker.pool import WorkerPool

    pool = WorkerPool([device, device], backend="gloo")
    t0 = time.perf_counter()
    await pool.start()
    report.data.setdefault("pool_start_s", {})["two_workers_gloo"] = round(time.perf_counter() - t0, 2)
    try:
        for family, preset in presets.items():
            if report.left_s() < 45:
                report.put(family, "k2_gloo_rel_err", "skipped: time budget")
                continue
            await pool.load_model(preset, f"random:{preset}", dtype)
            config = PRESETS[preset]
            tokens = DEFAULT_TEXT_TOKENS[family] if not preset.startswith("tiny") else 7
            latents = {}
            for group in ((0,), (0, 1)):
                rid = f"c-{family}-{len(group)}"
                await pool.admit(job(rid, preset, family, config, px, tokens, steps))
                result = await pool.execute(Assignment((rid,), group, steps))
                if result.error:
                    raise RuntimeError(f"{rid}: {result.error}")
                latents[len(group)] = await pool.fetch_result(rid)
                report.put(family, f"k{len(group)}_gloo_step_ms", round(statistics.median(result.step_times_s) * 1e3, 3))
                await pool.release(rid)
            rel = float((latents[2] - latents[1]).norm() / latents[1].norm())
            report.put(family, "k2_gloo_px", px)
            report.put(family, "k2_gloo_steps", steps)
            report.put(family, "k2_gloo_rel_err", rel)
            report.put(family, "rel_err_ok", rel <= REL_ERR_LIMIT)
    finally:
        await pool.close()


def phase_d(report: Report, family: str, preset: str, device: torch.device, dtype: torch.dtype,
            sizes: tuple[int, ...], reps: int) -> None:
    from comfy_tetriserve.worker.graphs import ModelForwards

    config = dict(PRESETS[preset])
    tokens = DEFAULT_TEXT_TOKENS[family] if not preset.startswith("tiny") else 7
    model = LoadedModel(name=preset, family=family, config=config,
                        module=random_model(config, seed=0, dtype=dtype, device=device), dtype=dtype,
                        device=device, source=f"random:{preset}")
    forwards = ModelForwards(True, device)
    for px in sizes:
        if report.left_s() < 60:
            report.put(family, "graphs", str(px), "skipped: time budget")
            continue
        inp = inputs(family, config, px, tokens, device, dtype)
        args = (inp["x"], inp["sigma"], inp["context"], inp["pooled"], inp["guidance"])
        row: dict = {}
        with torch.inference_mode():
            row["eager_ms"] = round(timed(lambda: model.forward(*args), device, warmup=2, reps=reps) * 1e3, 3)
            if forwards.active:
                t0 = time.perf_counter()
                forwards(model, *args)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                row["first_call_with_capture_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
                row["captured_ms"] = round(timed(lambda: forwards(model, *args), device, warmup=1, reps=reps) * 1e3, 3)
                row["captured_over_eager"] = round(row["captured_ms"] / row["eager_ms"], 4)
                eager_out = model.forward(*args)[0]
                graph_out = forwards(model, *args)[0]
                row["bf16_rel_err_captured_vs_eager"] = float((graph_out - eager_out).norm() / eager_out.norm())
                row["rel_err_ok"] = row["bf16_rel_err_captured_vs_eager"] <= REL_ERR_LIMIT
                if px <= 512:
                    row["captured_ok"] = row["captured_over_eager"] <= CAPTURED_LIMIT
            else:
                row["captured_ms"] = "skipped: CUDA graphs need a CUDA device"
        report.put(family, "graphs", str(px), row)
    forwards.graphs.clear()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def graphs_faster(report: Report, families) -> bool:
    ratios = [row.get("captured_over_eager") for f in families
              for row in (report.data.get(f, {}).get("graphs") or {}).values() if isinstance(row, dict)]
    ratios = [r for r in ratios if isinstance(r, float)]
    return bool(ratios) and statistics.median(ratios) < 1.0


async def phase_e(report: Report, presets: dict, device: str, dtype: str, sizes: tuple[int, ...], out: Path) -> None:
    from comfy_tetriserve.cost import save_profile
    from comfy_tetriserve.worker.profile import ProfileSpec, profile

    graphs = graphs_faster(report, presets)
    spec = ProfileSpec(resolutions=tuple((px, px) for px in sizes), batches=(1,), degrees=(1,), steps=5, warmup=2,
                       cuda_graphs=graphs)
    t0 = time.perf_counter()
    table = await profile(device, {preset: f"random:{preset}" for preset in presets.values()}, dtype, spec)
    path = out / "profile-engine.json"
    save_profile(table, path)
    report.put("engine_profile", {"file": str(path), "cuda_graphs": graphs, "rows": len(table.rows),
                                  "seconds": round(time.perf_counter() - t0, 1),
                                  "step_ms": {f"{r.model}/{r.height}/k{r.sp_degree}": round(r.compute_s * 1e3, 3)
                                              for r in table.rows},
                                  "capture_steps": table.extra.get("capture_steps")})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (tests the script without a GPU)")
    parser.add_argument("--device", default=None, help="device (default: cuda:0, or cpu with --tiny)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "out", help="output folder (default: $OUT or ./out)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting phases after this (default: 420)")
    parser.add_argument("--families", nargs="+", default=["flux", "sd3"], choices=["flux", "sd3"])
    parser.add_argument("--reps", type=int, default=10, help="timed forwards in phase A (default: 10)")
    parser.add_argument("--steps", type=int, default=8, help="measured engine steps in phase B (default: 8)")
    parser.add_argument("--k2-steps", type=int, default=3, help="sampling steps compared in phase C (default: 3)")
    parser.add_argument("--no-profile", action="store_true", help="skip phase E (the engine-measured profile)")
    args = parser.parse_args()
    device = args.device or ("cpu" if args.tiny else "cuda:0")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny for the CPU variant", file=sys.stderr)
        return 2
    presets = {f: (TINY if args.tiny else REAL)[f] for f in args.families}
    px, px_c = (128, 112) if args.tiny else (1024, 1008)
    report = Report(Path(args.out) / "gpu_check.json", args.budget_s)
    report.put("mode", "tiny-cpu" if args.tiny else "real-size")
    report.put("dtype", "bf16")
    dt = torch.bfloat16
    for family, preset in presets.items():
        phase_a(report, family, preset, torch.device(device), dt, px, args.reps)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # the model died with phase_a's frame
    if report.left_s() > 60:
        asyncio.run(phase_b(report, presets, device, "bf16", px, args.steps))
    if report.left_s() > 60:
        asyncio.run(phase_c(report, presets, device, "bf16", px_c, args.k2_steps))
    sizes = (64, 128) if args.tiny else (256, 512, 1024)
    for family, preset in presets.items():
        if report.left_s() > 60:
            phase_d(report, family, preset, torch.device(device), dt, sizes, args.reps)
    if report.left_s() > 90 and not args.no_profile:
        asyncio.run(phase_e(report, presets, device, "bf16", sizes, Path(args.out)))
    wanted = ("ratio_ok", "rel_err_ok") if not args.tiny else ("rel_err_ok",)
    checks = [report.data.get(f, {}).get(k) for f in presets for k in wanted]
    checks += [row.get(k) for f in presets for row in (report.data.get(f, {}).get("graphs") or {}).values()
               if isinstance(row, dict) for k in ("rel_err_ok", "captured_ok") if k in row]
    report.put("all_ok", all(c is True for c in checks))
    print(json.dumps(report.data, indent=1))
    return 0 if report.data["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
