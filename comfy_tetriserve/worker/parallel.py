"""Ulysses sequence parallelism for diffusers' FLUX and SD3 attention, one device group per step.

Every rank of a group holds the whole latent, embeds it, and keeps a contiguous shard of the text
tokens and of the image tokens (``SeqShard``). All token-wise layers (projections, norms, MLPs,
modulation) run on the shard as they are. Attention is the only place that needs every token:

    local q, k, v  [B, n_r, H, d]  --all-to-all-->  [B, N, H/k, d]   (all tokens, H/k heads)
    scaled dot-product attention over all N tokens per head
    [B, N, H/k, d]  --all-to-all-->  [B, n_r, H, d]                   (own tokens, all heads)

q, k and v travel in one all-to-all. At the end of the step the image tokens of the model output
are all-gathered so that every rank again holds the full output (and, with it, the full latent).

Token counts that do not divide by the degree (1008 px: 3969 image tokens; SD3's 333 text tokens)
are split unevenly (the first ``N % k`` ranks hold one token more) and the all-to-alls use uneven
split sizes; nothing is padded or masked, so the attention sees exactly the tokens of a single-
device forward. Concatenating the ranks' [text shard, image shard] sequences permutes the joint
sequence, which attention (without a mask, positions already applied by RoPE on the shard) does
not notice. FLUX's rotary embedding is computed from the shard's own position ids.

The process group is not global state: a ``GroupComm`` value (one per device group, created at
start-up) is bound to the model's processors for the duration of one forward (``bind``).
On CUDA the attention kernel is chosen explicitly, cuDNN first (``attention_backend``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - older torch: let torch choose
    SDPBackend = sdpa_kernel = None


# ----------------------------------------------------------------- token shards
def split_sizes(num_tokens: int, degree: int) -> tuple[int, ...]:
    """Tokens per rank: contiguous blocks, the first ``num_tokens % degree`` ranks one larger."""
    base, extra = divmod(num_tokens, degree)
    return tuple(base + (1 if r < extra else 0) for r in range(degree))


def split_range(num_tokens: int, degree: int, rank: int) -> tuple[int, int]:
    sizes = split_sizes(num_tokens, degree)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


@dataclass(frozen=True)
class SeqShard:
    """Which text and image tokens one rank of a ``degree``-wide group holds."""

    rank: int
    degree: int
    num_text: int
    num_image: int

    @property
    def text_sizes(self) -> tuple[int, ...]:
        return split_sizes(self.num_text, self.degree)

    @property
    def image_sizes(self) -> tuple[int, ...]:
        return split_sizes(self.num_image, self.degree)

    @property
    def joint_sizes(self) -> tuple[int, ...]:
        return tuple(t + i for t, i in zip(self.text_sizes, self.image_sizes))

    @property
    def text_range(self) -> tuple[int, int]:
        return split_range(self.num_text, self.degree, self.rank)

    @property
    def image_range(self) -> tuple[int, int]:
        return split_range(self.num_image, self.degree, self.rank)


# ----------------------------------------------------------------- collectives
class GroupComm:
    """The collectives of one device group, as a value.

    ``group`` is the torch.distributed process group (None for a single device), ``ranks`` the
    global ranks of its members in group order and ``index`` this process's position among them.
    ``wire`` is the device the backend moves tensors from: the GPU under NCCL, the CPU under gloo.
    A tensor elsewhere travels through a copy on the wire device: gloo with CUDA tensors (several
    ranks on one GPU, for correctness checks) then works for every collective, and so does a
    CPU-resident tensor (a sampler's generator state) under NCCL.
    """

    def __init__(self, group, ranks: Sequence[int], index: int, wire: torch.device | str = "cpu") -> None:
        self.group = group
        self.ranks = tuple(ranks)
        self.index = index
        self.wire = torch.device(wire)

    @property
    def degree(self) -> int:
        return len(self.ranks)

    def __repr__(self) -> str:
        return f"GroupComm(ranks={self.ranks}, index={self.index}, wire={self.wire})"

    @contextlib.contextmanager
    def _staged(self, *tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
        if all(t.device == self.wire for t in tensors):
            yield tensors
            return
        staged = tuple(t if t.device == self.wire else t.to(self.wire) for t in tensors)
        yield staged
        for t, s in zip(tensors, staged):
            if s is not t:
                t.copy_(s)

    def all_to_all(self, output: torch.Tensor, inp: torch.Tensor, output_sizes: Sequence[int],
                   input_sizes: Sequence[int]) -> None:
        import torch.distributed as dist

        with self._staged(output, inp) as (out_s, in_s):
            dist.all_to_all_single(out_s, in_s, list(output_sizes), list(input_sizes), group=self.group)

    def all_gather_flat(self, local: torch.Tensor) -> torch.Tensor:
        """[n] on every rank -> [degree, n] (rank order) on every rank."""
        import torch.distributed as dist

        out = local.new_empty(self.degree * local.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        with self._staged(out, local) as (out_s, in_s):
            gather(out_s, in_s, group=self.group)
        return out.view(self.degree, -1)

    def broadcast(self, tensor: torch.Tensor, src_index: int) -> None:
        import torch.distributed as dist

        with self._staged(tensor) as (t,):
            dist.broadcast(t, src=self.ranks[src_index], group=self.group)

    def all_reduce_max(self, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        with self._staged(tensor) as (t,):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)


def seq_to_heads(x: torch.Tensor, sizes: Sequence[int], comm: GroupComm) -> torch.Tensor:
    """[S, B, n_r, H, d] sequence shards -> [S, B, N, H/k, d] all tokens of this rank's heads."""
    s, b, n, h, d = x.shape
    k = comm.degree
    if h % k:
        raise ValueError(f"{h} heads do not split over {k} ranks")
    if n != sizes[comm.index]:
        raise ValueError(f"rank {comm.index} holds {n} tokens, the shard plan says {sizes[comm.index]}")
    send = x.reshape(s, b, n, k, h // k, d).permute(3, 2, 0, 1, 4, 5).reshape(k * n, s, b, h // k, d)
    recv = x.new_empty((sum(sizes), s, b, h // k, d))
    comm.all_to_all(recv, send.contiguous(), sizes, [n] * k)
    return recv.permute(1, 2, 0, 3, 4)


def heads_to_seq(x: torch.Tensor, sizes: Sequence[int], comm: GroupComm) -> torch.Tensor:
    """[S, B, N, H/k, d] -> [S, B, n_r, H, d]: the inverse of ``seq_to_heads``."""
    s, b, total, hk, d = x.shape
    k = comm.degree
    n = sizes[comm.index]
    send = x.permute(2, 0, 1, 3, 4).contiguous()
    recv = x.new_empty((k * n, s, b, hk, d))
    comm.all_to_all(recv, send, [n] * k, sizes)
    return recv.view(k, n, s, b, hk, d).permute(2, 3, 1, 0, 4, 5).reshape(s, b, n, k * hk, d)


def gather_tokens(local: torch.Tensor, sizes: Sequence[int], comm: GroupComm,
                  vote: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather token shards [B, n_r, C] into [B, N, C] on every rank.

    Each rank also contributes one number (``vote``); every rank receives all of them, in the
    same collective, so a per-step decision (stop or go on) costs no extra round trip. A tensor
    ``vote`` (one element on the device) is copied on the device: a captured graph reads it.
    """
    b, n, c = local.shape
    width = b * max(sizes) * c
    buf = local.new_zeros(width + 1)
    buf[: b * n * c] = local.reshape(-1)
    buf[width] = vote
    out = comm.all_gather_flat(buf)
    parts = [out[r, : b * sizes[r] * c].view(b, sizes[r], c) for r in range(comm.degree)]
    return torch.cat(parts, dim=1), out[:, width]


# ----------------------------------------------------------------- attention
_CUDA_PRIORITY = (
    [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if SDPBackend is not None else []
)


@contextlib.contextmanager
def attention_backend(device: torch.device) -> Iterator[None]:
    """On CUDA prefer cuDNN attention, then flash, then memory-efficient, then math.

    Measured on an H200 for FLUX shapes: cuDNN 614-677 TFLOP/s, flash 320-363, efficient 163-180.
    Elsewhere torch's own choice stands.
    """
    if device.type != "cuda" or sdpa_kernel is None:
        yield
        return
    try:
        ctx = sdpa_kernel(_CUDA_PRIORITY, set_priority=True)
    except TypeError:  # torch before set_priority: the listed backends, in torch's own order
        ctx = sdpa_kernel(_CUDA_PRIORITY)
    with ctx:
        yield


@dataclass
class StepBinding:
    """What the processors need during one forward: the group, this rank's shard and, when rows
    of the batch have padded text (``text_lengths``), the key mask of the joint attention."""

    comm: GroupComm | None
    shard: SeqShard
    text_lengths: tuple[int, ...] | None = None
    text_first: bool = True  # FLUX orders each shard [text, image], SD3 [image, text]
    _mask: torch.Tensor | None = None

    def key_mask(self, device: torch.device) -> torch.Tensor | None:
        """The joint attention's key mask (built once per forward), or None without padding."""
        if self.text_lengths is None:
            return None
        if self._mask is None:
            from .stepcache import joint_key_mask

            self._mask = joint_key_mask(self.shard.text_sizes, self.shard.image_sizes, self.text_lengths,
                                        self.text_first, device)
        return self._mask


class _UlyssesBase:
    """Shared by the FLUX and SD3 processors: one instance serves every attention layer of a model."""

    def __init__(self) -> None:
        self.binding: StepBinding | None = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, image_only: bool = False) -> torch.Tensor:
        """q, k, v [B, n_r, H, d] of this rank's tokens -> attention output [B, n_r, H * d]."""
        bind = self.binding
        mask = None if bind is None or image_only else bind.key_mask(q.device)
        if bind is None or bind.comm is None or bind.comm.degree == 1:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask)
            return out.transpose(1, 2).flatten(2)
        sizes = bind.shard.image_sizes if image_only else bind.shard.joint_sizes
        qh, kh, vh = seq_to_heads(torch.stack([q, k, v]), sizes, bind.comm).unbind(0)
        out = F.scaled_dot_product_attention(qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2),
                                             attn_mask=mask)
        out = heads_to_seq(out.transpose(1, 2).unsqueeze(0), sizes, bind.comm)[0]
        return out.flatten(2)


class UlyssesFluxProcessor(_UlyssesBase):
    """FLUX double-stream (text + image) and single-stream (joint sequence) attention."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise NotImplementedError("attention masks are not supported under sequence parallelism")
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim)))
        k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim)))
        v = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
        num_text = 0
        if encoder_hidden_states is not None:  # double block: [text shard, image shard]
            num_text = encoder_hidden_states.shape[1]
            eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = self.attend(q, k, v).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        text_out, image_out = out[:, :num_text], out[:, num_text:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


class UlyssesJointProcessor(_UlyssesBase):
    """SD3 joint attention ([image shard, text shard]) and SD3.5's image-only second attention."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not supported under sequence parallelism")
        heads = attn.heads

        def project(x, fq, fk, fv, nq, nk):
            q, k, v = (f(x).unflatten(-1, (heads, -1)) for f in (fq, fk, fv))
            # diffusers' q/k norms act on the last (head) dimension: the same on [B, n, H, d].
            return (nq(q) if nq is not None else q), (nk(k) if nk is not None else k), v

        q, k, v = project(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        num_image = hidden_states.shape[1]
        if encoder_hidden_states is not None:
            eq, ek, ev = project(encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                                 attn.norm_added_q, attn.norm_added_k)
            q, k, v = torch.cat([q, eq], dim=1), torch.cat([k, ek], dim=1), torch.cat([v, ev], dim=1)
        out = self.attend(q, k, v, image_only=encoder_hidden_states is None).to(q.dtype)
        image_out = attn.to_out[1](attn.to_out[0](out[:, :num_image]))
        if encoder_hidden_states is None:
            return image_out
        text_out = out[:, num_image:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return image_out, text_out


def install_processors(model: torch.nn.Module, family: str) -> _UlyssesBase:
    """Give every attention layer of ``model`` one shared Ulysses processor; returns it."""
    proc: _UlyssesBase = UlyssesFluxProcessor() if family == "flux" else UlyssesJointProcessor()
    model.set_attn_processor(proc)
    return proc


@contextlib.contextmanager
def bind(proc: _UlyssesBase, binding: StepBinding | None) -> Iterator[None]:
    """Attach a group and shard to the model's processor for one forward."""
    previous, proc.binding = proc.binding, binding
    try:
        yield
    finally:
        proc.binding = previous
