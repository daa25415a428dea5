"""Run ComfyUI's own Qwen-Image / Wan model classes on a single-file checkpoint (a helper, not a test).

Invoked by tests/test_families_comfyui.py with the python of a ComfyUI venv:

    python comfyui_family_reference.py COMFYUI_DIR CHECKPOINT INPUTS.safetensors OUTPUT.safetensors CONFIG_JSON

INPUTS holds x (5-D, as ComfyUI's samplers hand latents of these families over), sigma [B] and
context. The model sees ComfyUI's timestep of the family: Qwen-Image sigma (multiplier 1), Wan
sigma * 1000. ComfyUI's Wan is built with the shape ComfyUI's own detection reads from the file
(comfy.model_detection); Qwen-Image with the tiny config's numbers (its detection reads only the
input channels and depth and fixes the rest at full size).
"""
from __future__ import annotations

import json
import sys


def main() -> None:
    comfy_dir, ckpt, inputs, output, config_json = sys.argv[1:6]
    sys.path.insert(0, comfy_dir)
    import torch
    from safetensors.torch import load_file, save_file

    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.ops

    cfg = json.loads(config_json)
    sd = load_file(ckpt)
    prefix = "model.diffusion_model."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    data = load_file(inputs)
    ops = comfy.ops.disable_weight_init
    if cfg["_class_name"] == "WanTransformer3DModel":
        import comfy.model_detection
        from comfy.ldm.wan.model import WanModel

        detected = comfy.model_detection.detect_unet_config(sd, "")
        kwargs = {k: v for k, v in detected.items() if k != "image_model"}
        model = WanModel(**kwargs, operations=ops, dtype=torch.float32)
        timestep = data["sigma"] * 1000.0
        print(json.dumps({"detected": {k: (list(v) if isinstance(v, tuple) else v) for k, v in detected.items()}}))
    else:
        from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

        model = QwenImageTransformer2DModel(
            patch_size=2, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
            num_layers=cfg["num_layers"], attention_head_dim=cfg["attention_head_dim"],
            num_attention_heads=cfg["num_attention_heads"], joint_attention_dim=cfg["joint_attention_dim"],
            axes_dims_rope=tuple(cfg["axes_dims_rope"]), operations=ops, dtype=torch.float32)
        timestep = data["sigma"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rope" not in k and "pe_embedder" not in k]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    with torch.no_grad():
        out = model(data["x"], timestep, data["context"])
    save_file({"out": out.float().contiguous()}, output)


if __name__ == "__main__":
    main()
