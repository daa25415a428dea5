"""Quantised DiT weights: fp8 and GGUF checkpoints that stay quantised in memory.

Three ways a model comes to hold quantised weights:

- an fp8 ``.safetensors`` file as ComfyUI writes and loads them: plain ``float8_e4m3fn`` /
  ``float8_e5m2`` weights, or "scaled fp8" (a ``scaled_fp8`` marker tensor, whose dtype names the
  format, and a per-tensor ``<layer>.scale_weight``; the real weight is ``weight * scale_weight``);
- a ``.gguf`` file (worker/gguf.py), F16/BF16/F32 and the block types ``gguf.BLOCKS`` lists;
- a bf16/fp16/fp32 file loaded with ``weight_dtype`` ``fp8_e4m3fn``, ``fp8_e4m3fn_fast`` or
  ``fp8_e5m2``: every weight is cast to fp8 on load, as ComfyUI's UNETLoader does (the model's
  Linear layers keep the fp8 tensors; the few other parameters, norms, patch embedding, positional
  table, are rounded through fp8 and kept in the compute dtype, so their values equal ComfyUI's).
  ``fp8_e4m3fn_fast`` stores the same weights; its matmuls run in the compute dtype as well.

Every ``torch.nn.Linear`` whose weight is quantised becomes a ``QuantLinear``, which holds the
quantised tensor (and scale) as buffers and dequantises it for each call, one layer at a time.
The compute dtype is fp32 on a CPU and the requested float dtype on a GPU (bf16 for the fp8
formats). LoRA (worker/lora.py) adds its terms to the layer outputs and never touches these.

The key layouts are the same as for float files (convert.py). The converter's renames, q/k/v
splits and half swaps are row operations, so they are run once on *row tags* (each tensor replaced
by a column of its global row numbers): the result tells, for each diffusers key, which source
tensor and which rows it is made of, and the quantised bytes, fp8 tensors and scales are sliced the
same way without ever being dequantised.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InvalidRequest
from .convert import COMFY_PREFIX, infer_config, to_diffusers
from .gguf import FLOAT_TYPES, GGUFTensor, read_gguf

log = logging.getLogger(__name__)

FP8_FORMATS = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn,
               "fp8_e5m2": torch.float8_e5m2}
_FP8_NAMES = {torch.float8_e4m3fn: "fp8_e4m3fn", torch.float8_e5m2: "fp8_e5m2"}
_FLOAT_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Activation dtype of a quantised model: fp32 on a CPU, else the float dtype asked for (fp8: bf16)."""
    if device.type == "cpu":
        return torch.float32
    return _FLOAT_NAMES.get(dtype, torch.bfloat16)


def is_quantized_source(source: str) -> bool:
    """Whether a file holds quantised weights (GGUF, or fp8 tensors / a scaled_fp8 marker)."""
    path = Path(source)
    if path.suffix == ".gguf":
        return True
    if path.is_file() and path.suffix in (".safetensors", ".sft"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                if key.endswith("scaled_fp8") or fh.get_slice(key).get_dtype().startswith("F8"):
                    return True
    return False


# ----------------------------------------------------------------- the layer
class QuantLinear(torch.nn.Module):
    """A Linear layer whose weight stays quantised (``qtype``: an fp8 format or a GGUF block type)."""

    def __init__(self, qweight: torch.Tensor, qtype: str, shape: tuple[int, int], bias: torch.Tensor | None,
                 scale: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        self.qtype = qtype
        self.compute_dtype = dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", None if scale is None else scale.float().reshape(()))
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        if self.qtype.startswith("fp8"):
            w = self.qweight.to(dtype)
            return w * self.scale.to(dtype) if self.scale is not None else w
        from .gguf import dequantize

        return dequantize(self.qtype, self.qweight, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"


# ----------------------------------------------------------------- row provenance through the converter
@dataclass(frozen=True)
class Rows:
    """A diffusers tensor made of ``rows`` of source tensor ``source`` (a slice when contiguous)."""

    source: str
    rows: torch.Tensor | slice


def _num_rows(t) -> int:
    shape = t.shape
    return int(shape[0]) if len(shape) else 1


def row_sources(shapes: dict[str, tuple[int, ...]], convert) -> dict[str, tuple[list[str], torch.Tensor]]:
    """Run ``convert`` (a state-dict -> state-dict row rearrangement) on row tags; per output key,
    the source key of each of its rows and the row within that source."""
    tags, starts, names, offset = {}, [], [], 0
    for key, shape in shapes.items():
        n = int(shape[0]) if len(shape) else 1
        tags[key] = torch.arange(offset, offset + n, dtype=torch.float64).view(n, 1)
        starts.append(offset)
        names.append(key)
        offset += n
    starts_t = torch.tensor(starts, dtype=torch.float64)
    out = {}
    for key, tag in convert(tags).items():
        ids = tag.reshape(-1)
        which = torch.searchsorted(starts_t, ids, right=True) - 1
        out[key] = ([names[int(w)] for w in which], (ids - starts_t[which]).long())
    return out


def row_provenance(shapes: dict[str, tuple[int, ...]], convert) -> dict[str, Rows]:
    """Like ``row_sources`` where every output is made of rows of one source: (source, rows)."""
    out = {}
    for key, (srcs, rows) in row_sources(shapes, convert).items():
        if len(set(srcs)) != 1:
            raise InvalidRequest(f"{key}: its rows come from several checkpoint tensors (not a row slice)")
        first = int(rows[0])
        if torch.equal(rows, torch.arange(first, first + rows.numel())):
            out[key] = Rows(srcs[0], slice(first, first + rows.numel()))
        else:
            out[key] = Rows(srcs[0], rows)
    return out


def _take(t, rows: torch.Tensor | slice):
    if isinstance(t, GGUFTensor):
        return t.rows(rows)
    if t.ndim == 0:
        return t
    if isinstance(rows, slice):
        return t[rows]
    if t.dtype in _FP8_NAMES:
        return t.view(torch.uint8)[rows].view(t.dtype)
    return t[rows]


def _shape(t) -> tuple[int, ...]:
    return tuple(t.shape)


# ----------------------------------------------------------------- loading
@dataclass(frozen=True)
class QuantizedCheckpoint:
    config: dict
    tensors: dict  # diffusers key -> torch.Tensor (float or fp8) | GGUFTensor
    scales: dict  # diffusers weight key -> scalar scale (scaled fp8)
    storage: str  # e.g. "fp8_e4m3fn (scaled)", "gguf Q8_0", "fp8_e5m2"


def _read_raw(source: str, device: torch.device) -> tuple[dict, dict, str | None]:
    """(tensors, scales by weight key, fp8 format named by a scaled_fp8 marker) of a file."""
    path = Path(source)
    if path.suffix == ".gguf":
        raw, _meta = read_gguf(path, meta=device.type == "meta")
    else:
        from .models import _read_safetensors

        raw = _read_safetensors([path], device)
    marker = None
    scales = {}
    for key in list(raw):
        if key == "scaled_fp8" or key.endswith(".scaled_fp8") or key == COMFY_PREFIX + "scaled_fp8":
            t = raw.pop(key)
            marker = _FP8_NAMES.get(t.dtype, "fp8_e4m3fn")
        elif key.endswith(".scale_weight"):
            scales[key[: -len(".scale_weight")] + ".weight"] = raw.pop(key)
        elif key.endswith(".scale_input"):
            raw.pop(key)  # only used by fp8 matrix multiplication of the inputs
    return raw, scales, marker


def read_quantized(source: str, device: torch.device) -> QuantizedCheckpoint:
    raw, scales, marker = _read_raw(source, device)
    shapes = {k: _shape(v) for k, v in raw.items()}
    family_box = []

    def convert(tags):
        family, out = to_diffusers(tags)
        family_box.append(family)
        return out

    prov = row_provenance(shapes, convert)
    tensors = {k: _take(raw[p.source], p.rows) for k, p in prov.items()}
    # scale tensors follow their weight; their keys lose any prefix like the weights did
    out_scales = {k: scales[p.source] for k, p in prov.items() if p.source in scales}
    meta = {k: torch.empty(_shape(v), device="meta") for k, v in tensors.items()}
    config = infer_config(family_box[0], meta)
    kinds = sorted({v.qtype for v in tensors.values() if isinstance(v, GGUFTensor)})
    fp8 = sorted({_FP8_NAMES[v.dtype] for v in tensors.values() if isinstance(v, torch.Tensor) and v.dtype in _FP8_NAMES})
    if kinds:
        storage = "gguf " + "+".join(kinds)
    elif fp8:
        storage = "+".join(fp8) + (" (scaled)" if marker or out_scales else "")
    else:
        storage = "float"
    return QuantizedCheckpoint(config, tensors, out_scales, storage)


def _set_module(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def build_quantized(config: dict, tensors: dict, scales: dict, *, fp8: torch.dtype | None,
                    dtype: torch.dtype, device: torch.device, keep_half: bool = False) -> torch.nn.Module:
    """The diffusers module of ``config`` holding ``tensors``: quantised Linear weights (and, with
    ``fp8``, every float Linear weight cast to it; with ``keep_half``, F16/BF16 ones) stay as
    stored; everything else is in ``dtype``."""
    from .tiny import model_class, model_kwargs

    with torch.device("meta"):
        module = model_class(config)(**model_kwargs(config))
    tensors = dict(tensors)
    for name, layer in list(module.named_modules()):
        if not isinstance(layer, torch.nn.Linear) or name + ".weight" not in tensors:
            continue
        w = tensors.pop(name + ".weight")
        bias = tensors.pop(name + ".bias", None)
        if bias is not None:
            bias = bias.dequantize() if isinstance(bias, GGUFTensor) else bias
            bias = _fp8_round(bias, fp8) if fp8 is not None else bias.float()
        scale = scales.get(name + ".weight")
        if isinstance(w, GGUFTensor):
            if w.qtype in FLOAT_TYPES:
                w = w.dequantize()
            else:
                q = QuantLinear(w.data.to(device), w.qtype, w.shape, _dev(bias, device), None, dtype)
                _set_module(module, name, q)
                continue
        if keep_half and w.dtype in (torch.float16, torch.bfloat16) and w.ndim == 2:
            qtype = "F16" if w.dtype == torch.float16 else "BF16"
            q = QuantLinear(w.contiguous().view(torch.uint8).to(device), qtype, tuple(w.shape), _dev(bias, device),
                            None, dtype)
        elif w.dtype in _FP8_NAMES:
            q = QuantLinear(w.to(device), _FP8_NAMES[w.dtype], tuple(w.shape), _dev(bias, device), scale, dtype)
        elif fp8 is not None:
            q = QuantLinear(w.to(device=device).to(fp8), _FP8_NAMES[fp8], tuple(w.shape), _dev(bias, device), None, dtype)
        else:
            tensors[name + ".weight"], tensors[name + ".bias"] = w, bias
            if bias is None:
                tensors.pop(name + ".bias")
            continue
        _set_module(module, name, q)
    rest = {}
    for key, t in tensors.items():
        if isinstance(t, GGUFTensor):
            t = t.dequantize()
        elif t.dtype in _FP8_NAMES:
            t = t.float() * scales[key].float() if key in scales else t.float()
        if fp8 is not None and t.is_floating_point():  # noqa
            t = _fp8_round(t, fp8)
        rest[key] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
    missing, unexpected = module.load_state_dict(rest, strict=False, assign=True)
    if unexpected:
        raise InvalidRequest(f"weights do not fit the inferred architecture (unexpected {sorted(unexpected)[:5]})")
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise InvalidRequest(f"no weights for {left[:5]}")
    return module.eval()


def _fp8_round(t: torch.Tensor, fp8: torch.dtype) -> torch.Tensor:
    return t.to(fp8).float()


def _dev(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def fp8_of(dtype: str) -> torch.dtype | None:
    return FP8_FORMATS.get(dtype)


def storage_of_module(module: torch.nn.Module, default: str) -> str:
    kinds = sorted({m.qtype for m in module.modules() if isinstance(m, QuantLinear)})
    return "+".join(kinds) if kinds else default


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer the module holds (quantised tensors at their stored size)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t is not None and t.data_ptr() not in seen and not t.is_meta:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def linear_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the Linear layers' weights alone (quantised or not), scales included."""
    total = 0
    for m in module.modules():
        if isinstance(m, QuantLinear):
            total += m.qweight.numel() * m.qweight.element_size()
            total += 0 if m.scale is None else m.scale.numel() * m.scale.element_size()
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def load_quantized(source: str | tuple[dict, dict], weight_dtype: str, device: torch.device) -> tuple[dict, torch.nn.Module, torch.dtype, str]:
    """(config, module, compute dtype, storage description) of a quantised model.

    ``source`` is a GGUF or fp8 file, or any float file (or (config, weights)) with an fp8 ``weight_dtype``."""
    from .models import read_checkpoint

    fp8 = fp8_of(weight_dtype)
    dtype = compute_dtype(weight_dtype, device)
    if isinstance(source, tuple):
        (config, tensors), scales, storage = source, {}, weight_dtype
        source = "random weights"
    elif is_quantized_source(source):
        ckpt = read_quantized(source, torch.device("cpu"))
        if fp8 is not None and ckpt.storage.startswith("gguf"):
            raise InvalidRequest(f"{Path(source).name} is a GGUF file ({ckpt.storage}): load it with a float "
                                 f"weight_dtype, not {weight_dtype}")
        config, tensors, scales, storage = ckpt.config, ckpt.tensors, ckpt.scales, ckpt.storage
        if fp8 is not None and storage == "float":
            storage = weight_dtype
    else:
        config, tensors = read_checkpoint(source, "cpu")
        scales, storage = {}, weight_dtype
    keep_half = isinstance(source, str) and Path(source).suffix == ".gguf"
    module = build_quantized(config, tensors, scales, fp8=fp8, dtype=dtype, device=device, keep_half=keep_half)
    if keep_half:
        storage = "gguf " + storage_of_module(module, "F32")
    log.info("%s: %s weights, compute in %s, %.1f MB resident", Path(source).name, storage, dtype,
             resident_bytes(module) / 1e6)
    return config, module, dtype, storage


# ----------------------------------------------------------------- writing quantised files (tests, measurements)
#: formats ``write_quantized_checkpoint`` writes
FILE_FORMATS = ("fp8_e4m3fn", "fp8_e5m2", "scaled_fp8", "gguf:F16", "gguf:Q8_0", "gguf:Q5_0", "gguf:Q4_0",
                "gguf:Q4_K", "gguf:Q5_K", "gguf:Q6_K")


def write_quantized_checkpoint(family: str, fmt: str, path: str | Path, *, sd: dict | None = None,
                               seed: int = 0) -> Path:
    """Write a model (``sd``: diffusers-named weights; default the tiny model of ``family``) the way
    users receive quantised files: fp8 and scaled-fp8 safetensors in ComfyUI's prefixed layout
    (FLUX) or the SD3 single-file layout, GGUF in the same layouts without the prefix. Matrices
    are quantised; vectors stay float, as ComfyUI's and ComfyUI-GGUF's tools leave them."""
    from safetensors.torch import save_file

    from .convert import from_diffusers
    from .gguf import write_gguf
    from .tiny import tiny_state_dict

    if fmt not in FILE_FORMATS:
        raise InvalidRequest(f"unknown quantised format {fmt!r} (known: {', '.join(FILE_FORMATS)})")
    if sd is None:
        _, sd = tiny_state_dict(family, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt.startswith("gguf:"):
        orig = from_diffusers(family, sd, "bfl" if family == "flux" else "sd3_single")
        return write_gguf(path.with_suffix(".gguf"), orig, arch=family, qtype=fmt[5:])
    orig = from_diffusers(family, sd, "comfy" if family == "flux" else "sd3_single")
    prefix = COMFY_PREFIX if family == "flux" else ""
    out = {}
    for key, t in orig.items():
        if t.ndim != 2 or not key.endswith(".weight"):
            out[key] = t.contiguous()
        elif fmt == "scaled_fp8":
            scale = t.abs().amax().float().clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max
            out[key] = (t.float() / scale).to(torch.float8_e4m3fn).contiguous()
            out[key[: -len(".weight")] + ".scale_weight"] = scale.reshape(())
        else:
            out[key] = t.to(FP8_FORMATS[fmt]).contiguous()
    if fmt == "scaled_fp8":
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    target = path.with_suffix(".safetensors")
    save_file(out, str(target))
    return target


def predicted_bytes(source: str, weight_dtype: str) -> int:
    """Bytes a quantised model will hold on a worker, from headers only (for the memory budget):
    quantised and fp8 matrices at their stored size, every other tensor at 4 bytes per value (an upper
    bound: fp32 compute on a CPU, bf16 on a GPU)."""
    from .models import PRESETS, read_checkpoint
    from .tiny import model_class, model_kwargs

    fp8 = fp8_of(weight_dtype)
    if source.startswith("random:"):
        preset = source[len("random:"):].partition(":")[0]
        with torch.device("meta"):
            module = model_class(PRESETS[preset])(**model_kwargs(PRESETS[preset]))
        tensors = dict(module.state_dict())
    elif is_quantized_source(source):
        raw, _, _ = _read_raw(source, torch.device("meta"))
        tensors = raw
    else:
        tensors = read_checkpoint(source, "meta")[1]
    total = 0
    for t in tensors.values():
        if isinstance(t, GGUFTensor):
            total += int(t.data.numel())
        elif t.dtype in _FP8_NAMES or (fp8 is not None and t.ndim == 2):
            total += t.numel()
        else:
            total += t.numel() * 4
    return total
