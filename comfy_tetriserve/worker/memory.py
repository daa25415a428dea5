"""Memory of a worker's device: what a loaded model measurably holds, what a file will need, budgets.

``module_bytes`` is the measurement the budget is kept against: the bytes of every distinct
tensor storage a module's parameters and buffers use (on CUDA the pool also sees the allocator's
own count grow by it). ``predicted_bytes`` reads only a checkpoint's header (shapes and dtypes)
and prices it in the dtype it will be cast to, so a load is refused or makes room *before* any
weight is read. ``default_budget_bytes`` is the budget when the operator gives none: a safe
fraction of the device's memory (GPU) or of the machine's RAM shared by its CPU workers.
"""
from __future__ import annotations

import os

import torch

from ..core.residency import parse_budget  # noqa: F401 - re-exported: the pool reads budgets here
from ..errors import InvalidRequest

#: Fractions of memory the default budget grants to weights: the rest is activations, latents,
#: collectives' buffers and (on CPU) everything else on the machine.
GPU_BUDGET_FRACTION = 0.8
CPU_BUDGET_FRACTION = 0.5

def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind ``module``'s parameters and buffers."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_meta:
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def device_memory_bytes(device: torch.device | str) -> int:
    """Total memory of a CUDA device, or the machine's RAM for "cpu"."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def default_budget_bytes(device: str, total_bytes: int, num_sharing: int, fraction: float | None = None) -> int:
    """A worker's budget: ``fraction`` of its device (default 0.8 GPU, 0.5 CPU) split among the
    workers sharing it (CPU workers share the RAM; two ranks on one GPU share it)."""
    if fraction is None:
        fraction = GPU_BUDGET_FRACTION if device.startswith("cuda") else CPU_BUDGET_FRACTION
    return max(1, int(total_bytes * fraction / max(num_sharing, 1)))


#: The LoRA cache (lora.LoraCache) holds at most this share of what the budget leaves outside the
#: weights on a worker (activations, latents and collectives live there too), and never more than
#: ``LORA_CACHE_MAX_BYTES``.
LORA_CACHE_HEADROOM_FRACTION = 0.25
LORA_CACHE_MAX_BYTES = 4 << 30


def lora_cache_bytes(total_bytes: int, num_sharing: int, budget_bytes: int) -> int:
    """The LoRA cache's limit on a worker: a quarter of its share of the device outside its weight
    budget, at most 4 GiB (default budgets: 80 GB GPU 4 GB, 141 GB 4 GiB, 24 GB 1.2 GB; a 95 % budget
    on 80 GB: 1 GB). Without a known device size (0): the 4 GiB."""
    if total_bytes <= 0:
        return LORA_CACHE_MAX_BYTES
    headroom = total_bytes / max(num_sharing, 1) - budget_bytes
    return max(0, min(LORA_CACHE_MAX_BYTES, int(LORA_CACHE_HEADROOM_FRACTION * headroom)))


def predicted_bytes(source: str, dtype: str | torch.dtype) -> int:
    """Bytes the weights of ``source`` will take once cast to ``dtype`` (read from headers only).

    Raises InvalidRequest naming the file and what is wrong with it (missing, unreadable header,
    not a FLUX/SD3 transformer).
    """
    from .models import PRESETS, parse_dtype, read_checkpoint
    from .quant import FP8_FORMATS, is_quantized_source
    from .tiny import model_class, model_kwargs

    if isinstance(dtype, str) and (dtype in FP8_FORMATS or (not source.startswith("random:")
                                                            and is_quantized_source(source))):
        from .quant import predicted_bytes as quantized_bytes  # GGUF / fp8: stored sizes (worker/quant.py)

        return quantized_bytes(source, dtype)
    dt = parse_dtype(dtype)
    width = torch.finfo(dt).bits // 8
    if source.startswith("random:"):
        preset = source[len("random:"):].partition(":")[0]
        if preset not in PRESETS:
            raise InvalidRequest(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        with torch.device("meta"):
            module = model_class(PRESETS[preset])(**model_kwargs(PRESETS[preset]))
        tensors = list(module.parameters()) + list(module.buffers())
    else:
        try:
            _, sd = read_checkpoint(source, "meta")
        except InvalidRequest:
            raise
        except Exception as exc:  # noqa: BLE001 - a corrupt header: say which file and why
            raise InvalidRequest(f"{source}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from None
        tensors = list(sd.values())
    return sum(t.numel() * (width if t.is_floating_point() else t.element_size()) for t in tensors)
