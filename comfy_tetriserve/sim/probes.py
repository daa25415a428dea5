"""Probes: the paper's workload with one thing changed, to see where a planner's lead depends on
the simulation being kind (``comfy-tetriserve bench --sections probes``).

- ``bursty``: arrivals in bursts of 5 at one instant (bursts Poisson at rate / 5: same mean rate).
- ``noisy``: every step's time drawn with coefficient of variation 0.1 around the profile's; the
  planner corrects its profile online from the steps as the service does (``OnlineCostModel``,
  which leaves noise around the profile alone).
- ``slow-engine``: every step takes 1.1x the profile's time; the planner starts from the profile
  and corrects it online from the simulated steps as the service does (``OnlineCostModel``, the
  same for every policy). ``SimConfig(online_correction=False)`` gives the stale-profile worst case.
- ``4-gpus``: the same traces on a box of 4 GPUs instead of 8.
- ``2x-rate``: twice the arrival rate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..cost import CostModel, parallel_capacity


@dataclass(frozen=True)
class Probe:
    name: str
    what: str
    spec: dict[str, Any] = field(default_factory=dict)  # WorkloadSpec changes
    sim: dict[str, Any] = field(default_factory=dict)  # SimConfig changes
    rate_factor: float = 1.0  # x the bench's arrival rate
    true_cost_scale: float = 1.0  # true step time / planned step time


PROBES: dict[str, Probe] = {p.name: p for p in (
    Probe("bursty", "bursts of 5 requests at one instant, same mean rate", spec={"burst_size": 5}),
    Probe("noisy", "step times with coefficient of variation 0.1 (corrected online as the service does)",
          sim={"step_jitter_cv": 0.1, "online_correction": True}),
    Probe("slow-engine", "every step 1.1x the profile (planned with the profile, corrected online as the service does)",
          sim={"online_correction": True}, true_cost_scale=1.1),
    Probe("4-gpus", "4 GPUs instead of 8", sim={"num_gpus": 4}),
    Probe("2x-rate", "twice the arrival rate", rate_factor=2.0),
)}


class ScaledCostModel:
    """``base`` with every step time multiplied by ``factor`` (a slower or faster engine)."""

    def __init__(self, base: CostModel, factor: float) -> None:
        if factor <= 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        self.base = base
        self.factor = factor

    @property
    def parallel_capacity(self) -> int | None:
        return parallel_capacity(self.base)

    def allowed_degrees(self, model: str) -> tuple[int, ...]:
        return self.base.allowed_degrees(model)

    def step_time_s(self, model: str, height: int, width: int, batch: int, sp_degree: int) -> float:
        return self.factor * self.base.step_time_s(model, height, width, batch, sp_degree)
