"""Run ComfyUI's own FLUX / MMDiT implementation on a single-file checkpoint (a helper, not a test).

Invoked by tests/test_convert.py with the python of a ComfyUI venv:

    python comfyui_dit_reference.py COMFYUI_DIR CHECKPOINT INPUTS.safetensors OUTPUT.safetensors CONFIG_JSON

INPUTS holds x [B, C, H, W], sigma [B], context, pooled (and guidance for FLUX); the config is the
diffusers config our converter inferred, turned here into ComfyUI's constructor arguments. The
model sees ComfyUI's timestep for the family (FLUX: sigma, SD3: sigma * 1000), as BaseModel does.
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

    comfy.cli_args.args.cpu = True  # before model_management probes for a GPU
    import comfy.ops

    cfg = json.loads(config_json)
    sd = load_file(ckpt)
    prefix = "model.diffusion_model."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    data = load_file(inputs)
    ops = comfy.ops.disable_weight_init
    if cfg["_class_name"] == "FluxTransformer2DModel":
        from comfy.ldm.flux.model import Flux

        hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        model = Flux(in_channels=cfg["in_channels"] // 4, out_channels=cfg["out_channels"] // 4,
                     vec_in_dim=cfg["pooled_projection_dim"], context_in_dim=cfg["joint_attention_dim"],
                     hidden_size=hidden, mlp_ratio=4.0, num_heads=cfg["num_attention_heads"],
                     depth=cfg["num_layers"], depth_single_blocks=cfg["num_single_layers"],
                     axes_dim=list(cfg["axes_dims_rope"]), theta=10000, patch_size=2, qkv_bias=True,
                     guidance_embed=cfg["guidance_embeds"], operations=ops)
        model.load_state_dict(sd, strict=True)
        with torch.no_grad():
            out = model(data["x"], data["sigma"], data["context"], y=data["pooled"], guidance=data.get("guidance"))
    else:
        from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

        depth = cfg["num_attention_heads"]  # MMDiT: hidden = 64 * depth, heads = depth
        model = MMDiT(patch_size=cfg["patch_size"], in_channels=cfg["in_channels"], depth=depth,
                      num_blocks=cfg["num_layers"], adm_in_channels=cfg["pooled_projection_dim"],
                      context_embedder_config={"target": "torch.nn.Linear",
                                               "params": {"in_features": cfg["joint_attention_dim"],
                                                          "out_features": 64 * depth}},
                      out_channels=cfg["out_channels"], pos_embed_max_size=cfg["pos_embed_max_size"],
                      num_patches=cfg["pos_embed_max_size"] ** 2,
                      qk_norm="rms" if cfg.get("qk_norm") else None,
                      x_block_self_attn_layers=list(cfg.get("dual_attention_layers") or []),
                      operations=ops)
        model.load_state_dict(sd, strict=True)
        with torch.no_grad():
            out = model(data["x"], data["sigma"] * 1000.0, y=data["pooled"], context=data["context"])
    save_file({"out": out.float().contiguous()}, output)


if __name__ == "__main__":
    main()
