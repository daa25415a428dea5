"""FLOP-priced step times for DiTs the profile has no rows for (Qwen-Image, Wan 2.x): *modelled*.

``FlopCostModel`` wraps a profile cost model. Models with rows are priced by the rows as before;
a model named in ``archs`` (a ``DitArch``) is priced as

    T(model, shape, batch, k) = FLOPs(model, shape, batch) / R_ref(k, FLOPs) + comm(model, shape, batch, k)

where ``R_ref(k, F)`` is the reference model's (FLUX-dev's) measured throughput at degree k:
FLOPs(FLUX, row) / compute_s(row) over its batch-1 rows, interpolated linearly in log FLOPs
between rows and held at the end rows beyond them (a larger problem is assumed no more efficient
than the largest measured one). ``comm`` is the profile's Ulysses all-to-all model with the
priced model's own width, layer count and exchanged tokens (Wan exchanges only video tokens: its
text is not sharded). Every such time is flagged modelled (``is_modelled``); ``comfy-tetriserve
profile`` measures real rows, which then replace these (``ProfileCostModel.with_table``).

FLOPs of one forward (multiply-adds x 2), tokens N (image or video) and T (text):

- MMDiT (FLUX, Qwen-Image): every token, text or image, passes 12 D^2 multiply-adds of linear
  layers per block (q, k, v, o and a 4x MLP), and attention is 2 N_tot^2 D per block
  (QK^T and AV), N_tot = N + T;
- Wan: per video token and block 4 D^2 (self-attention) + 2 D^2 (cross-attention q, o) +
  2 D F (MLP); 2 D^2 per text token and block (cross-attention k, v); attention 2 N^2 D
  (self) + 2 N T D (cross).

A video model entry prices clips of a fixed length (``frames``, pixel frames; Wan's VAE keeps
1 + (frames - 1) / 4 latent frames): the cost protocol speaks (height, width), so one entry per
clip length (the bench uses Wan's default 81 frames).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .cost import CostModel, ProfileCostModel
from .errors import InvalidRequest


@dataclass(frozen=True)
class DitArch:
    """What FLOP pricing needs of a DiT."""

    kind: str  # "mmdit" | "wan"
    num_layers: int
    hidden_size: int
    num_heads: int
    num_text_tokens: int
    ffn_size: int = 0  # wan only (MMDiT MLPs are 4 x hidden)
    frames: int = 1  # pixel frames of the clips this entry prices (video)
    px_per_token: int = 16  # VAE downscale x patch size, per side

    @property
    def latent_frames(self) -> int:
        return 1 + (self.frames - 1) // 4 if self.kind == "wan" else 1

    def tokens(self, height: int, width: int) -> int:
        return self.latent_frames * (height // self.px_per_token) * (width // self.px_per_token)


FLUX_DEV = DitArch("mmdit", 57, 3072, 24, 512)
QWEN_IMAGE = DitArch("mmdit", 60, 3072, 24, 256)
WAN_14B_81F = DitArch("wan", 40, 5120, 40, 512, ffn_size=13824, frames=81)
WAN_1_3B_81F = DitArch("wan", 30, 1536, 12, 512, ffn_size=8960, frames=81)
#: entries the bench and the service know: name -> architecture
ARCHS: dict[str, DitArch] = {"qwen-image": QWEN_IMAGE, "wan2.1-t2v-14b": WAN_14B_81F,
                             "wan2.2-t2v-a14b": WAN_14B_81F, "wan2.1-t2v-1.3b": WAN_1_3B_81F}


def flops_per_step(arch: DitArch, height: int, width: int, batch: int = 1) -> float:
    """FLOPs of one model evaluation of ``batch`` sequences (see the module docstring)."""
    if height <= 0 or width <= 0 or batch < 1:
        raise InvalidRequest(f"bad shape {height}x{width} batch {batch}")
    n, t, d, layers = arch.tokens(height, width), arch.num_text_tokens, arch.hidden_size, arch.num_layers
    if arch.kind == "mmdit":
        total = n + t
        macs = layers * (12 * d * d * total + 2 * total * total * d)
    elif arch.kind == "wan":
        macs = layers * (n * (6 * d * d + 2 * d * arch.ffn_size) + t * 2 * d * d + 2 * n * n * d + 2 * n * t * d)
    else:
        raise InvalidRequest(f"unknown architecture kind {arch.kind!r}")
    return 2.0 * macs * batch


class FlopCostModel:
    """A ``CostModel``: the base model's rows where it has them, FLOP pricing for ``archs``."""

    def __init__(self, base: ProfileCostModel, archs: dict[str, DitArch] | None = None,
                 reference: str = "flux-dev", reference_arch: DitArch = FLUX_DEV) -> None:
        self.base = base
        self.reference = reference
        self.archs = {k: v for k, v in (archs if archs is not None else ARCHS).items() if k not in base.models()}
        # throughput points per degree: sorted (log FLOPs, FLOPs per second)
        self._curve: dict[int, list[tuple[float, float]]] = {}
        for row in base.table.rows:
            if row.model == reference and row.batch == 1:
                f = flops_per_step(reference_arch, row.height, row.width)
                self._curve.setdefault(row.sp_degree, []).append((math.log(f), f / row.compute_s))
        for pts in self._curve.values():
            pts.sort()
        if not self._curve:
            raise InvalidRequest(f"the profile has no batch-1 rows of {reference!r} to price by FLOPs from")
        self._memo: dict[tuple, float] = {}

    @property
    def parallel_capacity(self) -> int | None:
        return getattr(self.base, "parallel_capacity", None)

    def models(self) -> tuple[str, ...]:
        return tuple(self.base.models()) + tuple(self.archs)

    def is_modelled(self, model: str) -> bool:
        return model in self.archs

    def allowed_degrees(self, model: str) -> tuple[int, ...]:
        arch = self.archs.get(model)
        if arch is None:
            return self.base.allowed_degrees(model)
        return tuple(k for k in sorted(self._curve) if arch.num_heads % k == 0)

    def throughput(self, degree: int, flops: float) -> float:
        """R_ref(k, F): the reference's measured FLOPs per second at degree k near F FLOPs."""
        pts = self._curve.get(degree)
        if not pts:
            raise InvalidRequest(f"no {self.reference} rows at degree {degree}")
        x = math.log(flops)
        if x <= pts[0][0]:
            return pts[0][1]
        for (x1, r1), (x2, r2) in zip(pts, pts[1:]):
            if x <= x2:
                return r1 + (r2 - r1) * (x - x1) / (x2 - x1)
        return pts[-1][1]

    def comm_s(self, model: str, height: int, width: int, batch: int, sp_degree: int) -> float:
        arch = self.archs.get(model)
        if arch is None:
            return self.base.comm_s(model, height, width, batch, sp_degree)
        comm = self.base.table.comm
        if comm is None or sp_degree <= 1:
            return 0.0
        exchanged = arch.tokens(height, width) + (arch.num_text_tokens if arch.kind == "mmdit" else 0)
        k = sp_degree
        nbytes = exchanged * batch / k * arch.hidden_size * comm.bytes_per_element * (k - 1) / k
        return 4 * arch.num_layers * (comm.alpha_s + nbytes / comm.beta_bytes_per_s)

    def step_time_s(self, model: str, height: int, width: int, batch: int, sp_degree: int) -> float:
        arch = self.archs.get(model)
        if arch is None:
            return self.base.step_time_s(model, height, width, batch, sp_degree)
        key = (model, height, width, batch, sp_degree)
        t = self._memo.get(key)
        if t is None:
            if sp_degree not in self.allowed_degrees(model):
                raise InvalidRequest(f"degree {sp_degree} not allowed for {model} "
                                     f"(allowed: {self.allowed_degrees(model)})")
            f = flops_per_step(arch, height, width, batch)
            t = f / self.throughput(sp_degree, f) + self.comm_s(model, height, width, batch, sp_degree)
            self._memo[key] = t
        return t

    def describe(self) -> str:
        names = ", ".join(self.archs) or "none"
        return f"{self.reference} rows; modelled by FLOPs from {self.reference}'s measured throughput: {names}"


def flop_cost_model(base: CostModel, archs: dict[str, DitArch] | None = None) -> FlopCostModel:
    if not isinstance(base, ProfileCostModel):
        raise InvalidRequest("FLOP pricing needs a profile cost model as its base")
    return FlopCostModel(base, archs)


__all__ = ["ARCHS", "FLUX_DEV", "QWEN_IMAGE", "WAN_14B_81F", "DitArch", "FlopCostModel", "flop_cost_model", "flops_per_step"]
