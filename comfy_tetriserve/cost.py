"""Cost model: the time of one denoising step, T(model, resolution, batch, degree).

The planner and the simulator see step times only through the ``CostModel`` protocol. Measured
step times live in a *profile table* file (JSON, format below) that ``comfy-tetriserve profile``
writes and the planner reads; the project ships the H200 measurements as the ``h200`` profile.

Profile file (``format: "comfy-tetriserve-profile/1"``)::

    {
      "format": "comfy-tetriserve-profile/1",
      "device": "NVIDIA H200",            # what was measured, free text
      "measured_on": "2026-11-28",
      "how": "...",                       # method, free text (provenance)
      "comm": {"alpha_s": 1.5e-05, "beta_bytes_per_s": 3e11, "bytes_per_element": 2} | null,
      "models": {
        "flux-dev": {"num_heads": 24, "num_attention_layers": 57, "hidden_size": 3072,
                     "num_text_tokens": 512}
      },
      "rows": [
        {"model": "flux-dev", "height": 1024, "width": 1024, "batch": 1, "sp_degree": 2,
         "compute_s": 0.0890, "includes_comm": false}
      ]
    }

``includes_comm`` false means the row is compute only and the ``comm`` model is added on top
(the shipped H200 rows); true means the time was measured end to end with communication (what
the profiler writes on a real device group).
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .errors import InvalidRequest

PROFILE_FORMAT = "comfy-tetriserve-profile/1"


@runtime_checkable
class CostModel(Protocol):
    """Step times of the box. A cost model may also have ``parallel_capacity`` (int or None):
    how many devices can step at once at their profiled speed, when the devices share hardware
    (CPU workers sharing fewer cores); None or absent: every device is real capacity. Policies
    read it with ``parallel_capacity(cost)``; wrappers forward it."""

    def step_time_s(self, model: str, height: int, width: int, batch: int, sp_degree: int) -> float:
        """Predicted wall time of one denoising step on ``sp_degree`` GPUs (compute + communication)."""
        ...

    def allowed_degrees(self, model: str) -> tuple[int, ...]:
        """Sequence-parallel degrees the model supports (ascending), before any GPU-count limit."""
        ...


@dataclass(frozen=True)
class CommModel:
    """Ulysses all-to-all cost: ``alpha_s`` per all-to-all plus bytes / ``beta_bytes_per_s`` per rank."""

    alpha_s: float
    beta_bytes_per_s: float
    bytes_per_element: int = 2


@dataclass(frozen=True)
class ModelProfile:
    """Architecture numbers of one model, enough to price communication and to allow degrees."""

    num_heads: int
    num_attention_layers: int
    hidden_size: int
    num_text_tokens: int


@dataclass(frozen=True)
class ProfileRow:
    model: str
    height: int
    width: int
    batch: int
    sp_degree: int
    compute_s: float
    includes_comm: bool = False


@dataclass(frozen=True)
class ProfileTable:
    """A profile file in memory. ``load_profile``/``save_profile`` read and write it."""

    models: dict[str, ModelProfile]
    rows: tuple[ProfileRow, ...]
    comm: CommModel | None = None
    device: str = ""
    measured_on: str = ""
    how: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "device": self.device,
            "measured_on": self.measured_on,
            "how": self.how,
            "comm": asdict(self.comm) if self.comm else None,
            "models": {name: asdict(m) for name, m in self.models.items()},
            "rows": [asdict(r) for r in self.rows],
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ProfileTable":
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not a profile table (format {data.get('format')!r}, want {PROFILE_FORMAT!r})")
        models = {name: ModelProfile(**m) for name, m in data["models"].items()}
        rows = tuple(ProfileRow(**r) for r in data["rows"])
        for r in rows:
            if r.model not in models:
                raise ValueError(f"profile row for unknown model {r.model!r}")
            if r.compute_s <= 0 or r.sp_degree < 1 or r.batch < 1:
                raise ValueError(f"profile row out of range: {r}")
        comm = CommModel(**data["comm"]) if data.get("comm") else None
        return cls(models=models, rows=rows, comm=comm, device=data.get("device", ""),
                   measured_on=data.get("measured_on", ""), how=data.get("how", ""),
                   extra=data.get("extra", {}))


def load_profile(path: str | Path) -> ProfileTable:
    with open(path, encoding="utf-8") as fh:
        return ProfileTable.from_json(json.load(fh))


def save_profile(table: ProfileTable, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(table.to_json(), indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------- the profile cost model
def _image_tokens(height: int, width: int) -> int:
    return (height // 16) * (width // 16)


def comm_time_s(comm: CommModel, mp: ModelProfile, height: int, width: int, batch: int, sp_degree: int) -> float:
    """Ulysses communication of one step: 4 all-to-alls per attention layer (q, k, v in; output back).

    Each all-to-all moves (tokens / k) x hidden x bytes x (k - 1) / k per rank, tokens = (image +
    text tokens) x batch; it costs ``alpha_s`` plus bytes / ``beta_bytes_per_s``. Zero at k = 1.
    """
    if sp_degree <= 1:
        return 0.0
    tokens = (_image_tokens(height, width) + mp.num_text_tokens) * batch
    nbytes = tokens / sp_degree * mp.hidden_size * comm.bytes_per_element * (sp_degree - 1) / sp_degree
    return 4 * mp.num_attention_layers * (comm.alpha_s + nbytes / comm.beta_bytes_per_s)


class ProfileCostModel:
    """``CostModel`` from a profile table: measured compute, interpolated, plus the comm model.

    Lookup of T(model, height, width, batch, k):
    - rows with the model, batch and degree give (total tokens, compute_s) points, total tokens =
      image tokens + the model's text tokens (non-square sizes are just a token count);
    - between two points the time is interpolated as a power law (linear in log-log), exact at
      the rows; outside them the nearest segment's power law extrapolates (one point: linear);
    - a batch without rows is linear in batch through the two nearest measured batches (one
      measured batch: proportional);
    - rows with ``includes_comm`` false get ``comm_time_s`` added when the table has a comm model.
    Allowed degrees: the degrees profiled for the model that divide its number of heads.
    Results are memoised per argument tuple (the planner asks the same few shapes again and again).
    """

    def __init__(self, table: ProfileTable, *, comm_by_model: dict[str, CommModel | None] | None = None) -> None:
        self.table = table
        self._comm_by_model = {m: table.comm for m in table.models}
        if comm_by_model:
            self._comm_by_model.update(comm_by_model)
        points: dict[tuple[str, int, int], list[tuple[float, float, bool]]] = {}
        for r in table.rows:
            mp = table.models[r.model]
            tokens = _image_tokens(r.height, r.width) + mp.num_text_tokens
            points.setdefault((r.model, r.batch, r.sp_degree), []).append((float(tokens), r.compute_s, r.includes_comm))
        self._points = {k: sorted(v) for k, v in points.items()}
        degrees: dict[str, set[int]] = {}
        batches: dict[tuple[str, int], set[int]] = {}
        for model, batch, k in self._points:
            degrees.setdefault(model, set()).add(k)
            batches.setdefault((model, k), set()).add(batch)
        self._degrees = {
            m: tuple(sorted(k for k in ks if table.models[m].num_heads % k == 0)) for m, ks in degrees.items()
        }
        self._batches = {key: tuple(sorted(b)) for key, b in batches.items()}
        self._memo: dict[tuple[str, int, int, int, int], float] = {}

    # ------------------------------------------------------------------ queries
    def models(self) -> tuple[str, ...]:
        return tuple(m for m in self.table.models if m in self._degrees)

    def model_profile(self, name: str) -> ModelProfile:
        try:
            return self.table.models[name]
        except KeyError:
            raise InvalidRequest(f"no profile for model {name!r} (known: {', '.join(self.models())})") from None

    def allowed_degrees(self, model: str) -> tuple[int, ...]:
        try:
            return self._degrees[model]
        except KeyError:
            raise InvalidRequest(f"no profile for model {model!r} (known: {', '.join(self.models())})") from None

    def step_time_s(self, model: str, height: int, width: int, batch: int, sp_degree: int) -> float:
        key = (model, height, width, batch, sp_degree)
        t = self._memo.get(key)
        if t is None:
            t = self._step_time(model, height, width, batch, sp_degree)
            self._memo[key] = t
        return t

    @property
    def parallel_capacity(self) -> int | None:
        """Devices that step at their profiled speed at once (``extra["parallel_capacity"]`` of
        the table, written by ``comfy-tetriserve profile --loaded``); None: all of them."""
        value = self.table.extra.get("parallel_capacity")
        return int(value) if value is not None else None

    @property
    def capture_steps(self) -> float:
        """Extra step times the first step at a new shape costs (``extra["capture_steps"]``, written by
        ``comfy-tetriserve profile --cuda-graphs``: warm-up and CUDA-graph capture); 0: none."""
        return float(self.table.extra.get("capture_steps", 0.0))

    def comm_s(self, model: str, height: int, width: int, batch: int, sp_degree: int) -> float:
        comm = self._comm_by_model.get(model)
        return comm_time_s(comm, self.model_profile(model), height, width, batch, sp_degree) if comm else 0.0

    def with_table(self, extra: ProfileTable) -> "ProfileCostModel":
        """A new model with ``extra``'s models and rows added; rows of a model in ``extra`` replace ours."""
        replaced = set(extra.models)
        rows = tuple(r for r in self.table.rows if r.model not in replaced) + extra.rows
        merged = dataclasses.replace(self.table, models={**self.table.models, **extra.models}, rows=rows)
        comm = dict(self._comm_by_model)
        comm.update({m: extra.comm for m in extra.models})
        return ProfileCostModel(merged, comm_by_model=comm)

    # ---------------------------------------------------------------- internals
    def _step_time(self, model: str, height: int, width: int, batch: int, k: int) -> float:
        if k not in self.allowed_degrees(model):
            raise InvalidRequest(f"degree {k} not profiled or not allowed for {model} (allowed: {self._degrees[model]})")
        if batch < 1 or height <= 0 or width <= 0:
            raise InvalidRequest(f"bad shape {height}x{width} batch {batch}")
        mp = self.table.models[model]
        tokens = float(_image_tokens(height, width) + mp.num_text_tokens)
        measured = self._batches[(model, k)]
        if batch in measured:
            compute, with_comm = self._interp(self._points[(model, batch, k)], tokens)
        else:
            below = [b for b in measured if b < batch]
            pair = (below[-2:] if len(below) >= 2 else measured[:2])
            if len(pair) == 1:
                t1, with_comm = self._interp(self._points[(model, pair[0], k)], tokens)
                compute = t1 * batch / pair[0]
            else:
                (b1, b2) = pair
                t1, with_comm = self._interp(self._points[(model, b1, k)], tokens)
                t2, _ = self._interp(self._points[(model, b2, k)], tokens)
                compute = max(t1 + (t2 - t1) * (batch - b1) / (b2 - b1), t1 * 0.5)
        if with_comm:
            return compute
        return compute + self.comm_s(model, height, width, batch, k)

    @staticmethod
    def _interp(points: list[tuple[float, float, bool]], tokens: float) -> tuple[float, bool]:
        if len(points) == 1:
            n, t, c = points[0]
            return t * tokens / n, c
        for i in range(len(points) - 1):
            if tokens <= points[i + 1][0] or i == len(points) - 2:
                (n1, t1, c1), (n2, t2, _) = points[i], points[i + 1]
                if tokens == n1:
                    return t1, c1
                slope = math.log(t2 / t1) / math.log(n2 / n1)
                return t1 * (tokens / n1) ** slope, c1
        raise AssertionError("unreachable")


# ------------------------------------------------------------------------ size-aware pricing
def step_flops(mp: ModelProfile, height: int, width: int, batch: int = 1, *, mlp_ratio: float = 4.0) -> float:
    """Floating-point operations of one DiT forward (one denoising step) at ``height`` x ``width``.

    The one place the project turns an architecture into work; families with other block shapes
    extend it here. Per attention layer over T = image + text tokens of width h (batch B):
    linear layers 2 x T x (4 h^2 + 2 x mlp_ratio x h^2) (q, k, v, out projections and the MLP),
    attention 4 x T^2 x h (scores and the weighted sum). FLUX's double-stream blocks have a weight
    set per stream but each token passes one of them, so they count like one joint block; its
    single-stream blocks run attention and MLP side by side, the same work.
    """
    tokens = float(_image_tokens(height, width) + mp.num_text_tokens)
    h = float(mp.hidden_size)
    linear = 2.0 * tokens * (4.0 + 2.0 * mlp_ratio) * h * h
    attention = 4.0 * tokens * tokens * h
    return batch * mp.num_attention_layers * (linear + attention)


class FlopScaledCostModel:
    """Prices models a base ``CostModel`` has never measured by a profiled model of similar kind.

    ``scaled[name] = (reference, architecture)``: the step time of ``name`` is the reference's
    measured time times ``step_flops(architecture) / step_flops(reference's architecture)`` at the
    same shape (so attention-heavy sizes scale by their own share). Communication scales the same
    way, which over-prices it slightly for a wider model (it grows with width, not width^2); the
    result is *modelled*, not measured, and ``is_modelled(name)`` says so until a profile replaces it.
    Allowed degrees: the reference's, filtered to divisors of the model's heads.
    """

    def __init__(self, base: CostModel, reference_profile: Callable[[str], ModelProfile]) -> None:
        self.base = base
        self._reference_profile = reference_profile
        self._scaled: dict[str, tuple[str, ModelProfile]] = {}
        self._memo: dict[tuple[str, int, int, int], float] = {}
        self._steps: dict[tuple[str, int, int, int, int], float] = {}

    def add(self, name: str, reference: str, arch: ModelProfile) -> float:
        """Price ``name`` (architecture ``arch``) from ``reference``; returns the 1024 px FLOP ratio."""
        self._scaled[name] = (reference, arch)
        self._memo = {k: v for k, v in self._memo.items() if k[0] != name}
        self._steps = {k: v for k, v in self._steps.items() if k[0] != name}
        return self.flop_ratio(name, 1024, 1024, 1)

    def is_modelled(self, name: str) -> bool:
        return name in self._scaled

    def reference_of(self, name: str) -> str:
        return self._scaled[name][0] if name in self._scaled else name

    def flop_ratio(self, name: str, height: int, width: int, batch: int) -> float:
        if name not in self._scaled:
            return 1.0
        key = (name, height, width, batch)
        ratio = self._memo.get(key)
        if ratio is None:
            reference, arch = self._scaled[name]
            ref = self._reference_profile(reference)
            ratio = step_flops(arch, height, width, batch) / step_flops(ref, height, width, batch)
            self._memo[key] = ratio
        return ratio

    def step_time_s(self, model: str, height: int, width: int, batch: int, sp_degree: int) -> float:
        key = (model, height, width, batch, sp_degree)
        t = self._steps.get(key)
        if t is None:
            t = self.base.step_time_s(self.reference_of(model), height, width, batch, sp_degree)
            t *= self.flop_ratio(model, height, width, batch)
            self._steps[key] = t
        return t

    def allowed_degrees(self, model: str) -> tuple[int, ...]:
        degrees = tuple(self.base.allowed_degrees(self.reference_of(model)))
        if model in self._scaled:
            heads = self._scaled[model][1].num_heads
            degrees = tuple(d for d in degrees if heads % d == 0)
        return degrees

    @property
    def parallel_capacity(self) -> int | None:
        return parallel_capacity(self.base)

    @property
    def capture_steps(self) -> float:
        return float(getattr(self.base, "capture_steps", 0.0) or 0.0)


# ------------------------------------------------------------------------ online correction
class OnlineCostModel:
    """A ``CostModel`` that corrects a base model from measured step times.

    Estimator: per key (model, degree, token bucket), the ratio measured / predicted of every
    observed step is clipped to [``clip_lo``, ``clip_hi``] (one slow step from a hiccup cannot
    swing it), then averaged: the plain mean for the first ``warmup`` observations, an EWMA with
    weight ``alpha`` after that (follows drift, forgets old behaviour). Beside the mean, the
    ratios' variance is tracked the same way, and a key's correction is used only when the mean
    lies more than ``z`` standard errors of that average away from 1 (*evidence of drift*): step
    times that are merely noisy around the profile leave it alone, where correcting would chase
    the noise (half the time towards steps that are too short), while a consistently slower or
    faster engine is learnt from the first steps (its ratios barely vary). The factor is bounded
    to [``clip_lo``, ``clip_hi``] too. The token bucket is round(log2(image tokens x batch)), so
    neighbouring resolutions share what was learnt. A prediction multiplies the base time by the
    factor of its key, else the mean factor of (model, degree) over buckets, else 1.

    ``drift()`` reports the averaged ratios, used or not: ``{"flux-dev/sp4/4096tok": 1.07, ...}``
    (bucket named by its token count), i.e. measured / predicted; 1.0 means the base model is right.
    """

    def __init__(self, base: CostModel, *, alpha: float = 0.1, warmup: int = 10,
                 clip_lo: float = 0.5, clip_hi: float = 2.0, z: float = 3.0) -> None:
        if not 0 < alpha <= 1 or not 0 < clip_lo <= 1 <= clip_hi or z < 0:
            raise InvalidRequest("bad OnlineCostModel settings")
        self.base = base
        self.alpha, self.warmup, self.clip_lo, self.clip_hi, self.z = alpha, warmup, clip_lo, clip_hi, z
        self._factor: dict[tuple[str, int, int], float] = {}  # the averaged ratio
        self._var: dict[tuple[str, int, int], float] = {}  # the ratios' variance, averaged the same way
        self._used: dict[tuple[str, int, int], float] = {}  # the factor predictions use
        self._count: dict[tuple[str, int, int], int] = {}
        self._model_degree: dict[tuple[str, int], float] = {}

    @staticmethod
    def _bucket(height: int, width: int, batch: int) -> int:
        return round(math.log2(max(_image_tokens(height, width) * batch, 1)))

    def allowed_degrees(self, model: str) -> tuple[int, ...]:
        return self.base.allowed_degrees(model)

    @property
    def parallel_capacity(self) -> int | None:
        return parallel_capacity(self.base)

    @property
    def capture_steps(self) -> float:
        return float(getattr(self.base, "capture_steps", 0.0) or 0.0)

    def factor(self, model: str, height: int, width: int, batch: int, sp_degree: int) -> float:
        f = self._used.get((model, sp_degree, self._bucket(height, width, batch)))
        if f is None:
            f = self._model_degree.get((model, sp_degree), 1.0)
        return f

    def step_time_s(self, model: str, height: int, width: int, batch: int, sp_degree: int) -> float:
        return self.base.step_time_s(model, height, width, batch, sp_degree) * self.factor(
            model, height, width, batch, sp_degree)

    def observe(self, model: str, height: int, width: int, batch: int, sp_degree: int, measured_step_s: float) -> None:
        """Fold one measured step time into the correction (non-positive or non-finite times are ignored)."""
        if not math.isfinite(measured_step_s) or measured_step_s <= 0:
            return
        predicted = self.base.step_time_s(model, height, width, batch, sp_degree)
        ratio = min(max(measured_step_s / predicted, self.clip_lo), self.clip_hi)
        key = (model, sp_degree, self._bucket(height, width, batch))
        n = self._count.get(key, 0) + 1
        self._count[key] = n
        weight = max(1.0 / n, self.alpha) if n <= self.warmup else self.alpha
        old = self._factor.get(key, ratio)
        mean = min(max(old + weight * (ratio - old), self.clip_lo), self.clip_hi)
        var = (1.0 - weight) * (self._var.get(key, 0.0) + weight * (ratio - old) ** 2)
        self._factor[key], self._var[key] = mean, var
        # standard error of the average: sqrt(var / n) for the plain mean, sqrt(var w / (2 - w)) for the EWMA
        se = math.sqrt(var / n) if n <= self.warmup else math.sqrt(var * self.alpha / (2.0 - self.alpha))
        self._used[key] = mean if abs(mean - 1.0) > self.z * se else 1.0
        same = [f for (m, k, _), f in self._used.items() if m == model and k == sp_degree]
        self._model_degree[(model, sp_degree)] = sum(same) / len(same)

    def drift(self) -> dict[str, float]:
        return {f"{m}/sp{k}/{2 ** b}tok": round(f, 4) for (m, k, b), f in sorted(self._factor.items())}

    def observations(self) -> int:
        return sum(self._count.values())


def model_profile_of(cost: CostModel, model: str) -> ModelProfile | None:
    """The architecture numbers ``cost`` (or a model it wraps, via ``.base``) has for ``model``."""
    seen = 0
    while cost is not None and seen < 8:
        getter = getattr(cost, "model_profile", None)
        if getter is not None:
            try:
                return getter(model)
            except (InvalidRequest, KeyError):
                return None
        cost, seen = getattr(cost, "base", None), seen + 1
    return None


def parallel_capacity(cost: CostModel) -> int | None:
    """The cost model's ``parallel_capacity`` (see CostModel), None when it has none."""
    value = getattr(cost, "parallel_capacity", None)
    return int(value) if value is not None and value >= 1 else None


def warmup_time_s(cost: CostModel, model: str, height: int, width: int, batch: int, sp_degree: int) -> float:
    """What the first step at a shape a device group has not run yet costs on top of a step: the
    cost model's ``capture_steps`` (0 when it has none: eager engines warm up for free) times the
    step time. An assignment's time is ``steps * step_time_s + (0 if warm else warmup_time_s)``."""
    extra = float(getattr(cost, "capture_steps", 0.0) or 0.0)
    if extra <= 0:
        return 0.0
    return extra * cost.step_time_s(model, height, width, batch, sp_degree)


# ------------------------------------------------------------------------------- loading
PROFILES_DIR = Path(__file__).parent / "profiles"


def load_cost_model(spec: str) -> ProfileCostModel:
    """``"h200"`` (or any name of a shipped profile) or a path to a profile JSON file."""
    shipped = PROFILES_DIR / f"{spec}.json"
    if "/" not in spec and not spec.endswith(".json") and shipped.exists():
        return ProfileCostModel(load_profile(shipped))
    path = Path(spec)
    if not path.exists():
        names = sorted(p.stem for p in PROFILES_DIR.glob("*.json"))
        raise InvalidRequest(f"no profile {spec!r}: neither a shipped profile ({', '.join(names)}) nor a file")
    return ProfileCostModel(load_profile(path))


def priced_size(height: int, width: int, extra_tokens: int) -> tuple[int, int]:
    """(height, width) in pixels of an image with at least ``extra_tokens`` more tokens than
    ``height`` x ``width``: the same height, the width grown by whole columns of tokens.

    Cost models price a step by its token count, so a FLUX Kontext job (whose reference latents
    add image tokens to every forward) is planned as this larger image.
    """
    if extra_tokens <= 0:
        return height, width
    rows = height // 16
    return height, width + (-(-extra_tokens // rows)) * 16
