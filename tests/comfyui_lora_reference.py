"""ComfyUI's own FLUX model, weight dtype and LoRA code on a tiny checkpoint (a helper, not a test).

Invoked by tests/test_comfyui_lora.py with the python of a ComfyUI venv:

    python comfyui_lora_reference.py COMFYUI_DIR CHECKPOINT INPUTS OUTPUT CONFIG_JSON WEIGHT_DTYPE [LORA STRENGTH]...

Builds ComfyUI's model_base.Flux through its supported-model config (as UNETLoader does once a
checkpoint is detected; the tiny width is given explicitly because ComfyUI's FLUX detection fixes
it at 3072), in ``WEIGHT_DTYPE`` (fp32 or fp8_e4m3fn / fp8_e5m2, computed in fp32 like ComfyUI on a
CPU), loads the weights with ComfyUI's loader, patches the LoRAs with ComfyUI's LoRA loader
(comfy.sd.load_lora_for_models, as LoraLoaderModelOnly does) and runs the diffusion model once.
"""
from __future__ import annotations

import json
import sys


def main() -> None:
    comfy_dir, ckpt, inputs, output, config_json, weight_dtype = sys.argv[1:7]
    loras = list(zip(sys.argv[7::2], map(float, sys.argv[8::2])))
    sys.path.insert(0, comfy_dir)
    import torch
    from safetensors.torch import load_file, save_file

    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before model_management probes for a GPU
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    cfg = json.loads(config_json)
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    unet_config = {"image_model": "flux", "in_channels": cfg["in_channels"] // 4, "patch_size": 2,
                   "out_channels": cfg["out_channels"] // 4, "vec_in_dim": cfg["pooled_projection_dim"],
                   "context_in_dim": cfg["joint_attention_dim"], "hidden_size": hidden, "mlp_ratio": 4.0,
                   "num_heads": cfg["num_attention_heads"], "depth": cfg["num_layers"],
                   "depth_single_blocks": cfg["num_single_layers"], "axes_dim": list(cfg["axes_dims_rope"]),
                   "theta": 10000, "qkv_bias": True, "guidance_embed": cfg["guidance_embeds"]}
    model_config = comfy.supported_models.Flux(unet_config)
    dtype = {"fp32": torch.float32, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[weight_dtype]
    model_config.set_inference_dtype(dtype, None if dtype == torch.float32 else torch.float32)
    sd = load_file(ckpt)
    model = model_config.get_model(sd, "model.diffusion_model.")
    model.load_model_weights(sd, "model.diffusion_model.")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    for path, strength in loras:
        patcher, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(path), strength, 0)
    with torch.no_grad():  # ComfyUI patches and samples under inference mode
        patcher.patch_model()
    data = load_file(inputs)
    with torch.no_grad():
        out = patcher.model.diffusion_model(data["x"], data["sigma"], data["context"], y=data["pooled"],
                                            guidance=data.get("guidance"))
    save_file({"out": out.float().contiguous()}, output)


if __name__ == "__main__":
    main()
