"""ComfyUI's own FLUX Fill / Kontext path on a single-file checkpoint (a helper, not a test).

Invoked by tests/test_image_cond.py with the python of a ComfyUI venv:

    python comfyui_flux_image_cond_reference.py COMFYUI_DIR CHECKPOINT INPUTS.safetensors OUTPUT.safetensors CONFIG_JSON

INPUTS holds x, sigma, context, pooled, guidance and optionally ``concat_latent_image`` (VAE space)
with ``concat_mask`` (pixels) as InpaintModelConditioning puts them in the CONDITIONING, and
``ref_0``, ``ref_1``, ... (VAE space) as ReferenceLatent does; the metadata key ``method`` names the
reference method. ComfyUI's BaseModel steps are taken with ComfyUI's code: the extra channels
come from ``comfy.model_base.Flux.concat_cond`` and are concatenated to the input, reference latents
go through the latent format's ``process_in``, and ``comfy.ldm.flux.model.Flux`` runs the forward.
"""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace


def main() -> None:
    comfy_dir, ckpt, inputs, output, config_json = sys.argv[1:6]
    sys.path.insert(0, comfy_dir)
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before model_management probes for a GPU
    import comfy.latent_formats
    import comfy.model_base
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    cfg = json.loads(config_json)
    sd = load_file(ckpt)
    prefix = "model.diffusion_model."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    data = load_file(inputs)
    with safe_open(inputs, framework="pt") as fh:
        method = (fh.metadata() or {}).get("method", "offset")
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    in_ch, out_ch = cfg["in_channels"] // 4, cfg["out_channels"] // 4
    model = Flux(in_channels=in_ch, out_channels=out_ch, vec_in_dim=cfg["pooled_projection_dim"],
                 context_in_dim=cfg["joint_attention_dim"], hidden_size=hidden, mlp_ratio=4.0,
                 num_heads=cfg["num_attention_heads"], depth=cfg["num_layers"],
                 depth_single_blocks=cfg["num_single_layers"], axes_dim=list(cfg["axes_dims_rope"]), theta=10000,
                 patch_size=2, qkv_bias=True, guidance_embed=cfg["guidance_embeds"],
                 operations=comfy.ops.disable_weight_init)
    model.load_state_dict(sd, strict=True)
    fmt = comfy.latent_formats.Flux()
    # The parts of comfy.model_base.Flux that concat_cond reads, around the real diffusion model.
    base = SimpleNamespace(diffusion_model=model, process_latent_in=fmt.process_in,
                           model_config=SimpleNamespace(unet_config={"in_channels": in_ch, "out_channels": out_ch}))
    x = data["x"]
    kwargs = {"noise": x, "device": torch.device("cpu")}
    if "concat_latent_image" in data:
        kwargs["concat_latent_image"] = data["concat_latent_image"]
        kwargs["concat_mask"] = data["concat_mask"]
    concat = comfy.model_base.Flux.concat_cond(base, **kwargs)
    xc = x if concat is None else torch.cat([x, concat], dim=1)
    import comfy.conds

    refs = [fmt.process_in(data[f"ref_{i}"]) for i in range(8) if f"ref_{i}" in data]
    if refs:  # as BaseModel does with the CONDList that extra_conds builds: repeated to the batch
        refs = comfy.conds.CONDList(refs).process_cond(x.shape[0]).cond
    extra = {"ref_latents_method": method} if refs else {}
    with torch.no_grad():
        out = model(xc, data["sigma"], data["context"], y=data["pooled"], guidance=data.get("guidance"),
                    ref_latents=refs or None, **extra)
    result = {"out": out.contiguous()}
    if concat is not None:
        result["concat"] = concat.contiguous()
    save_file(result, output)


if __name__ == "__main__":
    main()
