"""Qwen-Image (diffusers ``QwenImageTransformer2DModel``) under Ulysses sequence parallelism.

A dual-stream MMDiT like FLUX's double blocks: every block keeps a text and an image stream,
concatenated [text, image] inside joint attention. The latent is packed in 2 x 2 patches like
FLUX (channel order (c, ph, pw)); each rank holds a contiguous shard of the text tokens and one of
the image tokens, and joint attention uses the same uneven all-to-all as FLUX.

Positions follow ComfyUI's Qwen-Image: image token (r, c) of an h x w token grid sits at
(0, r - h // 2, c - w // 2) and text token j at (s + j, s + j, s + j) with s = max(h // 2, w // 2);
the rotary angles of axes (16, 56, 56) channels are position x 10000^(-2i/dim), applied as complex
rotations of channel pairs. (diffusers' own table centres odd grids one row differently; ComfyUI is
the reference here.) The timestep is sigma (ComfyUI's multiplier 1.0); the time projection scales
it by 1000 itself. Latents are 4-D [B, 16, H, W] or ComfyUI's 5-D [B, 16, 1, H, W].

Key layout: ComfyUI's Qwen-Image single files use diffusers' own key names (with or without
``model.diffusion_model.``), so the one layout is read either way.
"""
from __future__ import annotations

import torch

from ..errors import InvalidRequest
from .parallel import SeqShard, _UlyssesBase

QWEN_CLASS = "QwenImageTransformer2DModel"
#: Qwen2.5-VL prompt embeddings: typically a few hundred tokens (no fixed padding)
QWEN_TEXT_TOKENS = 256

_QWEN_BASE = {
    "_class_name": QWEN_CLASS, "patch_size": 2, "in_channels": 64, "out_channels": 16, "attention_head_dim": 128,
    "joint_attention_dim": 3584, "guidance_embeds": False, "axes_dims_rope": [16, 56, 56],
}
PRESETS: dict[str, dict] = {
    "qwen-image": {**_QWEN_BASE, "num_layers": 60, "num_attention_heads": 24},
}
#: 4 heads of 16 (axes 4 + 6 + 6), 2 blocks: milliseconds on a CPU.
TINY_QWEN_CONFIG: dict = {**_QWEN_BASE, "num_layers": 2, "num_attention_heads": 4, "attention_head_dim": 16,
                          "joint_attention_dim": 32, "axes_dims_rope": [4, 6, 6]}


def as_image(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] as is; ComfyUI's 5-D [B, C, 1, H, W] without its frame axis."""
    if x.dim() == 5:
        if x.shape[2] != 1:
            raise InvalidRequest(f"Qwen-Image latents have one frame, got shape {tuple(x.shape)}")
        return x[:, :, 0]
    if x.dim() != 4:
        raise InvalidRequest(f"Qwen-Image latents are [B, C, H, W], got shape {tuple(x.shape)}")
    return x


# ----------------------------------------------------------------- positions
def _angles(pos: torch.Tensor, axes: list[int]) -> torch.Tensor:
    """pos [n, 3] (float64) -> complex rotations [n, sum(axes)/2]."""
    parts = []
    for a, dim in enumerate(axes):
        inv = 10000.0 ** (-torch.arange(0, dim, 2, device=pos.device, dtype=torch.float64) / dim)
        parts.append(torch.outer(pos[:, a], inv))
    ang = torch.cat(parts, dim=1)
    return torch.polar(torch.ones_like(ang), ang).to(torch.complex64)


def rope(config: dict, h_tokens: int, w_tokens: int, image: tuple[int, int], text: tuple[int, int],
         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(image rotations of image tokens image[0]..image[1], text rotations of text[0]..text[1])."""
    axes = [int(v) for v in config["axes_dims_rope"]]
    idx = torch.arange(*image, device=device, dtype=torch.float64)
    rows = torch.div(idx, w_tokens, rounding_mode="floor") - h_tokens // 2
    cols = idx % w_tokens - w_tokens // 2
    img = torch.stack([torch.zeros_like(idx), rows, cols], dim=1)
    start = max(h_tokens // 2, w_tokens // 2)
    tpos = torch.arange(*text, device=device, dtype=torch.float64) + start
    txt = tpos[:, None].expand(-1, 3)
    return _angles(img, axes), _angles(txt, axes)


def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [B, n, H, d] rotated pairwise by complex freqs [n, d/2]."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(-2).to(x.dtype)


class UlyssesQwenProcessor(_UlyssesBase):
    """Qwen-Image joint attention over [text shard, image shard]."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 encoder_hidden_states_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb=None, **kwargs):
        if attention_mask is not None or encoder_hidden_states_mask is not None:
            raise NotImplementedError("attention masks are not supported under sequence parallelism")
        d = attn.inner_dim // attn.heads

        def heads(t):
            return t.unflatten(-1, (-1, d))

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        eq = heads(attn.add_q_proj(encoder_hidden_states))
        ek = heads(attn.add_k_proj(encoder_hidden_states))
        ev = heads(attn.add_v_proj(encoder_hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        if image_rotary_emb is not None:
            img_f, txt_f = image_rotary_emb
            q, k = _rotate(q, img_f), _rotate(k, img_f)
            eq, ek = _rotate(eq, txt_f), _rotate(ek, txt_f)
        n_txt = encoder_hidden_states.shape[1]
        out = self.attend(torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)).to(q.dtype)
        img_out = attn.to_out[0](out[:, n_txt:].contiguous())
        return img_out, attn.to_add_out(out[:, :n_txt].contiguous())


# ----------------------------------------------------------------- one forward on a shard
def forward_tokens(model, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                   shard: SeqShard) -> torch.Tensor:
    """This rank's rows of the output tokens [B, n_r, 4 * C] (model dtype); x is [B, C, H, W]."""
    m, dt = model.module, model.dtype
    b, c, h, w = x.shape
    i0, i1 = shard.image_range
    t0, t1 = shard.text_range
    packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    hs = m.img_in(packed[:, i0:i1].to(dt))
    ehs = m.txt_in(m.txt_norm(context[:, t0:t1].to(dt)))
    temb = m.time_text_embed(timestep.float(), hs)
    rot = rope(model.config, h // 2, w // 2, (i0, i1), (t0, t1), x.device)
    for block in m.transformer_blocks:
        ehs, hs = block(hidden_states=hs, encoder_hidden_states=ehs, encoder_hidden_states_mask=None, temb=temb,
                        image_rotary_emb=rot)
    return m.proj_out(m.norm_out(hs, temb))


def untokenize(tokens: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """[B, N, (c, 2, 2)] -> [B, c, H, W], the inverse of the packing above."""
    c = tokens.shape[-1] // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# ----------------------------------------------------------------- layout
def detect(bare_keys: set[str]) -> str | None:
    if "txt_norm.weight" in bare_keys and "img_in.weight" in bare_keys and "transformer_blocks.0.img_mod.1.weight" in bare_keys:
        return "diffusers"
    return None


def infer_config(sd: dict[str, torch.Tensor]) -> dict:
    """diffusers config from the weights' shapes (any size)."""
    inner, in_ch = (int(v) for v in sd["img_in.weight"].shape)
    head_dim = int(sd["transformer_blocks.0.attn.norm_q.weight"].shape[0])
    layers = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    out_ch = int(sd["proj_out.weight"].shape[0]) // 4
    # axes: ComfyUI/diffusers use (16, 56, 56) at 128-channel heads; other widths split as
    # d - 2 * 3d/8 for frames and 3d/8 for rows and columns (rounded to even).
    side = 2 * round(3 * head_dim / 16)
    axes = [16, 56, 56] if head_dim == 128 else [head_dim - 2 * side, side, side]
    return {**_QWEN_BASE, "in_channels": in_ch, "out_channels": out_ch, "num_layers": layers,
            "attention_head_dim": head_dim, "num_attention_heads": inner // head_dim,
            "joint_attention_dim": int(sd["txt_in.weight"].shape[1]), "axes_dims_rope": axes}
