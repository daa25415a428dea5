"""The demo's workload: seeded jobs with arrival times and deadlines derived from the measured profile.

Both policies replay the same list (same seed, same arrivals, same deadlines, same tensors).

- Shapes: tiny FLUX at 256, 512 and 768 px and tiny SD3 at 256 and 384 px (the tiny SD3's
  positional table ends at 384 px), equally likely, ``steps`` denoising steps each.
- Arrivals: Poisson. The rate follows from ``load``: the mean work of a job at degree 1 (steps x
  the profiled degree-1 step time) times the rate, over the number of workers. The demo's
  profile prices steps with every worker busy (assets.py), so load 1.0 keeps the box busy; the
  default 0.65 offers the same jobs per second as load 0.3 did with the profile measured one job
  at a time (a worker stepped 2.2x faster alone).
- Deadlines: ``max(scale x steps x T_fast + margin_s, min_deadline_s)`` after arrival, T_fast
  the fastest profiled step of the shape (any degree), ``scale`` drawn from ``slo_scales``: every
  deadline can be met by the job at its fastest degree on a busy box; the small scales only at
  that degree. ``margin_s`` covers the per-job cost outside the steps (HTTP, admission, the
  result); ``min_deadline_s`` keeps the smallest jobs' deadlines above a planning round (a job of
  a few milliseconds of work is not given a deadline no scheduler with rounds can see). A share
  ``best_effort_fraction`` of the jobs has no deadline.
- Clients: jobs are dealt round-robin to ``num_clients`` tenants, each a concurrent client with
  its own lease.

Pure: no torch, no I/O.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ..cost import CostModel

#: text tokens of every job's conditioning; the profile is measured with the same count
TEXT_TOKENS = 32


@dataclass(frozen=True)
class JobShape:
    family: str  # "flux" | "sd3"
    model: str  # the model's name at the service
    res: int  # square, pixels


@dataclass(frozen=True)
class DemoJob:
    index: int
    tenant: str
    shape: JobShape
    steps: int
    seed: int
    arrival_s: float  # after the start of the replay
    deadline_s: float | None  # after submission; None = best effort
    slo_scale: float | None

    @property
    def label(self) -> str:
        return f"{self.index:02d}"


@dataclass(frozen=True)
class WorkloadSpec:
    num_jobs: int = 40
    steps: int = 20
    load: float = 0.65
    slo_scales: tuple[float, ...] = (1.25, 1.5, 2.0, 3.0)
    margin_s: float = 0.1
    min_deadline_s: float = 0.5
    best_effort_fraction: float = 0.2
    num_clients: int = 3
    num_workers: int = 4
    seed: int = 0
    first_arrival_s: float = 0.2

    def __post_init__(self) -> None:
        if self.num_jobs < 1 or self.steps < 1 or not self.load > 0 or self.num_clients < 1 or self.num_workers < 1:
            raise ValueError(f"workload out of range: {self}")
        if not self.slo_scales or min(self.slo_scales) < 1.0:
            raise ValueError("slo_scales must be >= 1 (a deadline below the fastest run is infeasible)")
        if not 0.0 <= self.best_effort_fraction <= 1.0:
            raise ValueError("best_effort_fraction must lie in [0, 1]")


def default_shapes(models: dict[str, str]) -> tuple[JobShape, ...]:
    """family -> model name at the service, to the demo's shapes."""
    return (tuple(JobShape("flux", models["flux"], r) for r in (256, 512, 768))
            + tuple(JobShape("sd3", models["sd3"], r) for r in (256, 384)))


def resolutions_by_model(shapes: Sequence[JobShape]) -> dict[str, tuple[int, ...]]:
    out: dict[str, list[int]] = {}
    for s in shapes:
        out.setdefault(s.model, []).append(s.res)
    return {m: tuple(sorted(set(rs))) for m, rs in out.items()}


def step_s(cost: CostModel, shape: JobShape, degree: int) -> float:
    return cost.step_time_s(shape.model, shape.res, shape.res, 1, degree)


def fastest_step_s(cost: CostModel, shape: JobShape, num_workers: int) -> tuple[float, int]:
    """(step time, degree) of the shape's fastest profiled degree that fits the workers."""
    return min((step_s(cost, shape, k), k) for k in cost.allowed_degrees(shape.model) if k <= num_workers)


def arrival_rate_per_s(cost: CostModel, shapes: Sequence[JobShape], spec: WorkloadSpec) -> float:
    mean_work_s = sum(spec.steps * step_s(cost, s, 1) for s in shapes) / len(shapes)
    return spec.load * spec.num_workers / mean_work_s


def make_workload(cost: CostModel, shapes: Sequence[JobShape], spec: WorkloadSpec) -> tuple[DemoJob, ...]:
    """The jobs of ``spec`` in arrival order (see the module docstring)."""
    rng = random.Random(f"tetriserve-demo/{spec.seed}")
    rate = arrival_rate_per_s(cost, shapes, spec)
    t = spec.first_arrival_s
    jobs = []
    for i in range(spec.num_jobs):
        if i:
            t += rng.expovariate(rate)
        shape = rng.choice(list(shapes))
        best_effort = rng.random() < spec.best_effort_fraction
        scale = None if best_effort else rng.choice(spec.slo_scales)
        deadline = None
        if scale is not None:
            fast_s, _ = fastest_step_s(cost, shape, spec.num_workers)
            deadline = round(max(scale * spec.steps * fast_s + spec.margin_s, spec.min_deadline_s), 3)
        jobs.append(DemoJob(index=i, tenant=f"client{i % spec.num_clients + 1}", shape=shape, steps=spec.steps,
                            seed=1000 + i, arrival_s=round(t, 3), deadline_s=deadline, slo_scale=scale))
    return tuple(jobs)


def describe(jobs: Sequence[DemoJob], cost: CostModel, spec: WorkloadSpec) -> str:
    """One line: how many jobs, over how long, how loaded, how many with deadlines."""
    span = jobs[-1].arrival_s - jobs[0].arrival_s if len(jobs) > 1 else 0.0
    work = sum(j.steps * step_s(cost, j.shape, 1) for j in jobs)
    with_deadline = sum(j.deadline_s is not None for j in jobs)
    return (f"{len(jobs)} jobs over {span:.1f} s from {spec.num_clients} clients, {with_deadline} with deadlines "
            f"(scales {', '.join(f'{s:g}' for s in spec.slo_scales)} x the fastest profiled run + "
            f"{spec.margin_s:g} s, at least {spec.min_deadline_s:g} s), {len(jobs) - with_deadline} best effort; "
            f"{work:.1f} s of degree-1 work "
            f"(profile) for {spec.num_workers} workers")
