"""FLUX image-stream inputs: the packed latent (with Fill's extra channels) and Kontext references.

``flux_image_inputs`` returns the image tokens of one forward and their rotary position ids, laid
out as ComfyUI's Flux model lays them out:

- the latent (with a Fill model's concatenated channels, see sampling/image_cond.py) packed in
  2x2 patches, channel-major inside a patch: token ``(r, c)`` holds ``x[:, ch, 2r + i, 2c + j]`` at
  feature ``4 * ch + 2 * i + j``; ids ``(0, r, c)``;
- each reference latent packed the same way (an odd size padded circularly to the patch) and
  appended after the generated tokens, with ids ``(index, r + row offset, c + column offset)``
  from ``reference_offsets``.

The generated tokens come first, so the model output keeps the first ``num_generated`` tokens.
Every token is independent of the others until attention, so under Ulysses a rank embeds only
its contiguous shard of this joint image sequence (generated and reference tokens alike): the
extra Fill channels ride inside the tokens, the references simply lengthen the sequence.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import InvalidRequest
from ..sampling.image_cond import reference_offsets


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] (H, W even) -> [B, H/2 * W/2, 4C], channel-major inside each 2x2 patch."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def grid_ids(h_tokens: int, w_tokens: int, index: int = 0, row_offset: int = 0, col_offset: int = 0,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """[h * w, 3] position ids (index, row, column) of a token grid, row-major."""
    rows = torch.arange(h_tokens, device=device).repeat_interleave(w_tokens) + row_offset
    cols = torch.arange(w_tokens, device=device).repeat(h_tokens) + col_offset
    return torch.stack([torch.full_like(rows, index), rows, cols], dim=1).float()


def _expand(t: torch.Tensor, b: int, what: str) -> torch.Tensor:
    if t.shape[0] == b:
        return t
    if b % t.shape[0]:
        raise InvalidRequest(f"{what} batch {t.shape[0]} does not divide the latent batch {b}")
    return t.repeat(b // t.shape[0], *([1] * (t.ndim - 1)))


def flux_image_inputs(x: torch.Tensor, concat: torch.Tensor | None = None, refs: Sequence[torch.Tensor] = (),
                      ref_method: str = "offset") -> tuple[torch.Tensor, torch.Tensor, int]:
    """(packed tokens [B, N, 4C'], position ids [N, 3], number of generated tokens) of one forward."""
    b, _, h, w = x.shape
    if concat is not None:
        if concat.shape[0] != b and concat.shape[0] == 1:
            concat = concat.expand(b, -1, -1, -1)
        if concat.shape[0] != b or concat.shape[2:] != x.shape[2:]:
            raise InvalidRequest(f"Fill channels {list(concat.shape)} do not fit the latent {list(x.shape)}")
        x = torch.cat([x, concat.to(x.dtype)], dim=1)
    tokens = [pack(x)]
    ids = [grid_ids(h // 2, w // 2, device=x.device)]
    num_generated = tokens[0].shape[1]
    if refs:
        offsets = reference_offsets((h, w), [(int(r.shape[-2]), int(r.shape[-1])) for r in refs], ref_method)
        for i, (ref, (index, dr, dc)) in enumerate(zip(refs, offsets)):
            if ref.shape[1] != x.shape[1]:
                raise InvalidRequest(f"reference latent {i} has {ref.shape[1]} channels, the model's image tokens "
                                     f"take {x.shape[1]} (a Fill model does not take reference latents)")
            ref = _expand(ref, b, f"reference latent {i}")
            pad_h, pad_w = ref.shape[-2] % 2, ref.shape[-1] % 2
            if pad_h or pad_w:
                ref = F.pad(ref, (0, pad_w, 0, pad_h), mode="circular")
            tokens.append(pack(ref.to(x.dtype)))
            ids.append(grid_ids(ref.shape[-2] // 2, ref.shape[-1] // 2, index, dr, dc, device=x.device))
    packed = tokens[0] if len(tokens) == 1 else torch.cat(tokens, dim=1)
    return packed, (ids[0] if len(ids) == 1 else torch.cat(ids, dim=0)), num_generated
