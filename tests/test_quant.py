"""Quantised weights: GGUF blocks against the gguf package, fp8 and GGUF models against float models
of the same (dequantised) values, memory, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from comfy_tetriserve.errors import InvalidRequest
from comfy_tetriserve.worker.convert import from_diffusers
from comfy_tetriserve.worker.gguf import QUANT_TYPES, dequantize, encode, read_gguf, write_gguf
from comfy_tetriserve.worker.models import load_transformer, model_info
from comfy_tetriserve.worker.quant import QuantLinear, linear_weight_bytes, write_quantized_checkpoint
from comfy_tetriserve.worker.tiny import tiny_state_dict, write_tiny_checkpoint

from test_models import inputs, run

gguf = pytest.importorskip("gguf")
ORIG = {"flux": "bfl", "sd3": "sd3_single"}


@pytest.mark.parametrize("qtype", ["F16", "BF16", *QUANT_TYPES])
def test_dequantize_equals_the_gguf_reference(qtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 512)) * np.linspace(0.01, 3, 512)).astype(np.float32)
    blocks = encode(qtype, x)
    ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype])
    mine = dequantize(qtype, torch.from_numpy(blocks), x.shape, torch.float32).numpy()
    assert np.linalg.norm(mine - ref) / np.linalg.norm(ref) <= 1e-6
    # the encoder is a real quantiser: it reproduces the weights to the type's precision
    err = np.linalg.norm(ref - x) / np.linalg.norm(x)
    assert err < {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q6_K": 4e-2}.get(qtype, 0.15), err


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "Q5_0"])
def test_dequantize_arbitrary_block_bytes(qtype):
    """Every bit field decoded as the reference does: random bytes, finite float16 scales."""
    per, nbytes = {"Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210), "Q5_0": (32, 22)}[qtype]
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, size=(64, nbytes), dtype=np.uint8)
    scales = rng.uniform(0.01, 1, size=(64, 2)).astype(np.float16).view(np.uint8)
    if qtype == "Q6_K":
        blocks[:, 208:210] = scales[:, :2]
    else:
        blocks[:, 0:2] = scales[:, :2]
        if qtype != "Q5_0":
            blocks[:, 2:4] = scales[:, 2:4]
    ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]).reshape(-1)
    mine = dequantize(qtype, torch.from_numpy(blocks), (64 * per,), torch.float32).numpy()
    assert np.linalg.norm(mine - ref) / np.linalg.norm(ref) <= 1e-6


def test_unsupported_quant_type_is_a_clear_error(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch="flux")
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    w.add_tensor("img_in.weight", gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_1),
                 raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(InvalidRequest, match=r"img_in.weight has GGUF quant type Q4_1, which is not supported"):
        read_gguf(tmp_path / "m.gguf")


def _dequantized_reference(path, tmp_path, family):
    """A float file holding exactly the values the quantised file encodes."""
    from comfy_tetriserve.worker.gguf import GGUFTensor

    if str(path).endswith(".gguf"):
        sd, _ = read_gguf(path)
        sd = {k: (v.dequantize() if isinstance(v, GGUFTensor) else v.float()) for k, v in sd.items()}
    else:
        from safetensors.torch import load_file

        raw = load_file(str(path))
        scales = {k[: -len(".scale_weight")] + ".weight": v for k, v in raw.items() if k.endswith(".scale_weight")}
        sd = {k: v.float() * scales[k].float() if k in scales else v.float() for k, v in raw.items()
              if not k.endswith((".scale_weight", "scaled_fp8"))}
    out = tmp_path / f"{family}-reference.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out))
    return out


FORMATS = {"flux": ("fp8_e4m3fn", "scaled_fp8", "gguf:Q8_0", "gguf:Q4_0"),
           "sd3": ("fp8_e5m2", "scaled_fp8", "gguf:Q5_0", "gguf:F16")}


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_quantised_files_compute_the_values_they_encode(tmp_path, family):
    """Each quantised model (weights held quantised, dequantised per layer) equals a float model of
    the dequantised values, while quantisation itself changes the output far more than that."""
    base = load_transformer(str(write_tiny_checkpoint(family, ORIG[family], tmp_path / family)), dtype="fp32")
    base_out = run(base, inputs(family))
    for fmt in FORMATS[family]:
        path = write_quantized_checkpoint(family, fmt, tmp_path / f"{family}-{fmt.replace(':', '-')}")
        model = load_transformer(str(path), dtype="fp32")
        assert any(isinstance(m, QuantLinear) for m in model.module.modules()), fmt
        expected = {"scaled_fp8": "fp8_e4m3fn (scaled)"}.get(fmt, fmt.replace(":", " ") if ":" in fmt else fmt)
        assert model.info().storage == model.storage == expected, (fmt, model.storage)
        out = run(model, inputs(family))
        ref = run(load_transformer(str(_dequantized_reference(path, tmp_path, family)), dtype="fp32"), inputs(family))
        assert float((out - ref).norm() / ref.norm()) < 1e-5, fmt
        assert float((out - base_out).norm() / base_out.norm()) > 1e-4, fmt  # the quantisation is real
        assert model_info(str(path)).family == family


def test_k_quant_gguf_model(tmp_path):
    """A 256-wide tiny FLUX so the K-quant blocks fit every Linear input."""
    config, sd = tiny_state_dict("flux")
    for fmt in ("gguf:Q4_K", "gguf:Q5_K", "gguf:Q6_K"):
        path = write_quantized_checkpoint("flux", fmt, tmp_path / fmt.replace(":", "-"), sd=sd)
        model = load_transformer(str(path), dtype="fp32")
        kinds = {m.qtype for m in model.module.modules() if isinstance(m, QuantLinear)}
        assert fmt[5:] in kinds  # the MLP output projections (256 inputs) are K-quantised
        out = run(model, inputs("flux"))
        ref = run(load_transformer(str(_dequantized_reference(path, tmp_path, "flux")), dtype="fp32"), inputs("flux"))
        assert float((out - ref).norm() / ref.norm()) < 1e-5, fmt


def test_weight_dtype_fp8_stores_fp8_and_rounds_like_comfyui(tmp_path):
    path = write_tiny_checkpoint("sd3", "sd3_single", tmp_path / "sd3")
    model = load_transformer(str(path), dtype="fp8_e4m3fn")
    layers = [m for m in model.module.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.qweight.dtype == torch.float8_e4m3fn for m in layers)
    assert not any(type(m) is torch.nn.Linear for m in model.module.modules())
    assert model.dtype == torch.float32 and model.storage == "fp8_e4m3fn"  # CPU computes in fp32
    # every weight rounded through fp8 (ComfyUI holds them all in fp8): a float file of those values
    _, sd = tiny_state_dict("sd3")
    rounded = {k: v.to(torch.float8_e4m3fn).float() for k, v in sd.items()}
    ref_path = tmp_path / "rounded.safetensors"
    save_file(from_diffusers("sd3", rounded, "sd3_single"), str(ref_path))
    out, ref = run(model, inputs("sd3")), run(load_transformer(str(ref_path), dtype="fp32"), inputs("sd3"))
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    e5 = run(load_transformer(str(path), dtype="fp8_e5m2"), inputs("sd3"))
    assert float((e5 - out).norm() / out.norm()) > 1e-3
    with pytest.raises(InvalidRequest, match="GGUF"):
        load_transformer(str(write_quantized_checkpoint("sd3", "gguf:Q8_0", tmp_path / "q8")), dtype="fp8_e4m3fn")


def test_resident_memory_of_linear_weights(tmp_path):
    """fp8 / Q8_0 / Q4_0 hold about 0.5 / 0.53 / 0.28 of bf16's bytes for the Linear weights."""
    path = write_tiny_checkpoint("flux", "bfl", tmp_path / "flux")
    bf16 = linear_weight_bytes(load_transformer(str(path), dtype="bf16").module)
    ratios = {"fp8": linear_weight_bytes(load_transformer(str(path), dtype="fp8_e4m3fn").module) / bf16}
    for q in ("Q8_0", "Q4_0"):
        model = load_transformer(str(write_quantized_checkpoint("flux", f"gguf:{q}", tmp_path / q)), dtype="bf16")
        ratios[q] = linear_weight_bytes(model.module) / bf16
    assert ratios["fp8"] == pytest.approx(0.5, abs=1e-3)
    assert ratios["Q8_0"] == pytest.approx(34 / 64, abs=0.01)
    assert ratios["Q4_0"] == pytest.approx(18 / 64, abs=0.01)


def test_write_gguf_keeps_vectors_float(tmp_path):
    t = {"a.weight": torch.randn(8, 64), "a.bias": torch.randn(8), "b.weight": torch.randn(4, 48)}
    sd, meta = read_gguf(write_gguf(tmp_path / "x.gguf", t, arch="sd3", qtype="Q8_0"))
    assert meta["general.architecture"] == "sd3"
    assert sd["a.weight"].qtype == "Q8_0" and sd["a.weight"].shape == (8, 64)
    assert sd["a.bias"].dtype == torch.float32 and torch.equal(sd["a.bias"], t["a.bias"])
    assert sd["b.weight"].dtype == torch.float32  # 48 inputs are not whole Q8_0 blocks
