"""Cost model: the time of one denoising step, T(model, resolution, batch, degree).

The planner and the simulator see step times only through the ``CostModel`` protocol.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class CostModel(Protocol):
    def step_time_s(self, model: str, height: int, width: int, batch: int, sp_degree: int) -> float:
        """Predicted wall time of one denoising step on ``sp_degree`` GPUs (compute + communication)."""
        ...

    def allowed_degrees(self, model: str) -> tuple[int, ...]:
        """Sequence-parallel degrees the model supports (ascending), before any GPU-count limit."""
        ...
