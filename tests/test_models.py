"""Loading FLUX and SD3 from every layout, and the forward's semantics against reference implementations."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_tetriserve.worker.models import allowed_degrees, load_transformer, model_info
from comfy_tetriserve.worker.tiny import FAMILY_LAYOUTS, random_model, tiny_state_dict, write_tiny_checkpoint
from comfy_tetriserve.errors import InvalidRequest

HERE = Path(__file__).parent


def inputs(family: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    data = {"x": torch.randn(2, 16, 14, 18, generator=g), "sigma": torch.tensor([0.7, 0.3]),
            "context": torch.randn(2, 7, 32, generator=g), "pooled": torch.randn(2, 16, generator=g)}
    if family == "flux":
        data["guidance"] = torch.tensor([3.5, 2.0])
    return data


def run(model, data: dict) -> torch.Tensor:
    out, votes = model.forward(data["x"], data["sigma"], data["context"], data["pooled"], data.get("guidance"))
    assert votes is None
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {(f, lay): write_tiny_checkpoint(f, lay, d / f"{f}-{lay}") for f, lays in FAMILY_LAYOUTS.items()
            for lay in lays}


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_every_layout_loads_the_same_model(files, family):
    outs = {}
    for layout in FAMILY_LAYOUTS[family]:
        model = load_transformer(str(files[family, layout]), dtype="fp32")
        assert model.family == family and model.num_heads == 4
        outs[layout] = run(model, inputs(family))
    ref = outs.pop("diffusers")
    assert ref.shape == (2, 16, 14, 18) and ref.dtype == torch.float32 and ref.abs().sum() > 0
    for layout, out in outs.items():
        assert torch.equal(out, ref), layout


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_forward_equals_bare_diffusers_forward(family):
    """Degree 1 with our processors and loop is the diffusers model's own computation (fp32)."""
    from comfy_tetriserve.worker.models import LoadedModel
    from comfy_tetriserve.worker.tiny import TINY_CONFIGS

    config = dict(TINY_CONFIGS[family])
    module = random_model(config, seed=2)
    data = inputs(family)
    x = data["x"]
    b, c, h, w = x.shape
    with torch.no_grad():
        if family == "flux":
            packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
            ids = torch.zeros(h // 2, w // 2, 3)
            ids[..., 1] = torch.arange(h // 2)[:, None]
            ids[..., 2] = torch.arange(w // 2)[None, :]
            ref = module(hidden_states=packed, encoder_hidden_states=data["context"], pooled_projections=data["pooled"],
                         timestep=data["sigma"], img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(7, 3),
                         guidance=data["guidance"], return_dict=False)[0]
            ref = ref.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        else:  # SD3 takes sigma * 1000, FLUX takes sigma (its embedding multiplies by 1000 inside)
            ref = module(hidden_states=x, encoder_hidden_states=data["context"], pooled_projections=data["pooled"],
                         timestep=data["sigma"] * 1000, return_dict=False)[0]
    model = LoadedModel(name="m", family=family, config=config, module=module, dtype=torch.float32,
                        device=torch.device("cpu"), source="random:tiny")
    assert torch.allclose(run(model, data), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_pipeline_folder_and_diffusers_named_single_file(files, tmp_path):
    pipe = tmp_path / "pipeline"
    shutil.copytree(files["sd3", "diffusers"], pipe / "transformer")
    (pipe / "model_index.json").write_text("{}")
    single = tmp_path / "sd3-diffusers-keys.safetensors"
    shutil.copy(files["sd3", "diffusers"] / "diffusion_pytorch_model.safetensors", single)
    ref = run(load_transformer(str(files["sd3", "diffusers"]), dtype="fp32"), inputs("sd3"))
    for source in (pipe, single):
        assert torch.equal(run(load_transformer(str(source), dtype="fp32"), inputs("sd3")), ref)


def test_dtype_and_info(files):
    model = load_transformer(str(files["flux", "comfy"]), dtype="bf16", name="flux-tiny")
    assert {p.dtype for p in model.module.parameters()} == {torch.bfloat16}
    out = run(model, inputs("flux"))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    info = model.info()
    assert (info.name, info.family, info.num_heads, info.in_channels, info.context_dim, info.pooled_dim,
            info.guidance_embeds, info.dtype, info.source) == \
        ("flux-tiny", "flux", 4, 16, 32, 16, True, "bf16", "flux-comfy.safetensors")
    # a loaded model also reports how it holds its weights and how many bytes they take
    assert info.storage == "bf16"
    assert info.resident_bytes == sum(p.numel() * 2 for p in model.module.parameters()) > 0
    assert model_info(str(files["flux", "comfy"]), name="flux-tiny", dtype="bf16") == \
        dataclasses.replace(info, storage="", resident_bytes=0)
    sd3 = model_info(str(files["sd3", "sd3_single"]), dtype="fp16")
    assert (sd3.family, sd3.guidance_embeds, sd3.dtype, sd3.num_heads) == ("sd3", False, "fp16", 4)
    assert model.num_attention_layers() == 3


def test_real_size_presets_describe_the_published_architectures():
    flux = model_info("random:flux-dev")
    assert (flux.num_heads, flux.context_dim, flux.pooled_dim, flux.guidance_embeds) == (24, 4096, 768, True)
    assert not model_info("random:flux-schnell").guidance_embeds
    sd3 = model_info("random:sd3-medium")
    assert (sd3.num_heads, sd3.context_dim, sd3.pooled_dim) == (24, 4096, 2048)
    assert model_info("random:sd3.5-large").num_heads == 38
    assert allowed_degrees(38) == (1, 2)


def test_random_preset_loads_tiny_and_is_seeded():
    a = load_transformer("random:tiny-sd3:7", dtype="fp32")
    b = load_transformer("random:tiny-sd3:7", dtype="fp32")
    c = load_transformer("random:tiny-sd3:8", dtype="fp32")
    assert torch.equal(run(a, inputs("sd3")), run(b, inputs("sd3")))
    assert not torch.equal(run(a, inputs("sd3")), run(c, inputs("sd3")))


def test_allowed_degrees_are_powers_of_two_dividing_heads():
    assert allowed_degrees(24) == (1, 2, 4, 8)
    assert allowed_degrees(24, max_degree=4) == (1, 2, 4)
    assert allowed_degrees(4) == (1, 2, 4)
    assert allowed_degrees(3) == (1,)


def test_bad_sources_are_refused_clearly(tmp_path, files):
    with pytest.raises(InvalidRequest, match="no model at"):
        load_transformer(str(tmp_path / "missing.safetensors"))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"pickle")
    with pytest.raises(InvalidRequest, match="only .safetensors"):
        load_transformer(str(ckpt))
    vae = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(2, 2)}, str(vae))
    with pytest.raises(InvalidRequest, match="not a FLUX or SD3"):
        model_info(str(vae))
    with pytest.raises(InvalidRequest, match="unknown preset"):
        load_transformer("random:sdxl")
    with pytest.raises(InvalidRequest, match="unknown dtype"):
        load_transformer(str(files["flux", "bfl"]), dtype="int8")
    with pytest.raises(InvalidRequest, match="degree 3"):
        from comfy_tetriserve.worker.parallel import GroupComm
        run_model = load_transformer(str(files["flux", "bfl"]), dtype="fp32")
        d = inputs("flux")
        run_model.forward(d["x"], d["sigma"], d["context"], d["pooled"], d["guidance"],
                          comm=GroupComm(None, (0, 1, 2), 0))


def test_tiny_checkpoint_same_seed_same_weights_in_every_layout(tmp_path):
    _, sd = tiny_state_dict("flux", seed=4)
    path = write_tiny_checkpoint("flux", "diffusers", tmp_path / "f", seed=4)
    saved = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    assert saved.keys() == sd.keys() and all(torch.equal(saved[k], sd[k]) for k in sd)
    assert json.loads((path / "config.json").read_text())["num_attention_heads"] == 4


@pytest.mark.comfyui
@pytest.mark.parametrize("case", ["flux-comfy", "sd3.5-style", "sd3-medium-style"])
def test_matches_comfyui_own_implementation(tmp_path, case):
    """ComfyUI's FLUX / MMDiT classes on the same single file and timestep give the same output."""
    comfy_dir, comfy_python = os.environ.get("TETRISERVE_COMFYUI"), os.environ.get("TETRISERVE_COMFYUI_PYTHON")
    if not comfy_dir or not comfy_python:
        pytest.skip("TETRISERVE_COMFYUI and TETRISERVE_COMFYUI_PYTHON not set")
    from comfy_tetriserve.worker.convert import COMFY_PREFIX, from_diffusers
    from comfy_tetriserve.worker.tiny import TINY_SD3_CONFIG

    family = "flux" if case.startswith("flux") else "sd3"
    if family == "flux":
        path = write_tiny_checkpoint("flux", "comfy", tmp_path / "flux")
    else:  # ComfyUI's MMDiT fixes heads at 64 channels
        config = dict(TINY_SD3_CONFIG, attention_head_dim=64, num_attention_heads=2, caption_projection_dim=128)
        if case == "sd3-medium-style":
            config.update(qk_norm=None, dual_attention_layers=[])
        sd = from_diffusers("sd3", random_model(config, seed=3).state_dict(), "sd3_single")
        path = tmp_path / "sd3.safetensors"
        save_file({COMFY_PREFIX + k: v.contiguous() for k, v in sd.items()}, str(path))
    model = load_transformer(str(path), dtype="fp32")
    data = inputs(family)
    save_file(data, str(tmp_path / "in.safetensors"))
    proc = subprocess.run([comfy_python, str(HERE / "comfyui_dit_reference.py"), comfy_dir, str(path),
                           str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"),
                           json.dumps(model.config)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = load_file(str(tmp_path / "out.safetensors"))["out"]
    rel = float((run(model, data) - ref).norm() / ref.norm())
    assert rel < 1e-5, rel
