"""FLUX Fill and Kontext: the extra channels and reference tokens, as ComfyUI builds and runs them."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_tetriserve.errors import InvalidRequest
from comfy_tetriserve.sampling.image_cond import (fill_concat, num_reference_tokens, pack_mask, reference_latents,
                                                  reference_offsets, resize_batch)
from comfy_tetriserve.sampling.latents import process_latent_in
from comfy_tetriserve.worker.flux_inputs import flux_image_inputs
from comfy_tetriserve.worker.models import load_transformer, model_info
from comfy_tetriserve.worker.tiny import write_tiny_checkpoint

HERE = Path(__file__).parent


# ----------------------------------------------------------------- arithmetic
def test_mask_packs_each_8x8_block_into_64_channels():
    mask = torch.zeros(1, 1, 16, 24)
    mask[0, 0, 8 + 3, 16 + 5] = 1.0  # block (1, 2), pixel (3, 5) inside it
    packed = pack_mask(mask, 2, 3)
    assert packed.shape == (1, 64, 2, 3)
    assert packed.sum() == 1.0 and packed[0, 8 * 3 + 5, 1, 2] == 1.0
    # a [B, H, W] mask (ComfyUI's MASK) and a multi-channel one are averaged over channels
    assert torch.equal(pack_mask(mask[:, 0], 2, 3), packed)
    assert torch.allclose(pack_mask(torch.cat([mask, torch.zeros_like(mask)], 1), 2, 3), packed / 2)


def test_fill_concat_resizes_moves_into_model_space_and_repeats_the_batch():
    image = torch.randn(1, 16, 7, 9)
    mask = torch.rand(1, 1, 56, 72)
    concat = fill_concat("flux", image, mask, (2, 16, 7, 9))
    assert concat.shape == (2, 80, 7, 9)
    assert torch.allclose(concat[0, :16], process_latent_in("flux", image[0]))
    assert torch.equal(concat[0], concat[1])
    # a mask of another size is resized (bilinear) to 8x the latent; an image of another size as well
    small = fill_concat("flux", torch.randn(1, 16, 14, 18), torch.ones(1, 1, 10, 10), (1, 16, 7, 9))
    assert small.shape == (1, 80, 7, 9) and torch.allclose(small[:, 16:], torch.ones(1, 64, 7, 9))
    with pytest.raises(InvalidRequest, match="concat_latent_image must be"):
        fill_concat("flux", torch.randn(1, 4, 7, 9), mask, (1, 16, 7, 9))


def test_resize_batch_spreads_and_truncates():
    t = torch.arange(3.0).view(3, 1)
    assert resize_batch(t, 3) is t
    assert resize_batch(t, 6).view(-1).tolist() == [0, 0, 1, 1, 2, 2]
    assert resize_batch(t, 2).view(-1).tolist() == [0, 2]
    assert resize_batch(t, 1).view(-1).tolist() == [0]


def test_reference_offsets_for_each_method():
    # offset: index 1; a tall second reference goes beside the first, a wide third one below both
    assert reference_offsets((14, 18), [(10, 12), (20, 4), (4, 30)], "offset") == [(1, 0, 0), (1, 0, 6), (1, 10, 0)]
    assert reference_offsets((14, 18), [(10, 12), (7, 9)], "offset") == [(1, 0, 0), (1, 5, 0)]
    assert reference_offsets((14, 18), [(10, 12), (7, 9)], "index") == [(1, 0, 0), (2, 0, 0)]
    # uxo: index 0, diagonal after the generated image (7 x 9 tokens), then after the first reference
    assert reference_offsets((14, 18), [(10, 12), (7, 9)], "uxo") == [(0, 7, 9), (0, 12, 15)]
    assert num_reference_tokens([(10, 12), (7, 9)]) == 30 + 20
    with pytest.raises(InvalidRequest, match="reference_latents_method"):
        reference_offsets((14, 18), [(2, 2)], "nearest")


def test_reference_tokens_follow_the_generated_tokens_with_their_ids():
    x = torch.randn(1, 16, 4, 6)
    refs = reference_latents("flux", (torch.randn(1, 16, 4, 4), torch.randn(1, 16, 3, 5)), 16)
    packed, ids, n = flux_image_inputs(x, refs=refs)
    assert n == 6 and packed.shape == (1, 6 + 4 + 6, 64)
    assert ids[:6, 0].eq(0).all() and ids[6:, 0].eq(1).all()
    assert ids[6:10, 1:].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]  # first reference at the origin
    assert ids[10:, 1:].tolist() == [[2, 0], [2, 1], [2, 2], [3, 0], [3, 1], [3, 2]]  # then below it
    # token (0, 1) of the first reference holds its 2x2 patch at columns 2..3, channel-major
    assert torch.equal(packed[0, 7], refs[0][0, :, 0:2, 2:4].reshape(-1))
    # the odd 3 x 5 reference is padded circularly: its last column of patches wraps to column 0
    assert torch.equal(packed[0, 12].view(16, 2, 2)[:, 0, 1], refs[1][0, :, 0, 0])


# ----------------------------------------------------------------- the models
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("fk")
    return {"fill": write_tiny_checkpoint("flux", "comfy", d / "fill", seed=2, variant="fill"),
            "dev": write_tiny_checkpoint("flux", "bfl", d / "dev", seed=2)}


def _inputs(seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(2, 16, 14, 18, generator=g), "sigma": torch.tensor([0.8, 0.35]),
            "context": torch.randn(2, 7, 32, generator=g), "pooled": torch.randn(2, 16, generator=g),
            "guidance": torch.tensor([3.5, 2.5])}


def _fill_inputs(seed: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 1, 112, 144)
    mask[..., 30:90, 40:130] = 1.0
    mask = torch.nn.functional.avg_pool2d(mask, 9, stride=1, padding=4)  # soft edges, as a feathered mask
    return {"concat_latent_image": torch.randn(1, 16, 14, 18, generator=g), "concat_mask": mask}


def _refs(seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"ref_0": torch.randn(1, 16, 10, 12, generator=g), "ref_1": torch.randn(1, 16, 7, 9, generator=g)}


def test_fill_checkpoint_is_detected_and_needs_its_channels(models):
    info = model_info(str(models["fill"]))
    assert info.in_channels == 16 and info.concat_channels == 80
    assert model_info(str(models["dev"])).concat_channels == 0
    model = load_transformer(str(models["fill"]), dtype="fp32")
    d = _inputs()
    with pytest.raises(InvalidRequest, match="Fill model: it needs the masked image and the mask"):
        model.forward(d["x"], d["sigma"], d["context"], d["pooled"], d["guidance"])
    dev = load_transformer(str(models["dev"]), dtype="fp32")
    with pytest.raises(InvalidRequest, match="not a Fill model"):
        dev.forward(d["x"], d["sigma"], d["context"], d["pooled"], d["guidance"], concat=torch.zeros(2, 80, 14, 18))
    with pytest.raises(InvalidRequest, match="does not take reference latents"):
        model.forward(d["x"], d["sigma"], d["context"], d["pooled"], d["guidance"],
                      concat=torch.zeros(2, 80, 14, 18), refs=(torch.zeros(1, 16, 4, 4),))


def _ours(model, d: dict, method: str = "offset") -> torch.Tensor:
    concat = None
    if "concat_latent_image" in d:
        concat = fill_concat("flux", d["concat_latent_image"], d["concat_mask"], d["x"].shape)
    refs = reference_latents("flux", [d[k] for k in sorted(d) if k.startswith("ref_")], 16)
    out, _ = model.forward(d["x"], d["sigma"], d["context"], d["pooled"], d["guidance"], concat=concat, refs=refs,
                           ref_method=method)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.comfyui
@pytest.mark.parametrize("case", ["fill", "kontext-offset", "kontext-index", "kontext-uxo"])
def test_matches_comfyui_flux_with_image_conditioning(tmp_path, models, case):
    """ComfyUI's concat_cond + Flux forward on the same file: rel err <= 1e-4 (measured ~1e-7), and the
    mask / references change the output by far more than that."""
    comfy_dir, comfy_python = os.environ.get("TETRISERVE_COMFYUI"), os.environ.get("TETRISERVE_COMFYUI_PYTHON")
    if not comfy_dir or not comfy_python:
        pytest.skip("TETRISERVE_COMFYUI and TETRISERVE_COMFYUI_PYTHON not set")
    kind, _, method = case.partition("-")
    path = models["fill" if kind == "fill" else "dev"]
    model = load_transformer(str(path), dtype="fp32")
    data = {**_inputs(), **(_fill_inputs() if kind == "fill" else _refs())}
    save_file(data, str(tmp_path / "in.safetensors"), metadata={"method": method or "offset"})
    proc = subprocess.run([comfy_python, str(HERE / "comfyui_flux_image_cond_reference.py"), comfy_dir, str(path),
                           str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"),
                           json.dumps(model.config)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = load_file(str(tmp_path / "out.safetensors"))
    ours = _ours(model, data, method or "offset")
    rel = _rel(ours, ref["out"])
    print(f"{case}: rel err vs ComfyUI {rel:.2e}")
    assert rel <= 1e-4, rel
    if kind == "fill":
        assert _rel(fill_concat("flux", data["concat_latent_image"], data["concat_mask"], data["x"].shape),
                    ref["concat"]) <= 1e-6
        no_mask = {**data, "concat_mask": torch.zeros_like(data["concat_mask"])}
        changed = _rel(_ours(model, no_mask), ref["out"])
    else:
        changed = _rel(_ours(model, {k: v for k, v in data.items() if k != "ref_1"}, method), ref["out"])
    print(f"{case}: without the mask / a reference: {changed:.2e}")
    assert changed > 1e-2 and changed > 1000 * rel
