"""Fixtures made with ComfyUI's own classes (a helper run by ComfyUI's python, not a test).

    python comfyui_tools.py COMFYUI_DIR taesd OUT_DIR

writes random-weight tiny autoencoders (TAESD layout, 16 latent channels) as
``taesd3_{encoder,decoder}.safetensors`` and ``taef1_{encoder,decoder}.safetensors``, so the stock
VAELoader offers "taesd3" and "taef1" and VAEDecode turns the tests' latents into images.
"""
from __future__ import annotations

import os
import sys


def taesd(out_dir: str) -> None:
    import torch
    from safetensors.torch import save_file

    from comfy.taesd.taesd import TAESD

    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    model = TAESD(latent_channels=16)
    # ComfyUI builds it without initialising the weights: give them seeded values of a sane scale, so that
    # encoding (VAEEncode, InpaintModelConditioning) gives finite latents too
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) * (fan_in ** -0.5 if p.ndim > 1 else 0.01))
    for name in ("taesd3", "taef1"):
        for part in ("encoder", "decoder"):
            module = getattr(model, f"taesd_{part}")
            save_file({k: v.contiguous() for k, v in module.state_dict().items()},
                      os.path.join(out_dir, f"{name}_{part}.safetensors"))


def main() -> None:
    comfy_dir, command, *rest = sys.argv[1:]
    sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    if command == "taesd":
        taesd(*rest)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
