"""Sampler-level parity for a tiny Wan through a real ComfyUI: the stock UNETLoader (ComfyUI
detects Wan's size from the file) + KSampler against TetriServe Load DiT + TetriServe Sampler on
the scheduler service, at degree 1 and 2, with ComfyUI's stock EmptyHunyuanLatentVideo latent.

Skipped unless TETRISERVE_COMFYUI / TETRISERVE_COMFYUI_PYTHON are set (see comfyui_helpers.py).
"""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from comfyui_helpers import make_sandbox, start_comfyui
from nodes_helpers import get_json, start_service, stop

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]
PARITY_TOL = 1e-3
CASES = {  # name: (sampler, scheduler, cfg)
    "t2v_euler_cfg": ("euler", "simple", 5.0),
    "t2v_dpmpp_2m_cfg1": ("dpmpp_2m", "simple", 1.0),
}


def node(cls: str, **inputs) -> dict:
    return {"class_type": cls, "inputs": inputs}


def test_tiny_wan_matches_stock_ksampler_at_degree_1_and_2(tmp_path):
    from comfy_tetriserve.worker.tiny import write_tiny_checkpoint

    box = make_sandbox(tmp_path / "comfyui")
    write_tiny_checkpoint("wan", "comfy", box.models / "tiny_wan.safetensors", seed=7)
    write_tiny_checkpoint("wan", "comfy", box.models / "tiny_wan_low.safetensors", seed=8)  # a second expert
    url, service = start_service(box.root, box.models, extra=("--lease-s", "3"))
    comfy = None
    try:
        comfy = start_comfyui(box, url, "a")
        cond = dict(tokens=8, context_dim=4096, pooled_dim=1, seed=0)
        p = {
            "unet": node("UNETLoader", unet_name="tiny_wan.safetensors", weight_dtype="default"),
            "dit": node("TetriServeLoadDiT", unet_name="tiny_wan.safetensors", weight_dtype="fp32", shift=0.0),
            "pos": node("TetriServeTestConditioning", text="a boat", **cond),
            "neg": node("TetriServeTestConditioning", text="static", **cond),
            # 112 x 80 px, 9 frames -> latent [1, 16, 3, 10, 14]: 105 tokens, odd, split unevenly
            "empty": node("EmptyHunyuanLatentVideo", width=112, height=80, length=9, batch_size=1),
        }
        for name, (sampler, scheduler, cfg) in CASES.items():
            args = dict(seed=77, steps=6, cfg=cfg, sampler_name=sampler, scheduler=scheduler, denoise=1.0,
                        positive=["pos", 0], negative=["neg", 0], latent_image=["empty", 0])
            p[f"ks_{name}"] = node("KSampler", model=["unet", 0], **args)
            p[f"save_ks_{name}"] = node("SaveLatent", samples=[f"ks_{name}", 0], filename_prefix=f"ks_{name}")
            for k in (1, 2):
                p[f"ts{k}_{name}"] = node("TetriServeSampler", model=["dit", 0], deadline_s=0.0, priority=k, **args)
                p[f"save_ts{k}_{name}"] = node("SaveLatent", samples=[f"ts{k}_{name}", 0],
                                               filename_prefix=f"ts{k}_{name}")
        # Wan 2.2-style experts: stock = two KSamplerAdvanced split at the first step below the boundary
        from comfy_tetriserve.sampling.schedules import compute_sigmas

        boundary = 0.9
        split = next(i for i, s in enumerate(compute_sigmas("wan", "simple", 6).tolist()) if s < boundary)
        assert 0 < split < 6
        adv = dict(noise_seed=77, steps=6, cfg=5.0, sampler_name="euler", scheduler="simple",
                   positive=["pos", 0], negative=["neg", 0])
        p["unet_low"] = node("UNETLoader", unet_name="tiny_wan_low.safetensors", weight_dtype="default")
        p["ks_hi"] = node("KSamplerAdvanced", model=["unet", 0], add_noise="enable", start_at_step=0,
                          end_at_step=split, return_with_leftover_noise="enable", latent_image=["empty", 0], **adv)
        p["ks_lo"] = node("KSamplerAdvanced", model=["unet_low", 0], add_noise="disable", start_at_step=split,
                          end_at_step=10000, return_with_leftover_noise="disable", latent_image=["ks_hi", 0], **adv)
        p["save_ks_experts"] = node("SaveLatent", samples=["ks_lo", 0], filename_prefix="ks_experts")
        p["dit_low"] = node("TetriServeLoadDiT", unet_name="tiny_wan_low.safetensors", weight_dtype="fp32", shift=0.0)
        p["experts"] = node("TetriServeWanExperts", high_noise_model=["dit", 0], low_noise_model=["dit_low", 0],
                            boundary=boundary)
        for k in (1, 2):
            p[f"ts{k}_experts"] = node("TetriServeSampler", model=["experts", 0], seed=77, steps=6, cfg=5.0,
                                       sampler_name="euler", scheduler="simple", denoise=1.0, positive=["pos", 0],
                                       negative=["neg", 0], latent_image=["empty", 0], deadline_s=0.0, priority=k)
            p[f"save_ts{k}_experts"] = node("SaveLatent", samples=[f"ts{k}_experts", 0],
                                            filename_prefix=f"ts{k}_experts")
        prompt_id = comfy.post(p)
        history = comfy.history(prompt_id, timeout_s=600)
        assert history["status"]["status_str"] == "success", json.dumps(history["status"])[-3000:]

        def latent(node_id):
            item = history["outputs"][node_id]["latents"][0]
            return load_file(str(comfy.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]

        results = {}
        for name in list(CASES) + ["experts"]:
            stock = latent(f"save_ks_{name}")
            assert tuple(stock.shape) == (1, 16, 3, 10, 14) and stock.abs().max() > 0.1
            for k in (1, 2):
                ours = latent(f"save_ts{k}_{name}")
                results[f"{name}@degree{k}"] = float((ours - stock).norm() / stock.norm())
        print("wan parity rel err vs stock KSampler:", json.dumps(results, indent=1))
        assert all(v < PARITY_TOL for v in results.values()), results
        # the experts case differs from the single-model case by far more than the tolerance
        assert float((latent("save_ks_experts") - latent("save_ks_t2v_euler_cfg")).norm()
                     / latent("save_ks_t2v_euler_cfg").norm()) > 1e-2
        jobs = [j for j in get_json(f"{url}/v1/jobs")["jobs"] if j["model"] == "tiny_wan.safetensors"]
        assert len(jobs) == 2 * (len(CASES) + 1)
        assert {j["sp_degree"] for j in jobs if j["priority"] == 2} == {2}
        assert {j["sp_degree"] for j in jobs if j["priority"] == 1} == {1}
    finally:
        if comfy is not None:
            stop(comfy.proc)
        stop(service)
