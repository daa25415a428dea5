"""What one model evaluation may reuse or needs beside its tensors: small caches and the text mask.

- ``LruCache``: a bounded cache (FLUX rotary embeddings per latent size, text length, degree and
  rank; captured CUDA graphs per step shape).
- ``padded_lengths`` / ``joint_key_mask``: rows of one batched forward whose text lengths differ
  (cond and uncond of CFG, or several requests) are padded to the longest; the padded text
  tokens are masked out as attention keys. Every other layer is token-wise, so each row's image
  tokens equal those of its own unpadded forward (the padded tokens' own outputs are dropped).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from ..errors import InvalidRequest

ROPE_CACHE_SIZE = 32  # latent sizes x text lengths x (degree, rank) a worker keeps


class LruCache:
    """A dict bounded to ``size`` entries; the least recently used one goes first."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("cache size must be >= 1")
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item

    def put(self, key: Hashable, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def keys(self) -> list[Hashable]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()


def padded_lengths(text_lengths: Sequence[int] | None, batch: int, num_text: int) -> tuple[int, ...] | None:
    """The valid text tokens per row, or None when no row is padded (no mask needed)."""
    if text_lengths is None:
        return None
    lengths = tuple(int(n) for n in text_lengths)
    if len(lengths) != batch:
        raise InvalidRequest(f"{len(lengths)} text lengths for a batch of {batch}")
    if any(n < 1 or n > num_text for n in lengths):
        raise InvalidRequest(f"text lengths {lengths} must lie in 1..{num_text}")
    return None if all(n == num_text for n in lengths) else lengths


_MASKS = LruCache(64)


def joint_key_mask(text_sizes: Sequence[int], image_sizes: Sequence[int], lengths: Sequence[int],
                   text_first: bool, device: torch.device) -> torch.Tensor:
    """``build_key_mask``, kept per argument tuple: built once (a host-to-device copy, which a CUDA
    graph capture must not contain: the capture's warm-up runs build it), reused after."""
    key = (tuple(text_sizes), tuple(image_sizes), tuple(lengths), text_first, str(device))
    mask = _MASKS.get(key)
    if mask is None:
        mask = build_key_mask(text_sizes, image_sizes, lengths, text_first, device)
        _MASKS.put(key, mask)
    return mask


def build_key_mask(text_sizes: Sequence[int], image_sizes: Sequence[int], lengths: Sequence[int],
                   text_first: bool, device: torch.device) -> torch.Tensor:
    """[B, 1, 1, N] bool (True: attend) over the keys of a joint attention as its kernel sees them.

    The keys are the ranks' shards in rank order, each [text shard, image shard] (``text_first``,
    FLUX) or [image shard, text shard] (SD3); rank r's text shard holds the padded text positions
    ``sum(text_sizes[:r])`` onwards. A text key is valid where its position < the row's length.
    """
    parts, start = [], 0
    lengths_t = torch.tensor(list(lengths), device=device).view(-1, 1)
    for nt, ni in zip(text_sizes, image_sizes):
        text = torch.arange(start, start + nt, device=device).view(1, -1) < lengths_t
        image = torch.ones(len(lengths), ni, dtype=torch.bool, device=device)
        parts.extend([text, image] if text_first else [image, text])
        start += nt
    return torch.cat(parts, dim=1)[:, None, None, :]
