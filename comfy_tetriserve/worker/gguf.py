"""GGUF checkpoints: reading them (the ``gguf`` package), dequantising their blocks in torch, writing them.

A GGUF DiT file (the layout ComfyUI-GGUF users hold, e.g. ``flux1-dev-Q4_K_S.gguf``) stores the same
tensors under the same names as the BFL FLUX or SD3 single file (with or without ComfyUI's
``model.diffusion_model.`` prefix), each in its own GGML type: norms and small vectors as F32/F16,
the large matrices quantised in blocks along the last (input) dimension. A quantised tensor of
logical shape ``[rows, cols]`` is held here as ``uint8 [rows, cols / block * block_bytes]``: whole
rows stay whole, so splitting fused q/k/v projections into diffusers' modules is a row slice of
the bytes, and the weights stay quantised in memory (``quant.QuantLinear`` dequantises one layer
at a time).

Block layouts (GGML's, from the format's definition; d, dmin are float16 scales):

- ``Q8_0``  32 values: d, int8 q[32]; x = d q.
- ``Q4_0``  32 values: d, 16 bytes of nibbles (low nibbles: values 0-15, high: 16-31); x = d (q - 8).
- ``Q5_0``  32 values: d, 32 high bits (uint32 LE), the nibbles as Q4_0; x = d (q + 16 h - 16).
- ``Q4_K`` 256 values: d, dmin, 12 bytes of eight 6-bit (scale, min) pairs, 128 bytes of nibbles;
  sub-block s of 32 values: x = d sc_s q - dmin m_s; bytes 32c..32c+31 hold sub-blocks 2c (low
  nibbles) and 2c+1 (high nibbles).
- ``Q5_K`` 256 values: d, dmin, 12 scale bytes, 32 bytes of high bits (bit s of byte l: value l of
  sub-block s), 128 bytes of nibbles as Q4_K; q = nibble + 16 h.
- ``Q6_K`` 256 values: 128 bytes low nibbles, 64 bytes of 2-bit highs, int8 scales[16], d;
  two halves of 128 values; x = d sc q with q in [-32, 31], one scale per 16 values.

``encode`` writes blocks of every supported type from float weights (the package quantises only
some of them); tests check ``dequantize`` against ``gguf.quants.dequantize``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidRequest

#: GGML type name -> (values per block, bytes per block)
BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q8_0": (32, 34), "Q4_0": (32, 18), "Q5_0": (32, 22),
    "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
QUANT_TYPES = tuple(t for t in BLOCKS if t not in FLOAT_TYPES)


def row_bytes(qtype: str, cols: int) -> int:
    per, nbytes = BLOCKS[qtype]
    if cols % per:
        raise InvalidRequest(f"{qtype}: a row of {cols} values is not a whole number of {per}-value blocks")
    return cols // per * nbytes


# ----------------------------------------------------------------- dequantisation
def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 (little endian) -> [...] float32."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = qs.to(torch.int16)
    return q & 0x0F, q >> 4


def _bits(b: torch.Tensor, n: int) -> torch.Tensor:
    """[..., k] uint8 -> [..., 8k] 0/1 int16, bit j of the little-endian bit string at position j."""
    shifts = torch.arange(8, device=b.device, dtype=torch.int16)
    return ((b.to(torch.int16).unsqueeze(-1) >> shifts) & 1).reshape(*b.shape[:-1], 8 * b.shape[-1])[..., :n]


def _k_scales(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> eight 6-bit scales and eight 6-bit mins ([..., 8] each)."""
    s = sc.to(torch.int16)
    lo_sc, lo_m = s[..., 0:4] & 63, s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    hi_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], -1), torch.cat([lo_m, hi_m], -1)


def _deq_blocks(qtype: str, blk: torch.Tensor) -> torch.Tensor:
    """[N, block_bytes] uint8 -> [N, values_per_block] float32."""
    if qtype == "Q8_0":
        return _f16(blk[:, :2].unsqueeze(1)).view(-1, 1) * blk[:, 2:].contiguous().view(torch.int8).float()
    if qtype == "Q4_0":
        lo, hi = _nibbles(blk[:, 2:])
        return _f16(blk[:, None, :2]) * (torch.cat([lo, hi], -1) - 8).float()
    if qtype == "Q5_0":
        h = _bits(blk[:, 2:6], 32)
        lo, hi = _nibbles(blk[:, 6:])
        return _f16(blk[:, None, :2]) * (torch.cat([lo, hi], -1) + 16 * h - 16).float()
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blk[:, None, 0:2]), _f16(blk[:, None, 2:4])
        sc, m = _k_scales(blk[:, 4:16])
        qs = blk[:, 16:144] if qtype == "Q4_K" else blk[:, 48:176]
        lo, hi = _nibbles(qs.reshape(-1, 4, 32))
        q = torch.stack([lo, hi], 2).reshape(-1, 8, 32)  # sub-block 2c: low nibbles of chunk c, 2c+1: high
        if qtype == "Q5_K":
            h = _bits(blk[:, 16:48], 256).reshape(-1, 32, 8).transpose(1, 2)  # bit s of byte l -> [s, l]
            q = q + 16 * h
        return (d * sc.float()).unsqueeze(-1).mul(q.float()).sub((dmin * m.float()).unsqueeze(-1)).reshape(-1, 256)
    if qtype == "Q6_K":
        ql, qh = blk[:, :128].reshape(-1, 2, 64).to(torch.int16), blk[:, 128:192].reshape(-1, 2, 32).to(torch.int16)
        scales = blk[:, 192:208].contiguous().view(torch.int8).float().reshape(-1, 2, 8)
        d = _f16(blk[:, None, 208:210]).unsqueeze(-1)
        parts = [(ql[..., :32] & 15) | ((qh & 3) << 4), (ql[..., 32:] & 15) | (((qh >> 2) & 3) << 4),
                 (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4), (ql[..., 32:] >> 4) | (((qh >> 6) & 3) << 4)]
        q = torch.stack(parts, 2).float() - 32  # [N, half, 4 x 32]
        q = q.reshape(-1, 2, 8, 16) * scales.unsqueeze(-1)
        return (d.unsqueeze(-1) * q).reshape(-1, 256)
    raise InvalidRequest(f"unsupported GGUF quant type {qtype} (supported: {', '.join(BLOCKS)})")


def dequantize(qtype: str, data: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The float tensor of ``shape`` that ``data`` (uint8 [rows, row_bytes]) encodes, in ``dtype``."""
    if qtype in FLOAT_TYPES:
        return data.contiguous().view(FLOAT_TYPES[qtype]).reshape(shape).to(dtype)
    _, nbytes = BLOCKS[qtype] if qtype in BLOCKS else (0, 0)
    if not nbytes:
        raise InvalidRequest(f"unsupported GGUF quant type {qtype} (supported: {', '.join(BLOCKS)})")
    return _deq_blocks(qtype, data.reshape(-1, nbytes)).reshape(shape).to(dtype)


# ----------------------------------------------------------------- reading
def read_gguf(path: str | Path, meta: bool = False) -> tuple[dict[str, "torch.Tensor | GGUFTensor"], dict[str, str]]:
    """(tensors by name, metadata strings) of a GGUF file; float tensors come back as torch
    tensors of their logical shape, quantised ones as ``GGUFTensor`` (bytes, type, shape).
    With ``meta`` the tensors are on the meta device (shapes and types only, nothing read)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - a file the package cannot parse
        raise InvalidRequest(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    info = {}
    for name, fld in reader.fields.items():
        if name.startswith("general.") and fld.types and fld.types[0] == gguf.GGUFValueType.STRING:
            info[name] = bytes(fld.parts[fld.data[0]]).decode("utf-8", "replace")
    out: dict[str, torch.Tensor | GGUFTensor] = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        if qtype not in BLOCKS:
            raise InvalidRequest(f"{Path(path).name}: tensor {t.name} has GGUF quant type {qtype}, which is not "
                                 f"supported (supported: {', '.join(BLOCKS)})")
        if meta:
            raw = torch.empty(int(t.n_bytes), dtype=torch.uint8, device="meta")
        else:
            raw = torch.from_numpy(np.ascontiguousarray(t.data).view(np.uint8).reshape(-1).copy())
        if qtype in FLOAT_TYPES:
            out[t.name] = raw.view(FLOAT_TYPES[qtype]).reshape(shape)
        else:
            rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            out[t.name] = GGUFTensor(raw.reshape(rows, row_bytes(qtype, shape[-1])), qtype, shape)
    return out, info


class GGUFTensor:
    """A quantised tensor: ``data`` uint8 [rows, row_bytes] of GGML ``qtype`` blocks, logical ``shape``."""

    __slots__ = ("data", "qtype", "shape")

    def __init__(self, data: torch.Tensor, qtype: str, shape: tuple[int, ...]) -> None:
        self.data, self.qtype, self.shape = data, qtype, tuple(shape)

    def rows(self, index: torch.Tensor | slice) -> "GGUFTensor":
        data = self.data[index]
        return GGUFTensor(data, self.qtype, (data.shape[0], *self.shape[1:]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qtype, self.data, self.shape, dtype)


# ----------------------------------------------------------------- encoding (writing test and user files)
def _half(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape, 2)


def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """eight 6-bit scales and mins [N, 8] -> [N, 12] bytes (inverse of ``_k_scales``)."""
    out = np.zeros((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return out


def _encode_k_affine(x: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Q4_K/Q5_K: per sub-block of 32 an affine map onto 0..levels with 6-bit scale and min."""
    sub = x.reshape(-1, 8, 32)
    lo = np.minimum(sub.min(-1), 0.0)
    scale = (sub.max(-1) - lo) / levels
    d = np.maximum(scale.max(-1), 1e-12) / 63
    dmin = np.maximum((-lo).max(-1), 1e-12) / 63
    d, dmin = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(-lo / dmin[:, None]), 0, 63).astype(np.uint8)
    step, off = d[:, None] * sc, dmin[:, None] * m
    q = np.clip(np.round((sub + off[..., None]) / step[..., None]), 0, levels).astype(np.uint8)
    return d, dmin, sc, m, q


def encode(qtype: str, x: np.ndarray) -> np.ndarray:
    """float weights [..., cols] -> uint8 [..., row_bytes] GGML blocks of ``qtype``."""
    import gguf

    x = np.asarray(x, np.float32)
    lead = x.shape[:-1]
    if qtype in FLOAT_TYPES:
        np_dt = {"F32": np.float32, "F16": np.float16}.get(qtype)
        if np_dt is None:
            return torch.from_numpy(x).to(torch.bfloat16).view(torch.uint8).numpy().reshape(*lead, -1)
        return x.astype(np_dt).view(np.uint8).reshape(*lead, -1)
    row_bytes(qtype, x.shape[-1])
    if qtype in ("Q8_0", "Q4_0", "Q5_0"):
        return gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])
    blocks = x.reshape(-1, 256)
    if qtype == "Q4_K":
        d, dmin, sc, m, q = _encode_k_affine(blocks, 15)
        qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # sub-blocks (2c, 2c+1) share bytes 32c..
        out = np.concatenate([_half(d), _half(dmin), _pack_k_scales(sc, m), qs], -1)
    elif qtype == "Q5_K":
        d, dmin, sc, m, q = _encode_k_affine(blocks, 31)
        nib, high = q & 15, q >> 4
        qs = (nib[:, 0::2] | (nib[:, 1::2] << 4)).reshape(-1, 128)
        qh = (high.transpose(0, 2, 1).astype(np.uint16) << np.arange(8, dtype=np.uint16)).sum(-1).astype(np.uint8)
        out = np.concatenate([_half(d), _half(dmin), _pack_k_scales(sc, m), qh, qs], -1)
    elif qtype == "Q6_K":
        sub = blocks.reshape(-1, 16, 16)
        amax = np.abs(sub).max(-1)
        scale = amax / 31
        d = np.maximum(scale.max(-1), 1e-12) / 127
        d = d.astype(np.float16).astype(np.float32)
        sc = np.clip(np.round(scale / d[:, None]), 1, 127).astype(np.int8)
        step = d[:, None] * sc
        q = (np.clip(np.round(sub / step[..., None]), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
        ql = np.concatenate([(q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4), (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)], -1)
        qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
        out = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), _half(d)], -1)
    else:
        raise InvalidRequest(f"unsupported GGUF quant type {qtype} (supported: {', '.join(BLOCKS)})")
    return out.astype(np.uint8).reshape(*lead, -1)


def write_gguf(path: str | Path, tensors: dict[str, torch.Tensor], *, arch: str, qtype: str = "Q8_0",
               keep_float: tuple[str, ...] = ()) -> Path:
    """Write ``tensors`` as a GGUF file: 2-D weights whose rows are whole blocks as ``qtype``, the
    rest (and names containing any of ``keep_float``) as F32, as ComfyUI-GGUF's converter does."""
    import gguf

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    per = BLOCKS[qtype][0]
    for name, t in tensors.items():
        x = t.detach().float().cpu().numpy()
        quantise = (t.ndim == 2 and x.shape[-1] % per == 0 and not any(s in name for s in keep_float))
        if quantise:
            writer.add_tensor(name, encode(qtype, x), raw_dtype=gguf.GGMLQuantizationType[qtype])
        else:
            writer.add_tensor(name, x, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
