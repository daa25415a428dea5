"""LoRA and fp8 against ComfyUI itself.

- FLUX: the DiT output of a tiny FLUX with LoRA stacks (every key format) and with fp8 weights,
  against ComfyUI's own Flux model built through its supported-model config, its weight-dtype
  handling and its LoRA loader (tests/comfyui_lora_reference.py), rel err <= 1e-4.
- SD3, end to end in a real ComfyUI: the stock UNETLoader + two LoraLoaderModelOnly (0.8, -0.4) +
  KSampler against TetriServe Load DiT + two TetriServe LoRA + TetriServe Sampler at degree 1 and
  2, rel err <= 1e-3; the same with weight_dtype fp8_e4m3fn on both sides (without LoRA: ComfyUI
  merges a LoRA into fp8 weights and rounds the sum back to fp8 stochastically, which no unfused
  application reproduces; that difference is measured and reported, not asserted).

Skipped unless TETRISERVE_COMFYUI and TETRISERVE_COMFYUI_PYTHON are set. Numbers go to
out/comfyui_lora.json.
"""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_tetriserve.worker.lora import LoraCache, applied
from comfy_tetriserve.worker.lora_files import write_random_lora
from comfy_tetriserve.worker.models import load_transformer
from comfy_tetriserve.worker.tiny import TINY_FLUX_CONFIG, tiny_state_dict, write_tiny_checkpoint
from comfyui_helpers import comfyui_paths, make_sandbox, start_comfyui
from nodes_helpers import ROOT, TESTS, start_service, stop
from test_models import inputs, run

pytestmark = [pytest.mark.comfyui]

REPORT: dict = {}
FLUX_TOL, E2E_TOL = 1e-4, 1e-3
FLUX_CASES = {  # name: (weight dtype, [(format, strength)])
    "lora_kohya_peft": ("fp32", [("kohya", 0.8), ("peft", -0.4)]),
    "lora_bfl_diff": ("fp32", [("bfl", 1.0), ("diff", 0.5)]),
    "fp8_e4m3fn": ("fp8_e4m3fn", []),
    "fp8_e5m2": ("fp8_e5m2", []),
}


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _write_report(name: str, values: dict) -> None:
    REPORT[name] = values
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    (out / "comfyui_lora.json").write_text(json.dumps(REPORT, indent=1) + "\n")


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    comfy_dir, comfy_python = comfyui_paths()
    d = tmp_path_factory.mktemp("comfy-flux-lora")
    _, sd = tiny_state_dict("flux", seed=0)
    ckpt = write_tiny_checkpoint("flux", "comfy", d / "flux", seed=0)
    loras = {fmt: write_random_lora("flux", sd, fmt, d / f"{fmt}.safetensors", seed=i + 1)
             for i, fmt in enumerate(("kohya", "peft", "bfl", "diff"))}
    data = inputs("flux")
    save_file(data, str(d / "inputs.safetensors"))
    return {"dir": d, "ckpt": ckpt, "loras": loras, "data": data, "comfy": (comfy_dir, comfy_python)}


def comfy_flux(f, weight_dtype: str, stack) -> torch.Tensor:
    out = f["dir"] / f"out-{weight_dtype}-{len(stack)}.safetensors"
    args = [str(f["comfy"][1]), str(TESTS / "comfyui_lora_reference.py"), str(f["comfy"][0]), str(f["ckpt"]),
            str(f["dir"] / "inputs.safetensors"), str(out), json.dumps(TINY_FLUX_CONFIG), weight_dtype]
    for fmt, s in stack:
        args += [str(f["loras"][fmt]), str(s)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out))["out"]


def ours_flux(f, weight_dtype: str, stack) -> torch.Tensor:
    model = load_transformer(str(f["ckpt"]), dtype=weight_dtype)
    cache = LoraCache()
    with applied(model.module, [(cache.get(model, str(f["loras"][fmt])), s) for fmt, s in stack]):
        return run(model, f["data"])


def test_flux_dit_against_comfyui_model_and_lora_code(flux_files):
    f = flux_files
    plain = ours_flux(f, "fp32", [])
    results = {}
    for name, (weight_dtype, stack) in FLUX_CASES.items():
        ref, ours = comfy_flux(f, weight_dtype, stack), ours_flux(f, weight_dtype, stack)
        results[name] = {"rel_err": rel(ours, ref), "effect_vs_plain_fp32": rel(ref, plain)}
    # reported only: ComfyUI merges the LoRA into the fp8 weights and rounds the sum to fp8
    stack = FLUX_CASES["lora_kohya_peft"][1]
    fp8_lora = rel(ours_flux(f, "fp8_e4m3fn", stack), comfy_flux(f, "fp8_e4m3fn", stack))
    results["fp8_e4m3fn+lora (not asserted)"] = {"rel_err": fp8_lora}
    _write_report("flux_dit", results)
    print("FLUX DiT vs ComfyUI:", json.dumps(results, indent=1))
    for name in FLUX_CASES:
        assert results[name]["effect_vs_plain_fp32"] > 1e-2, name  # the LoRA / fp8 change the output ...
        assert results[name]["rel_err"] <= FLUX_TOL, (name, results[name])  # ... as ComfyUI's own code does


# ----------------------------------------------------------------------- SD3 end to end
def node(cls: str, **kw) -> dict:
    return {"class_type": cls, "inputs": kw}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    from nodes_helpers import write_comfy_sd3
    from comfy_tetriserve.worker.tiny import TINY_SD3_CONFIG, random_model

    box = make_sandbox(tmp_path_factory.mktemp("comfyui-lora"))
    loras = box.root / "loras"
    config = dict(TINY_SD3_CONFIG, attention_head_dim=64, num_attention_heads=2, caption_projection_dim=128,
                  dual_attention_layers=[])
    sd = random_model(config, seed=3).state_dict()  # the weights of write_comfy_sd3's default seed
    write_random_lora("sd3", sd, "kohya", loras / "sd3_style.safetensors", seed=11)
    write_random_lora("sd3", sd, "bfl", loras / "sd3_detail.safetensors", seed=12, rank=8)
    write_comfy_sd3(box.models / "tiny_sd3_fp8.safetensors")  # the same weights, loaded as fp8 by name
    with open(box.yaml(), "a", encoding="utf-8") as fh:
        fh.write("    loras: loras\n")
    url, service = start_service(box.root, box.models, extra=("--lease-s", "60", "--lora-dir", str(loras)))
    comfy = None
    try:
        comfy = start_comfyui(box, url, "a")
        yield {"box": box, "url": url, "comfy": comfy}
    finally:
        if comfy:
            stop(comfy.proc)
        stop(service)


def latent_of(comfy, history: dict, node_id: str):
    item = history["outputs"][node_id]["latents"][0]
    return load_file(str(comfy.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]


@pytest.mark.slow
def test_sd3_lora_and_fp8_graph_against_stock_comfyui(e2e):
    comfy = e2e["comfy"]
    p = {
        "pos": node("TetriServeTestConditioning", text="a cat", tokens=8, context_dim=32, pooled_dim=16, seed=0),
        "neg": node("TetriServeTestConditioning", text="blurry", tokens=8, context_dim=32, pooled_dim=16, seed=0),
        "empty": node("EmptySD3LatentImage", width=128, height=96, batch_size=1),
        "unet": node("UNETLoader", unet_name="tiny_sd3.safetensors", weight_dtype="default"),
        "l1": node("LoraLoaderModelOnly", model=["unet", 0], lora_name="sd3_style.safetensors", strength_model=0.8),
        "l2": node("LoraLoaderModelOnly", model=["l1", 0], lora_name="sd3_detail.safetensors", strength_model=-0.4),
        "unet8": node("UNETLoader", unet_name="tiny_sd3_fp8.safetensors", weight_dtype="fp8_e4m3fn"),
        "u8l1": node("LoraLoaderModelOnly", model=["unet8", 0], lora_name="sd3_style.safetensors", strength_model=0.8),
        "u8l2": node("LoraLoaderModelOnly", model=["u8l1", 0], lora_name="sd3_detail.safetensors",
                     strength_model=-0.4),
        "dit": node("TetriServeLoadDiT", unet_name="tiny_sd3.safetensors", weight_dtype="fp32", shift=0.0),
        "t1": node("TetriServeLoRA", model=["dit", 0], lora_name="sd3_style.safetensors", strength_model=0.8),
        "t2": node("TetriServeLoRA", model=["t1", 0], lora_name="sd3_detail.safetensors", strength_model=-0.4),
        "dit8": node("TetriServeLoadDiT", unet_name="tiny_sd3_fp8.safetensors", weight_dtype="fp8_e4m3fn", shift=0.0),
        "t8l1": node("TetriServeLoRA", model=["dit8", 0], lora_name="sd3_style.safetensors", strength_model=0.8),
        "t8l2": node("TetriServeLoRA", model=["t8l1", 0], lora_name="sd3_detail.safetensors", strength_model=-0.4),
    }
    args = {"seed": 1234, "steps": 8, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0]}
    cases = {"plain": ("unet", "dit"), "lora": ("l2", "t2"), "fp8": ("unet8", "dit8"), "fp8_lora": ("u8l2", "t8l2")}
    for name, (stock, ours) in cases.items():
        p[f"ks_{name}"] = node("KSampler", model=[stock, 0], **args)
        p[f"save_ks_{name}"] = node("SaveLatent", samples=[f"ks_{name}", 0], filename_prefix=f"ks_{name}")
        for k in (1, 2):
            p[f"ts{k}_{name}"] = node("TetriServeSampler", model=[ours, 0], deadline_s=0.0, priority=k, **args)
            p[f"save_ts{k}_{name}"] = node("SaveLatent", samples=[f"ts{k}_{name}", 0], filename_prefix=f"ts{k}_{name}")
    history = comfy.history(comfy.post(p), timeout_s=600)
    assert history["status"]["status_str"] == "success", json.dumps(history["status"])[-3000:]
    stock = {name: latent_of(comfy, history, f"save_ks_{name}") for name in cases}
    results = {f"{name}@degree{k}": rel(latent_of(comfy, history, f"save_ts{k}_{name}"), stock[name])
               for name in cases for k in (1, 2)}
    results["lora_effect"] = rel(stock["lora"], stock["plain"])
    results["fp8_effect"] = rel(stock["fp8"], stock["plain"])
    _write_report("sd3_e2e", results)
    print("SD3 graph vs stock ComfyUI:", json.dumps(results, indent=1))
    assert results["lora_effect"] > 1e-2 and results["fp8_effect"] > 1e-3
    for name in ("plain", "lora", "fp8"):
        for k in (1, 2):
            assert results[f"{name}@degree{k}"] <= E2E_TOL, (name, k, results)
