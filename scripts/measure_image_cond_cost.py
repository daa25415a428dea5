"""Per-forward cost of FLUX Kontext references and Fill channels, side by side in one run.

    python scripts/measure_image_cond_cost.py [--model random:tiny-flux] [--size 64] [--repeats 15]

Times one forward (median of interleaved repeats, CPU or the model's device) of: a plain latent of
S x S; the same with a reference latent of S x S appended (Kontext: twice the image tokens); a
plain latent of S x 2S (the same token count, what the planner prices the Kontext job as); and the
S x S latent with FLUX Fill's 80 extra channels (a model whose patch embedding takes 384 inputs).
Prints JSON with the times and the ratios kontext / plain-2x and fill / plain.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from comfy_tetriserve.worker.models import PRESETS, load_transformer
from comfy_tetriserve.worker.tiny import TINY_FLUX_FILL_CONFIG


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:tiny-flux")
    ap.add_argument("--size", type=int, default=64, help="latent side S (latent pixels)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_transformer(args.model, dtype=args.dtype, device="cpu")
    PRESETS["tiny-flux-fill"] = TINY_FLUX_FILL_CONFIG
    fill = load_transformer("random:tiny-flux-fill", dtype=args.dtype, device="cpu")
    s = args.size
    g = torch.Generator().manual_seed(0)
    ctx, pooled = torch.randn(1, 16, model.config["joint_attention_dim"], generator=g), torch.randn(1, 16, generator=g)
    sigma, guidance = torch.tensor([0.7]), torch.tensor([3.5])
    x, wide = torch.randn(1, 16, s, s, generator=g), torch.randn(1, 16, s, 2 * s, generator=g)
    ref, concat = torch.randn(1, 16, s, s, generator=g), torch.randn(1, 80, s, s, generator=g)
    cases = {
        "plain": lambda: model.forward(x, sigma, ctx, pooled, guidance),
        "kontext": lambda: model.forward(x, sigma, ctx, pooled, guidance, refs=(ref,)),
        "plain_2x": lambda: model.forward(wide, sigma, ctx, pooled, guidance),
        "fill": lambda: fill.forward(x, sigma, ctx, pooled, guidance, concat=concat),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for f in cases.values():
        f()  # warm-up
    for _ in range(args.repeats):
        for k, f in cases.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"size": s, "tokens": {"plain": (s // 2) ** 2, "kontext": 2 * (s // 2) ** 2},
                      "median_s": med, "kontext_over_plain_2x": med["kontext"] / med["plain_2x"],
                      "kontext_over_plain": med["kontext"] / med["plain"], "fill_over_plain": med["fill"] / med["plain"]},
                     indent=1))


if __name__ == "__main__":
    main()
