"""Measure per-job LoRA stacks and quantised weights on CPU workers (docs/engine.md, LoRA and quantisation).

1. LoRA: one worker pool (``--devices``, default cpu:1) loads a small FLUX-architecture model once;
   then rounds of four jobs run back to back on it: no LoRA and three different stacks (order
   rotated per round). Per stack: the median (and least) step time over the steps after each job's
   first (the first step of the first job with a file also reads it), against the modelled time
   ``no-LoRA step x (1 + low-rank MACs / model MACs)``.
   The pool loads the model once (its load count is printed) and the base weights are never touched.
2. Memory: bytes of the tiny FLUX model's Linear weights held as fp8, GGUF Q8_0 and Q4_0, relative
   to bf16.

    python scripts/lora_quant_measure.py [--devices cpu:1] [--steps 5] [--rounds 3] [--threads 1] [--cpu-only] [--json FILE]

The in-process part measures the same stacks by thread CPU time (robust on a machine other
processes share, where wall times move by tens of percent).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from comfy_tetriserve.core.executor import SamplingJob
from comfy_tetriserve.types import Assignment
from comfy_tetriserve.worker.convert import FLUX_CLASS, flux_rope_axes, from_diffusers
from comfy_tetriserve.worker.lora import LoraCache, lowrank_flops_per_token, targets_of_model
from comfy_tetriserve.worker.lora_files import write_random_lora
from comfy_tetriserve.worker.models import load_transformer
from comfy_tetriserve.worker.quant import linear_weight_bytes, write_quantized_checkpoint
from comfy_tetriserve.worker.samplers import compute_sigmas, prepare_noise
from comfy_tetriserve.worker.tiny import random_model, write_tiny_checkpoint

SMALL_FLUX = {"_class_name": FLUX_CLASS, "patch_size": 1, "in_channels": 64, "out_channels": 64, "num_layers": 2,
              "num_single_layers": 4, "attention_head_dim": 64, "num_attention_heads": 8,
              "joint_attention_dim": 256, "pooled_projection_dim": 128, "guidance_embeds": True,
              "axes_dims_rope": list(flux_rope_axes(64))}
LATENT = 48  # 48 x 48 latent: 384 px, 576 image tokens
TEXT_TOKENS = 64
STACKS = {"no LoRA": [], "A (rank 16)": [("a", 1.0)], "B (rank 32)": [("b", 0.8)],
          "A + C (16 + 16)": [("a", 0.5), ("c", -0.7)]}  # the first is the baseline


def model_macs_per_step(model, tokens: int) -> float:
    """Multiply-adds of one forward: every Linear on every token, plus attention (QK^T and AV)."""
    linear = sum(m.in_features * m.out_features for m in model.module.modules() if hasattr(m, "in_features"))
    hidden = model.num_heads * int(model.config["attention_head_dim"])
    return linear * tokens + 2 * tokens * tokens * hidden * model.num_attention_layers()


def job(rid: str, stack, files: dict) -> SamplingJob:
    g = torch.Generator().manual_seed(0)
    latent = torch.zeros(1, 16, LATENT, LATENT)
    return SamplingJob(request_id=rid, model="small-flux", latent=latent, noise=prepare_noise(latent, 0),
                       sigmas=compute_sigmas("flux", "simple", ARGS.steps),
                       context=torch.randn(1, TEXT_TOKENS, SMALL_FLUX["joint_attention_dim"], generator=g),
                       pooled=torch.randn(1, SMALL_FLUX["pooled_projection_dim"], generator=g), guidance=3.5,
                       loras=tuple((str(files[k]), s) for k, s in stack))


async def measure_lora(workdir: Path) -> dict:
    from comfy_tetriserve.worker.pool import WorkerPool

    module = random_model(SMALL_FLUX, seed=0)
    sd = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    from safetensors.torch import save_file

    path = workdir / "small-flux.safetensors"
    save_file(from_diffusers("flux", sd, "comfy"), str(path))
    files = {"a": write_random_lora("flux", sd, "kohya", workdir / "a.safetensors", rank=16, seed=1),
             "b": write_random_lora("flux", sd, "peft", workdir / "b.safetensors", rank=32, seed=2),
             "c": write_random_lora("flux", sd, "bfl", workdir / "c.safetensors", rank=16, seed=3)}
    local = load_transformer(str(path), dtype="fp32")
    cache = LoraCache()
    tokens = LATENT // 2 * LATENT // 2 + TEXT_TOKENS
    base_macs = model_macs_per_step(local, tokens)
    pool = WorkerPool(ARGS.devices, num_threads=ARGS.threads)
    await pool.start()
    rows = []
    try:
        await pool.load_model("small-flux", str(path), "fp32")
        group = next(g for g in pool.groups if len(g) == 1)
        # Rounds of the four jobs back to back, the order rotated each round, so that load from other
        # processes on the machine falls on every stack alike; the first round also reads the files.
        steps: dict[str, list[float]] = {label: [] for label in STACKS}
        first: dict[str, float] = {}
        labels = list(STACKS)
        for rnd in range(ARGS.rounds):
            for i, label in enumerate(labels[rnd % len(labels):] + labels[:rnd % len(labels)]):
                j = job(f"r{rnd}-job{i}", STACKS[label], files)
                await pool.admit(j)
                result = await pool.execute(Assignment((j.request_id,), group, ARGS.steps))
                await pool.release(j.request_id)
                if result.error:
                    raise RuntimeError(result.error)
                first.setdefault(label, result.step_times_s[0])
                steps[label].extend(result.step_times_s[1:])
        loads = len(pool.models())
    finally:
        await pool.close()
    for label, stack in STACKS.items():
        lowrank = lowrank_flops_per_token([(cache.get(local, str(files[k])), s) for k, s in stack]) * tokens
        rows.append({"job": label, "step_s": statistics.median(steps[label]), "min_step_s": min(steps[label]),
                     "first_step_s": first[label], "lowrank_macs_ratio": lowrank / base_macs,
                     "num_steps": len(steps[label])})
    base, base_min = rows[0]["step_s"], rows[0]["min_step_s"]
    for r in rows:
        r["modelled_s"] = base * (1 + r["lowrank_macs_ratio"])
        r["measured_over_modelled"] = r["step_s"] / r["modelled_s"]
        r["min_over_modelled"] = r["min_step_s"] / (base_min * (1 + r["lowrank_macs_ratio"]))
    return {"model": "small FLUX (2 double + 4 single blocks, 8 heads x 64)", "tokens": tokens,
            "model_gmacs_per_step": base_macs / 1e9, "models_loaded": loads,
            "lora_targets": len(targets_of_model(local).shapes), "jobs": rows}


def measure_cpu_time(workdir: Path) -> dict:
    """The same stacks in this process, one thread: the CPU time of one model evaluation
    (``time.thread_time``, which time spent waiting for a core does not count), rounds interleaved."""
    from comfy_tetriserve.worker.models import LoadedModel

    torch.set_num_threads(1)
    module = random_model(SMALL_FLUX, seed=0)
    sd = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    model = LoadedModel("small-flux", "flux", dict(SMALL_FLUX), module, torch.float32, torch.device("cpu"), "random")
    files = {"a": write_random_lora("flux", sd, "kohya", workdir / "a.safetensors", rank=16, seed=1),
             "b": write_random_lora("flux", sd, "peft", workdir / "b.safetensors", rank=32, seed=2),
             "c": write_random_lora("flux", sd, "bfl", workdir / "c.safetensors", rank=16, seed=3)}
    cache = LoraCache()
    j = job("cpu", [], files)
    x = j.noise * j.sigmas[0]
    tokens = LATENT // 2 * LATENT // 2 + TEXT_TOKENS
    base_macs = model_macs_per_step(model, tokens)
    times: dict[str, list[float]] = {label: [] for label in STACKS}
    from comfy_tetriserve.worker.lora import applied

    for _ in range(ARGS.rounds + 1):
        for label, stack in STACKS.items():
            combined = cache.combined(model, tuple((str(files[k]), s) for k, s in stack)) if stack else {}
            with torch.inference_mode(), applied(model.module, combined):
                t0 = time.thread_time()
                model.forward(x, j.sigmas[:1], j.context, j.pooled, torch.tensor([3.5]))
                times[label].append(time.thread_time() - t0)
    rows = []
    for label, stack in STACKS.items():
        lowrank = lowrank_flops_per_token([(cache.get(model, str(files[k])), s) for k, s in stack]) * tokens
        rows.append({"job": label, "cpu_s": statistics.median(times[label][1:]), "lowrank_macs_ratio": lowrank / base_macs})
    for r in rows:
        r["modelled_s"] = rows[0]["cpu_s"] * (1 + r["lowrank_macs_ratio"])
        r["measured_over_modelled"] = r["cpu_s"] / r["modelled_s"]
    return {"rows": rows, "rounds": ARGS.rounds}


def measure_memory(workdir: Path) -> dict:
    path = write_tiny_checkpoint("flux", "bfl", workdir / "tiny-flux")
    bf16 = linear_weight_bytes(load_transformer(str(path), dtype="bf16").module)
    out = {"bf16_bytes": bf16, "fp8": linear_weight_bytes(load_transformer(str(path), dtype="fp8_e4m3fn").module) / bf16}
    for q in ("Q8_0", "Q4_0"):
        gguf = write_quantized_checkpoint("flux", f"gguf:{q}", workdir / q)
        out[q] = linear_weight_bytes(load_transformer(str(gguf), dtype="bf16").module) / bf16
    return out


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="lora-quant-") as d:
        report = {"lora": asyncio.run(measure_lora(Path(d))) if not ARGS.cpu_only else None,
                  "cpu_time": measure_cpu_time(Path(d)), "memory": measure_memory(Path(d)),
                  "devices": ARGS.devices, "steps": ARGS.steps, "rounds": ARGS.rounds, "worker_threads": ARGS.threads, "torch_threads": torch.get_num_threads()}
    print(f"one model evaluation, CPU time of this process's thread ({ARGS.rounds} rounds, median):")
    for r in report["cpu_time"]["rows"]:
        print(f"  {r['job']:16s} {r['cpu_s'] * 1e3:8.1f} ms  low-rank MACs {r['lowrank_macs_ratio'] * 100:5.2f}%  "
              f"modelled {r['modelled_s'] * 1e3:8.1f} ms  measured/modelled {r['measured_over_modelled']:.3f}")
    lora = report["lora"] or {"model": "(pool part skipped)", "tokens": 0, "model_gmacs_per_step": 0,
                              "models_loaded": 0, "jobs": []}
    print(f"{lora['model']}, {lora['tokens']} tokens, {lora['model_gmacs_per_step']:.2f} GMAC per step; "
          f"models loaded: {lora['models_loaded']} (once, shared by all jobs)")
    print(f"{'job':16s} {'median ms':>9s} {'min ms':>7s} {'1st step ms':>11s} {'low-rank MACs':>13s} "
          f"{'modelled ms':>11s} {'median/model':>12s} {'min/model':>9s}")
    for r in lora["jobs"]:
        print(f"{r['job']:16s} {r['step_s'] * 1e3:9.1f} {r['min_step_s'] * 1e3:7.1f} {r['first_step_s'] * 1e3:11.1f} "
              f"{r['lowrank_macs_ratio'] * 100:12.2f}% {r['modelled_s'] * 1e3:11.1f} {r['measured_over_modelled']:12.3f} "
              f"{r['min_over_modelled']:9.3f}")
    m = report["memory"]
    print(f"tiny FLUX Linear weights vs bf16 ({m['bf16_bytes']} bytes): fp8 {m['fp8']:.3f}x  Q8_0 {m['Q8_0']:.3f}x  "
          f"Q4_0 {m['Q4_0']:.3f}x")
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="cpu:1")
    parser.add_argument("--steps", type=int, default=5, help="steps per job (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the four jobs, order rotated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--cpu-only", action="store_true", help="only the in-process CPU-time part and memory")
    parser.add_argument("--json", default=None)
    ARGS = parser.parse_args()
    sys.exit(main())
