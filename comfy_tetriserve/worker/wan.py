"""Wan 2.x video DiT (diffusers ``WanTransformer3DModel``) under Ulysses sequence parallelism.

Latents are 5-D ``[B, C, F, H, W]``; the patch embedding (a strided 3-D convolution, patch
(1, 2, 2)) turns them into ``F x H/2 x W/2`` tokens, frames outermost, and that whole sequence is
sharded as one (uneven splits as for images). Each block has

- self-attention over the video tokens: the Ulysses all-to-all pair around attention, with the
  3-D rotary embedding (frame, row, column positions, each rank its shard's rows of the table);
- cross-attention to the text: the queries are the rank's own video tokens and the keys/values
  the whole text, which every rank holds (the text embedding is a small MLP, run on every rank).
  Attention to a fixed key set is independent per query, so this needs no communication at all:
  the text side is neither sharded nor exchanged;
- norms, modulation and the MLP, token-wise, on the shard.

Wan's q/k RMS norms normalise over all heads of a token ("rms_norm_across_heads"): they run on
the shard before the all-to-all, where each token still has all its heads.

Timesteps: ComfyUI's Wan model sampling is discrete flow with multiplier 1000 (timestep =
sigma * 1000), which the sinusoidal time embedding takes as is. Image-to-video checkpoints (CLIP
image tokens through ``add_k_proj``) are refused at load time.

Key layouts: ``wan`` is the original Wan / ComfyUI single-file naming (``blocks.N.self_attn.q``,
``head.head``, ...; with or without ComfyUI's ``model.diffusion_model.`` prefix, ``comfy``), and
``diffusers`` the library's own. The config is inferred from tensor shapes; ComfyUI infers the
head count as ``dim // 128``, so every Wan (the tiny ones too) has 128-channel heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidRequest
from .parallel import SeqShard, _UlyssesBase

WAN_CLASS = "WanTransformer3DModel"
#: ComfyUI: num_heads = dim // 128
WAN_HEAD_DIM = 128
#: Wan's text encoder (umT5) pads to 512 tokens
WAN_TEXT_TOKENS = 512

_WAN_BASE = {
    "_class_name": WAN_CLASS, "patch_size": [1, 2, 2], "attention_head_dim": WAN_HEAD_DIM, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None, "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024, "pos_embed_seq_len": None,
}
PRESETS: dict[str, dict] = {
    "wan2.1-t2v-14b": {**_WAN_BASE, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
    "wan2.1-t2v-1.3b": {**_WAN_BASE, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "wan2.2-t2v-a14b": {**_WAN_BASE, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
    "wan2.2-ti2v-5b": {**_WAN_BASE, "num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30,
                       "in_channels": 48, "out_channels": 48},
}
#: 4 heads of 128, 2 blocks, a small MLP: milliseconds on a CPU. The head width, the umT5 text
#: width (4096) and the time-embedding width (256) are what ComfyUI's detection assumes of every
#: Wan file, so ComfyUI's UNETLoader loads the tiny files too.
TINY_WAN_CONFIG: dict = {**_WAN_BASE, "num_attention_heads": 4, "ffn_dim": 256, "num_layers": 2}
TINY_WAN22_CONFIG: dict = {**TINY_WAN_CONFIG, "in_channels": 48, "out_channels": 48}


def patch_size(config: dict) -> tuple[int, int, int]:
    p = config.get("patch_size") or (1, 2, 2)
    return tuple(int(v) for v in p)  # type: ignore[return-value]


def num_tokens(config: dict, frames: int, height: int, width: int) -> int:
    pt, ph, pw = patch_size(config)
    return (frames // pt) * (height // ph) * (width // pw)


def check_latent(config: dict, x: torch.Tensor) -> None:
    if x.dim() != 5:
        raise InvalidRequest(f"Wan latents are [B, C, F, H, W], got shape {tuple(x.shape)}")
    pt, ph, pw = patch_size(config)
    _, c, f, h, w = x.shape
    if c != int(config["in_channels"]):
        raise InvalidRequest(f"this Wan model takes {config['in_channels']}-channel latents, got {c}")
    if f % pt or h % ph or w % pw:
        raise InvalidRequest(f"latent {f}x{h}x{w} is not a multiple of the patch size {pt}x{ph}x{pw}")


# ----------------------------------------------------------------- attention
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [B, n, H, d] by angles given as cos/sin [n, d/2] (float32)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


class UlyssesWanProcessor(_UlyssesBase):
    """Wan self-attention (sharded video tokens, Ulysses) and text cross-attention (local queries)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb=None, **kwargs) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not supported under sequence parallelism")
        heads = attn.heads
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(-1, (heads, -1))
        src = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        k = attn.norm_k(attn.to_k(src)).unflatten(-1, (heads, -1))
        v = attn.to_v(src).unflatten(-1, (heads, -1))
        if encoder_hidden_states is None:
            if rotary_emb is not None:
                cos, sin = rotary_emb
                q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            out = self.attend(q, k, v, image_only=True)
        else:
            if attn.add_k_proj is not None:
                raise NotImplementedError("Wan image-to-video cross-attention (CLIP image tokens) is not supported")
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out.transpose(1, 2).flatten(2)
        return attn.to_out[0](out.to(q.dtype))


# ----------------------------------------------------------------- one forward on a shard
def rope_angles(config: dict, grid: tuple[int, int, int], start: int, stop: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [stop - start, d/2] of tokens start..stop of a (frames, rows, cols) token grid.

    Wan splits a head's channels into (frame, row, column) axes of d - 4(d//6), 2(d//6), 2(d//6);
    token positions are 0-based per axis; frequencies theta^(-2i/dim) with theta 10000.
    """
    d = int(config["attention_head_dim"])
    axes = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    f, h, w = grid
    idx = torch.arange(start, stop, device=device, dtype=torch.float64)
    pos = (torch.div(idx, h * w, rounding_mode="floor"), torch.div(idx, w, rounding_mode="floor") % h, idx % w)
    angles = []
    for p, dim in zip(pos, axes):
        inv = 10000.0 ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)
        angles.append(torch.outer(p, inv))
    ang = torch.cat(angles, dim=1)
    return ang.cos().float(), ang.sin().float()


def forward_tokens(model, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                   shard: SeqShard) -> torch.Tensor:
    """This rank's rows of the model output tokens [B, n_r, C * prod(patch)] (model dtype)."""
    m, dt = model.module, model.dtype
    i0, i1 = shard.image_range
    pt, ph, pw = patch_size(model.config)
    _, _, f, h, w = x.shape
    # The 3-D patch embedding is a strided convolution: each rank embeds the whole latent and
    # keeps its rows (the same numbers as embedding the shard; cheap next to the blocks).
    hs = m.patch_embedding(x.to(dt)).flatten(2).transpose(1, 2)[:, i0:i1]
    cos, sin = rope_angles(model.config, (f // pt, h // ph, w // pw), i0, i1, x.device)
    temb, tproj, ehs, _ = m.condition_embedder(timestep.float(), context.to(dt))
    tproj = tproj.unflatten(1, (6, -1))
    for block in m.blocks:
        hs = block(hs, ehs, tproj, (cos, sin))
    shift, scale = (m.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    hs = (m.norm_out(hs.float()) * (1 + scale) + shift).type_as(hs)
    return m.proj_out(hs)


def untokenize(config: dict, tokens: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Output tokens [B, N, pt*ph*pw*C] (frames, rows, cols order) -> latent [B, C, F, H, W]."""
    b, _, f, h, w = shape
    pt, ph, pw = patch_size(config)
    c = tokens.shape[-1] // (pt * ph * pw)
    x = tokens.view(b, f // pt, h // ph, w // pw, pt, ph, pw, c)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c, f, h, w)


# ----------------------------------------------------------------- key layouts
#: original Wan (ComfyUI) name -> diffusers name, top level
_TOP = [
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
]
_BLOCK = [
    ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"), ("self_attn.norm_q", "attn1.norm_q"), ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"), ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"), ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"), ("norm3", "norm2"), ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
    ("modulation", "scale_shift_table"),
]


def detect(bare_keys: set[str]) -> str | None:
    """'wan' (original naming), 'diffusers', or None when the keys are not a Wan DiT."""
    if "head.modulation" in bare_keys and "blocks.0.self_attn.q.weight" in bare_keys:
        if "img_emb.proj.0.weight" in bare_keys or "blocks.0.cross_attn.k_img.weight" in bare_keys:
            raise InvalidRequest("Wan image-to-video checkpoints (CLIP image conditioning) are not supported; "
                                 "use a text-to-video (or the 5B text/image-to-video) model")
        return "wan"
    if "blocks.0.attn1.to_q.weight" in bare_keys and "condition_embedder.time_proj.weight" in bare_keys:
        return "diffusers"
    return None


def _rename(sd: dict, pairs_top, pairs_block) -> dict:
    src, out = dict(sd), {}
    for old, new in pairs_top:
        for suffix in ("", ".weight", ".bias"):
            if old + suffix in src:
                out[new + suffix] = src.pop(old + suffix)
    blocks = sorted({int(k.split(".")[1]) for k in src if k.startswith("blocks.")})
    for i in blocks:
        for old, new in pairs_block:
            o, n = f"blocks.{i}.{old}", f"blocks.{i}.{new}"
            for suffix in ("", ".weight", ".bias"):
                if o + suffix in src:
                    out[n + suffix] = src.pop(o + suffix)
    if src:
        raise InvalidRequest(f"Wan checkpoint has {len(src)} keys this converter does not know, e.g. {sorted(src)[:6]}")
    return out


def to_diffusers(bare: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan keys (prefix stripped) -> diffusers WanTransformer3DModel keys."""
    return _rename(bare, _TOP, _BLOCK)


def from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers keys -> original Wan keys (what ComfyUI's own Wan model loads)."""
    return _rename(sd, [(n, o) for o, n in _TOP], [(n, o) for o, n in _BLOCK])


def infer_config(sd: dict[str, torch.Tensor]) -> dict:
    """diffusers config from diffusers-named weights (shapes only; any size)."""
    w = sd["patch_embedding.weight"]  # [dim, in_ch, pt, ph, pw]
    dim, in_ch = int(w.shape[0]), int(w.shape[1])
    patch = [int(v) for v in w.shape[2:]]
    if dim % WAN_HEAD_DIM:
        raise InvalidRequest(f"Wan width {dim} is not a multiple of the {WAN_HEAD_DIM}-channel heads")
    out_ch = int(sd["proj_out.weight"].shape[0]) // (patch[0] * patch[1] * patch[2])
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    return {
        **_WAN_BASE, "patch_size": patch, "num_attention_heads": dim // WAN_HEAD_DIM, "in_channels": in_ch,
        "out_channels": out_ch, "text_dim": int(sd["condition_embedder.text_embedder.linear_1.weight"].shape[1]),
        "freq_dim": int(sd["condition_embedder.time_embedder.linear_1.weight"].shape[1]),
        "ffn_dim": int(sd["blocks.0.ffn.net.0.proj.weight"].shape[0]), "num_layers": layers,
        "cross_attn_norm": "blocks.0.norm2.weight" in sd,
    }


def sampling_family(config: dict) -> str:
    """Wan 2.2 5B (48 latent channels, Wan 2.2 VAE) samples as 'wan22', the others as 'wan'."""
    return "wan22" if int(config.get("in_channels", 16)) == 48 else "wan"
