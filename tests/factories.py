"""Factories shared by the tests: requests, views, cost models (tiny models come with the engine)."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from comfy_tetriserve.plan import aligned_groups
from comfy_tetriserve.types import GenRequest, RequestSnapshot, SchedulerView

_ids = itertools.count()


def make_request(
    *,
    request_id: str | None = None,
    model: str = "flux-dev",
    res: int = 512,
    height: int | None = None,
    width: int | None = None,
    num_steps: int = 50,
    arrival_at: float = 0.0,
    deadline_s: float | None = 5.0,
    batch: int = 1,
    tenant: str = "default",
    priority: int = 0,
) -> GenRequest:
    """A request; ``deadline_s`` is relative to arrival (None = best effort)."""
    return GenRequest(
        request_id=request_id or f"r{next(_ids)}",
        model=model,
        height=height or res,
        width=width or res,
        num_steps=num_steps,
        arrival_at=arrival_at,
        deadline_at=None if deadline_s is None else arrival_at + deadline_s,
        batch=batch,
        tenant=tenant,
        priority=priority,
    )


def make_view(
    requests: Sequence[GenRequest | RequestSnapshot],
    *,
    now: float = 0.0,
    num_gpus: int = 8,
    busy: Sequence[int] = (),
    round_index: int = 0,
    groups: Sequence[tuple[int, ...]] | None = None,
) -> SchedulerView:
    snaps = tuple(r if isinstance(r, RequestSnapshot) else RequestSnapshot(request=r, steps_done=0) for r in requests)
    gpu_ids = tuple(range(num_gpus))
    return SchedulerView(
        now=now,
        round_index=round_index,
        gpu_ids=gpu_ids,
        groups=tuple(groups) if groups is not None else aligned_groups(gpu_ids),
        requests=snaps,
        busy_gpu_ids=frozenset(busy),
    )


@dataclass(frozen=True)
class PowerLawCost:
    """An analytic cost model for engine tests: T = base * (tokens/4096) * batch / k**exponent.

    Deliberately simple (the real one is comfy_tetriserve.cost's profile model); enough to make
    step times depend on size, batch and degree in the right direction.
    """

    base_s: float = 0.1
    exponent: float = 0.8
    degrees: tuple[int, ...] = (1, 2, 4, 8)

    def step_time_s(self, model: str, height: int, width: int, batch: int, sp_degree: int) -> float:
        tokens = (height // 16) * (width // 16)
        return self.base_s * (tokens / 4096) * batch / sp_degree ** self.exponent

    def allowed_degrees(self, model: str) -> tuple[int, ...]:
        return self.degrees
