#!/usr/bin/env python3
"""Convert a measured per-rank step profile (rows of model/res/batch/degree/compute_ms) into the
project's profile-table format (comfy_tetriserve.cost, format comfy-tetriserve-profile/1).

This is how comfy_tetriserve/profiles/h200.json was made:

    python scripts/convert_step_profile.py h200_step_profile.json comfy_tetriserve/profiles/h200.json \
        --device "NVIDIA H200 (one GPU; per-rank compute of a Ulysses step)"

Rows are compute only (includes_comm false); the Ulysses all-to-all model (alpha per all-to-all,
bytes / beta per rank, 4 all-to-alls per attention layer) is stored beside them and added by the
cost model.
"""
from __future__ import annotations

import argparse
import json

from comfy_tetriserve.cost import CommModel, ModelProfile, ProfileRow, ProfileTable, save_profile

#: Architecture numbers of the profiled models (diffusers configs): heads, attention layers, hidden, text tokens.
MODELS = {
    "flux-dev": ModelProfile(num_heads=24, num_attention_layers=57, hidden_size=3072, num_text_tokens=512),
    "sd3-medium": ModelProfile(num_heads=24, num_attention_layers=24, hidden_size=1536, num_text_tokens=333),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("dest")
    ap.add_argument("--device", default="NVIDIA H200")
    ap.add_argument("--alpha-s", type=float, default=15e-6)
    ap.add_argument("--beta-bytes-per-s", type=float, default=300e9)
    args = ap.parse_args()
    with open(args.source, encoding="utf-8") as fh:
        src = json.load(fh)
    rows = tuple(
        ProfileRow(model=r["model"], height=r["res"], width=r["res"], batch=r["batch"], sp_degree=r["degree"],
                   compute_s=round(r["compute_ms"] / 1000.0, 7), includes_comm=False)
        for r in src["rows"]
    )
    how = (
        f"Converted from a measured step profile. Source method: {src['how']} "
        f"Communication is not in the rows ({src['not_included']}) The comm model below is that suggestion: "
        f"alpha {args.alpha_s * 1e6:g} us per all-to-all, beta {args.beta_bytes_per_s / 1e9:g} GB/s per rank."
    )
    table = ProfileTable(
        models={m: MODELS[m] for m in sorted({r.model for r in rows})},
        rows=rows,
        comm=CommModel(alpha_s=args.alpha_s, beta_bytes_per_s=args.beta_bytes_per_s, bytes_per_element=2),
        device=args.device,
        measured_on=src.get("measured_on", ""),
        how=how,
        extra={"source_what": src.get("what", ""), "image_tokens": src.get("image_tokens", "")},
    )
    save_profile(table, args.dest)
    print(f"wrote {len(rows)} rows for {', '.join(table.models)} to {args.dest}")


if __name__ == "__main__":
    main()
