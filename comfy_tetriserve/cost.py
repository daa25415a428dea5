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

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

PROFILE_FORMAT = "comfy-tetriserve-profile/1"


@runtime_checkable
class CostModel(Protocol):
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
