"""Seeded workloads in the paper's shape: Poisson arrivals, a resolution mix, deadlines per resolution.

A trace depends on (seed, rate, mix, number of requests) for its arrivals and resolutions; the SLO
scale only sets deadlines (arrival + scale x base). So the policies and the SLO scales of one seed
are compared on exactly the same arrivals.
"""
from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import InvalidRequest
from ..policy.common import PAPER_BASE_DEADLINE_S
from ..plan import aligned_groups
from ..types import GenRequest, RequestSnapshot, SchedulerView

RESOLUTIONS: tuple[int, ...] = (256, 512, 1024, 2048)


def skewed_weights(resolutions: Sequence[int] = RESOLUTIONS) -> tuple[float, ...]:
    """The paper's Skewed mix: p proportional to exp(tokens / max tokens)."""
    tokens = [r * r for r in resolutions]
    w = [math.exp(t / max(tokens)) for t in tokens]
    return tuple(x / sum(w) for x in w)


MIXES: dict[str, tuple[float, ...]] = {
    "uniform": tuple(1 / len(RESOLUTIONS) for _ in RESOLUTIONS),
    "skewed": skewed_weights(),
    "small": (0.5, 0.5, 0.0, 0.0),  # 256 and 512 px only: where selective batching can matter
}


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 300
    rate_per_min: float = 12.0
    mix: str = "uniform"
    slo_scale: float = 1.0
    num_steps: int = 50
    model: str = "flux-dev"
    seed: int = 0
    resolutions: tuple[int, ...] = RESOLUTIONS
    base_deadline_s: Mapping[int, float] = field(default_factory=lambda: dict(PAPER_BASE_DEADLINE_S))
    best_effort_fraction: float = 0.0  # share of requests without a deadline
    start_at: float = 0.0
    id_prefix: str = "r"
    burst_size: int = 1  # > 1: requests arrive in bursts of this many at one instant, same mean rate

    def __post_init__(self) -> None:
        if self.mix not in MIXES:
            raise InvalidRequest(f"unknown mix {self.mix!r} (known: {', '.join(MIXES)})")
        if self.num_requests < 0 or self.rate_per_min <= 0 or self.slo_scale <= 0 or self.num_steps < 1:
            raise InvalidRequest(f"workload out of range: {self}")
        if not 0.0 <= self.best_effort_fraction <= 1.0:
            raise InvalidRequest("best_effort_fraction must lie in [0, 1]")
        if self.burst_size < 1:
            raise InvalidRequest(f"burst_size must be >= 1, got {self.burst_size}")


def make_trace(spec: WorkloadSpec) -> tuple[GenRequest, ...]:
    """The requests of ``spec`` in arrival order, ids ``r0000``, ``r0001``, ... (``id_prefix`` + index).

    With ``burst_size`` b > 1 the bursts are Poisson at rate / b and each brings b requests at
    the same instant (same mean rate; the resolutions are drawn per request as usual)."""
    rng = random.Random(f"{spec.seed}/{spec.rate_per_min}/{spec.mix}")
    weights = MIXES[spec.mix]
    if len(weights) != len(spec.resolutions):
        raise InvalidRequest("mix weights and resolutions differ in length")
    rate_per_s = spec.rate_per_min / 60.0
    t = spec.start_at
    out = []
    for i in range(spec.num_requests):
        if i % spec.burst_size == 0:
            t += rng.expovariate(rate_per_s / spec.burst_size)
        res = rng.choices(spec.resolutions, weights=weights)[0]
        best_effort = rng.random() < spec.best_effort_fraction
        deadline = None if best_effort else t + spec.slo_scale * spec.base_deadline_s[res]
        out.append(GenRequest(
            request_id=f"{spec.id_prefix}{i:04d}", model=spec.model, height=res, width=res, num_steps=spec.num_steps,
            arrival_at=t, deadline_at=deadline,
        ))
    return tuple(out)


def make_random_view(num_active: int, *, seed: int = 0, num_gpus: int = 8, model: str = "flux-dev",
                     mix: str = "uniform", num_steps: int = 50, running: bool | None = None,
                     now: float = 1000.0, best_effort_fraction: float = 0.0) -> SchedulerView:
    """A planner's-eye snapshot with ``num_active`` open requests, for timing decisions.

    Resolutions follow ``mix``; each request has done 0-45 steps and has between -0.2 and 1.5 times
    its resolution's base deadline left (so some are late, some comfortable), or no deadline at all
    with probability ``best_effort_fraction``. With ``running``
    (default: every other seed) a random set of requests holds disjoint aligned groups on about
    half the GPUs, as in the middle of a round.
    """
    rng = random.Random(f"view/{seed}/{num_active}")
    weights = MIXES[mix]
    base = PAPER_BASE_DEADLINE_S
    requests = []
    for i in range(num_active):
        res = rng.choices(RESOLUTIONS, weights=weights)[0]
        done = rng.randint(0, min(45, num_steps - 1))
        left_s = rng.uniform(-0.2, 1.5) * base[res]
        arrival = now - rng.uniform(0.0, 1.5) * base[res]
        deadline = None if rng.random() < best_effort_fraction else max(now + left_s, arrival)
        requests.append(RequestSnapshot(GenRequest(
            request_id=f"v{i:04d}", model=model, height=res, width=res, num_steps=num_steps,
            arrival_at=arrival, deadline_at=deadline), steps_done=done))
    groups = aligned_groups(range(num_gpus))
    busy: set[int] = set()
    if running if running is not None else seed % 2 == 1:
        for i, snap in enumerate(requests):
            if len(busy) >= num_gpus // 2:
                break
            size = rng.choice([1, 2, 4])
            free = [g for g in groups if len(g) == size and busy.isdisjoint(g)]
            if not free or rng.random() < 0.5:
                continue
            g = rng.choice(free)
            busy.update(g)
            requests[i] = RequestSnapshot(snap.request, snap.steps_done, gpu_ids=g,
                                          running_until_at=now + rng.uniform(0.05, 0.5), steps_in_flight=3)
    return SchedulerView(now=now, round_index=0, gpu_ids=tuple(range(num_gpus)), groups=groups,
                         requests=tuple(requests), busy_gpu_ids=frozenset(busy))
