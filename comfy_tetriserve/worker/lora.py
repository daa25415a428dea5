"""LoRA per job on shared weights: unfused low-rank terms on the patched Linear layers.

A LoRA file is read once per worker (``LoraCache``) and mapped onto the loaded model's Linear
layers (diffusers names). A job's stack ``[(file, strength), ...]`` is applied for the forwards of
that job only (``applied``): each targeted layer gets a forward hook that adds

    strength * (alpha / rank) * (x @ down.T) @ up.T      (low-rank pairs)
    strength * (x @ diff.T + diff_b)                      (full deltas)

to its output. The base weights (float or quantised) are never modified, nothing is reloaded, and
the next job's forward can carry a different stack. The layers are token-local (each token's
output depends on that token's input only), so under Ulysses a rank that holds a token shard
computes exactly the rows the full forward would: sequence parallelism is unaffected.

Key formats (what ComfyUI's LoRA loader accepts for FLUX and SD3):

- kohya / ComfyUI: ``<name>.lora_up.weight``, ``<name>.lora_down.weight``, ``<name>.alpha``, with
  ``<name>`` ``lora_unet_<original name, dots as underscores>`` or ``lora_transformer_<diffusers
  name, dots as underscores>``;
- diffusers / PEFT: ``<name>.lora_A.weight``, ``<name>.lora_B.weight`` (and ``.lora.down/up``),
  ``<name>`` a diffusers module name after ``transformer.`` / ``base_model.model.``;
- BFL / ComfyUI: ``diffusion_model.<original name>`` (also ``model.diffusion_model.``) with any of
  the above suffixes;
- full deltas: ``<name>.diff`` (weight) and ``<name>.diff_b`` (bias).

An original-layout name may cover several diffusers layers (FLUX's fused q/k/v ``qkv`` and single
``linear1``; SD3's ``qkv``): its rows are split onto them exactly as the checkpoint converter
splits weights (convert.py, traced row by row with ``quant.row_sources``).

Errors: a LoRA for the other family, one whose keys match no layer (how many matched), and keys
that match nothing or cannot be applied (non-Linear targets, shape mismatches) are reported: the
first two as errors, the rest as a warning that lists them (``LoraPatch.skipped``).
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InvalidRequest

log = logging.getLogger(__name__)

_PAIR_SUFFIXES = (  # (down, up) spellings
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_A.default.weight", ".lora_B.default.weight"),
    (".lora.down.weight", ".lora.up.weight"),
)
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.")
_UNDERSCORE_PREFIXES = ("lora_unet_", "lora_transformer_")
_FAMILY_MARKERS = {"flux": ("double_blocks", "single_blocks", "single_transformer_blocks"),
                   "sd3": ("joint_blocks", "x_block", "context_block")}


# ----------------------------------------------------------------- the model's targets
@dataclass(frozen=True)
class Segment:
    """Rows ``src_rows`` of a LoRA target feed rows ``dst_rows`` of the diffusers layer ``module``."""

    module: str
    src_rows: torch.Tensor
    dst_rows: torch.Tensor
    full: bool  # the target is exactly this layer, rows in order


@dataclass(frozen=True)
class Targets:
    """Every name a LoRA may use for the model's Linear layers -> the layer(s) and rows it means."""

    family: str
    shapes: dict  # diffusers Linear name -> (out, in)
    names: dict  # name (original or diffusers, dotted) -> tuple[Segment, ...]
    underscored: dict  # the same names with dots as underscores


def linear_shapes(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    from .quant import QuantLinear

    out = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            out[name] = (int(m.out_features), int(m.in_features))
        elif isinstance(m, QuantLinear):
            out[name] = (m.out_features, m.in_features)
    return out


def build_targets(family: str, shapes: dict[str, tuple[int, int]], all_shapes: dict[str, tuple]) -> Targets:
    """Names of the Linear layers in diffusers' and in the original single-file layout.

    ``all_shapes``: every diffusers weight key -> shape (the original layout needs all of them)."""
    from .convert import from_diffusers
    from .quant import row_sources

    names: dict[str, tuple[Segment, ...]] = {}
    for name, (rows, _) in shapes.items():
        idx = torch.arange(rows)
        names[name] = (Segment(name, idx, idx, True),)
    layout = "bfl" if family == "flux" else "sd3_single"
    try:
        sources = row_sources(all_shapes, lambda tags: from_diffusers(family, tags, layout))
    except InvalidRequest:
        sources = {}
    for key, (src_keys, src_rows) in sources.items():
        if not key.endswith(".weight"):
            continue
        orig = key[: -len(".weight")]
        segs = []
        for dkey in dict.fromkeys(src_keys):
            module = dkey[: -len(".weight")] if dkey.endswith(".weight") else None
            if module not in shapes:
                break
            pos = torch.tensor([i for i, k in enumerate(src_keys) if k == dkey])
            segs.append(Segment(module, pos, src_rows[pos], False))
        else:
            if segs and orig not in names:
                names[orig] = tuple(segs)
    underscored = {k.replace(".", "_"): v for k, v in names.items()}
    return Targets(family, dict(shapes), names, underscored)


def targets_of_model(model) -> Targets:
    """Targets of a LoadedModel (cached on it)."""
    cached = getattr(model, "_lora_targets", None)
    if cached is None:
        shapes = linear_shapes(model.module)
        all_shapes = {k: tuple(v.shape) for k, v in model.module.state_dict().items()}
        for name, (o, i) in shapes.items():  # quantised layers: their logical weight shape
            all_shapes[name + ".weight"] = (o, i)
            all_shapes.pop(name + ".qweight", None)
            all_shapes.pop(name + ".scale", None)
        cached = build_targets(model.family, shapes, all_shapes)
        model._lora_targets = cached
    return cached


def targets_of_config(config: dict) -> Targets:
    """Targets of a model config without weights (meta module): what the service checks a LoRA against."""
    from .models import family_of
    from .tiny import model_class, model_kwargs

    with torch.device("meta"):
        module = model_class(config)(**model_kwargs(config))
    shapes = linear_shapes(module)
    return build_targets(family_of(config), shapes, {k: tuple(v.shape) for k, v in module.state_dict().items()})


# ----------------------------------------------------------------- parsing a file
@dataclass
class Term:
    """Per diffusers layer: low-rank pairs (down [r, in], up [out, r], scale) and full deltas."""

    pairs: list = field(default_factory=list)
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None


@dataclass
class LoraPatch:
    """A LoRA file mapped onto one model."""

    path: str
    terms: dict[str, Term]  # diffusers module name -> its terms
    matched: int  # LoRA modules that found a layer
    total: int  # LoRA modules in the file
    skipped: tuple[str, ...] = ()  # LoRA modules that matched nothing or could not be applied

    def nbytes(self) -> int:
        n = 0
        for t in self.terms.values():
            for d, u, _ in t.pairs:
                n += d.numel() * d.element_size() + u.numel() * u.element_size()
            for x in (t.diff, t.diff_b):
                n += 0 if x is None else x.numel() * x.element_size()
        return n


def _group(keys) -> dict[str, dict[str, str]]:
    """LoRA module name -> {part: key} for part in down, up, alpha, diff, diff_b."""
    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        for down, up in _PAIR_SUFFIXES:
            for part, suffix in (("down", down), ("up", up)):
                if key.endswith(suffix):
                    groups.setdefault(key[: -len(suffix)], {})[part] = key
                    break
            else:
                continue
            break
        else:
            for part, suffix in (("alpha", ".alpha"), ("diff_b", ".diff_b"), ("diff", ".diff")):
                if key.endswith(suffix):
                    groups.setdefault(key[: -len(suffix)], {})[part] = key
                    break
            else:
                groups.setdefault(key, {})["unknown"] = key
    return groups


def lora_family(names) -> str | None:
    """The family a LoRA's module names point to, or None when they could be either."""
    text = " ".join(names)
    hits = {fam for fam, marks in _FAMILY_MARKERS.items() if any(m in text for m in marks)}
    return hits.pop() if len(hits) == 1 else None


def _resolve(name: str, targets: Targets) -> tuple[Segment, ...] | None:
    for prefix in _UNDERSCORE_PREFIXES:
        if name.startswith(prefix):
            return targets.underscored.get(name[len(prefix):])
    bare = name
    for prefix in _PREFIXES:
        if bare.startswith(prefix):
            bare = bare[len(prefix):]
            break
    return targets.names.get(bare)


def map_lora(path: str, sd: dict[str, torch.Tensor], targets: Targets, *, family_hint: str | None = None) -> LoraPatch:
    """The LoRA state dict ``sd`` mapped onto ``targets`` (tensors kept as given; see ``LoraPatch``)."""
    name = Path(path).name
    groups = _group(sd)
    fam = family_hint or lora_family(groups)
    if fam is not None and fam != targets.family:
        raise InvalidRequest(f"LoRA {name} is for {fam.upper()} models (its keys name {fam} blocks); "
                             f"the model is {targets.family.upper()}")
    terms: dict[str, Term] = {}
    skipped, matched = [], 0
    for mod, parts in groups.items():
        segs = _resolve(mod, targets)
        if segs is None or "unknown" in parts:
            skipped.append(mod)
            continue
        try:
            _add(terms, segs, parts, sd, targets)
        except ValueError as exc:
            skipped.append(f"{mod} ({exc})")
            continue
        matched += 1
    if matched == 0:
        raise InvalidRequest(f"LoRA {name}: none of its {len(groups)} modules match a layer of the "
                             f"{targets.family.upper()} model (0 matched; e.g. {sorted(groups)[:3]})")
    if skipped:
        log.warning("LoRA %s: %d of %d modules not applied: %s", name, len(skipped), len(groups), skipped[:20])
    return LoraPatch(str(path), terms, matched, len(groups), tuple(skipped))


def _add(terms: dict[str, Term], segs, parts: dict[str, str], sd, targets: Targets) -> None:
    rows_total = sum(len(s.src_rows) for s in segs)
    if "down" in parts or "up" in parts:
        if "down" not in parts or "up" not in parts:
            raise ValueError("a low-rank pair without its other half")
        down, up = sd[parts["down"]].float(), sd[parts["up"]].float()
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"not a linear low-rank pair (down {list(down.shape)}, up {list(up.shape)})")
        if up.shape[0] != rows_total:
            raise ValueError(f"up has {up.shape[0]} rows, the layer {rows_total}")
        rank = down.shape[0]
        alpha = float(sd[parts["alpha"]]) if "alpha" in parts else float(rank)
        for s in segs:
            out, inp = targets.shapes[s.module]
            if down.shape[1] != inp:
                raise ValueError(f"down has {down.shape[1]} inputs, {s.module} {inp}")
            u = up if s.full or up.is_meta else torch.zeros(out, rank).index_copy_(0, s.dst_rows, up[s.src_rows])
            terms.setdefault(s.module, Term()).pairs.append((down, u, alpha / rank))
    for part in ("diff", "diff_b"):
        if part not in parts:
            continue
        d = sd[parts[part]].float()
        if d.shape[0] != rows_total or (part == "diff" and d.ndim != 2) or (part == "diff_b" and d.ndim != 1):
            raise ValueError(f".{part} of shape {list(d.shape)} does not fit {rows_total} rows")
        for s in segs:
            out, inp = targets.shapes[s.module]
            if part == "diff" and d.shape[1] != inp:
                raise ValueError(f".diff has {d.shape[1]} inputs, {s.module} {inp}")
            shape = (out, inp) if part == "diff" else (out,)
            piece = d if s.full or d.is_meta else torch.zeros(shape).index_copy_(0, s.dst_rows, d[s.src_rows])
            term = terms.setdefault(s.module, Term())
            prev = getattr(term, part)
            setattr(term, part, piece if prev is None or piece.is_meta else prev + piece)


def read_lora_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    p = Path(path)
    if p.suffix not in (".safetensors", ".sft"):
        raise InvalidRequest(f"LoRA {p.name}: only .safetensors LoRA files are read")
    try:
        return load_file(str(p))
    except Exception as exc:  # noqa: BLE001
        raise InvalidRequest(f"LoRA {p.name} is not a readable safetensors file ({exc})") from None


def lora_keys(path: str) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    except Exception as exc:  # noqa: BLE001
        raise InvalidRequest(f"LoRA {Path(path).name} is not a readable safetensors file ({exc})") from None


def check_lora(path: str, targets: Targets) -> tuple[int, int, tuple[str, ...]]:
    """(matched, total, skipped) of a LoRA against a model, from its keys and shapes (no weights read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        sd = {k: torch.empty(fh.get_slice(k).get_shape(), device="meta") for k in fh.keys()}
    # alpha values are needed for nothing here; give them a real zero-dim value
    sd = {k: (torch.ones(()) if k.endswith(".alpha") else v) for k, v in sd.items()}
    patch = map_lora(path, sd, targets)
    return patch.matched, patch.total, patch.skipped


# ----------------------------------------------------------------- the per-worker cache and application
class LoraCache:
    """LoRA files mapped onto models, kept on the device; least recently used dropped past ``max_bytes``."""

    def __init__(self, max_bytes: int = 4 << 30) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, LoraPatch] = OrderedDict()
        self._lock = threading.Lock()
        self._combined: OrderedDict[tuple, dict] = OrderedDict()
        self.num_reads = 0

    def get(self, model, path: str) -> LoraPatch:
        st = os.stat(path)
        key = (id(model), model.name, path, st.st_mtime_ns, st.st_size)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        patch = map_lora(path, read_lora_tensors(path), targets_of_model(model))
        patch = _to(patch, model.device, model.dtype)
        self.num_reads += 1
        with self._lock:
            self._entries[key] = patch
            self._trim()
        return patch

    def set_limit(self, max_bytes: int) -> None:
        """A new limit; least recently used files go at once until the rest fits."""
        with self._lock:
            self.max_bytes = max(0, int(max_bytes))
            self._trim()

    def _trim(self) -> None:
        """Under the lock: drop least recently used files past ``max_bytes`` (the newest always stays,
        so a job whose LoRA alone exceeds the limit still runs)."""
        while len(self._entries) > 1 and sum(p.nbytes() for p in self._entries.values()) > self.max_bytes:
            self._entries.popitem(last=False)
            self._combined.clear()

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self._entries.values())

    def combined(self, model, stack: tuple[tuple[str, float], ...]) -> dict[str, Combined]:
        """``combine`` of a job's stack (file paths, strengths) on ``model``; the last few are kept."""
        patches = [(self.get(model, path), s) for path, s in stack]
        key = (id(model), tuple((id(p), s) for p, s in patches))
        with self._lock:
            hit = self._combined.get(key)
        if hit is None:
            hit = combine(patches)
            with self._lock:
                self._combined[key] = hit
                while len(self._combined) > 8:
                    self._combined.popitem(last=False)
        return hit


def _to(patch: LoraPatch, device, dtype) -> LoraPatch:
    def mv(t):
        return None if t is None else t.to(device=device, dtype=dtype).contiguous()

    terms = {m: Term([(mv(d), mv(u), s) for d, u, s in t.pairs], mv(t.diff), mv(t.diff_b)) for m, t in patch.terms.items()}
    return LoraPatch(patch.path, terms, patch.matched, patch.total, patch.skipped)


@dataclass(frozen=True)
class Combined:
    """A stack's terms on one layer, folded for one forward: every low-rank pair concatenated into one
    (down [R, in], up [out, R] with each pair's alpha / rank x strength folded into its columns), the
    full deltas summed with their strengths. Two small matmuls per layer, whatever the stack."""

    down: torch.Tensor | None
    up: torch.Tensor | None
    diff: torch.Tensor | None
    diff_b: torch.Tensor | None


def combine(stack: list[tuple[LoraPatch, float]]) -> dict[str, Combined]:
    per_layer: dict[str, list[tuple[Term, float]]] = {}
    for patch, strength in stack:
        if strength == 0:
            continue
        for name, term in patch.terms.items():
            per_layer.setdefault(name, []).append((term, float(strength)))
    out = {}
    for name, entries in per_layer.items():
        downs = [d for term, _ in entries for d, _, _ in term.pairs]
        ups = [u * (scale * strength) for term, strength in entries for _, u, scale in term.pairs]
        diffs = [term.diff * strength for term, strength in entries if term.diff is not None]
        biases = [term.diff_b * strength for term, strength in entries if term.diff_b is not None]
        out[name] = Combined(torch.cat(downs) if downs else None, torch.cat(ups, dim=1) if ups else None,
                             sum(diffs[1:], diffs[0]) if diffs else None, sum(biases[1:], biases[0]) if biases else None)
    return out


def _hook(c: Combined):
    def hook(module, args, output):
        x = args[0]
        flat_x = x.reshape(-1, x.shape[-1])
        flat = output.view(-1, output.shape[-1])  # the layer's own fresh output, updated in place
        if c.down is not None:
            flat.addmm_(torch.nn.functional.linear(flat_x, c.down.to(x.dtype)), c.up.to(output.dtype).t())
        if c.diff is not None:
            flat.addmm_(flat_x, c.diff.to(output.dtype).t())
        if c.diff_b is not None:
            flat.add_(c.diff_b.to(output.dtype))
        return output
    return hook


@contextmanager
def applied(module: torch.nn.Module, stack: list[tuple[LoraPatch, float]] | dict[str, Combined]):
    """Within the block, ``module``'s targeted layers add the stack's terms to their outputs
    (``stack``: [(patch, strength)], or what ``combine`` made of one)."""
    combined = stack if isinstance(stack, dict) else combine(stack)
    handles = [module.get_submodule(name).register_forward_hook(_hook(c)) for name, c in combined.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def lowrank_flops_per_token(stack: list[tuple[LoraPatch, float]]) -> int:
    """Multiply-adds per token the stack's terms add to a forward (2 x for FLOPs)."""
    n = 0
    for patch, strength in stack:
        if strength == 0:
            continue
        for term in patch.terms.values():
            for d, u, _ in term.pairs:
                n += d.numel() + u.numel()
            if term.diff is not None:
                n += term.diff.numel()
    return n


