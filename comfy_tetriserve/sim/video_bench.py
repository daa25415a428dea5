"""The ``video`` bench section: a studio mix of FLUX images and Wan 14B clips on 8 simulated H200s.

Classes (``VIDEO_CLASSES``): FLUX-dev images at the paper's four resolutions (50 steps, no CFG)
and Wan 2.1 14B text-to-video clips of 81 frames at 480p (832 x 480) and 720p (1280 x 720),
30 steps with CFG (two sequences per forward). FLUX is priced by its measured H200 rows; Wan by
FLOPs from those rows (``flop_cost.FlopCostModel``: modelled, not measured).

Deadlines: each class has a base ``BASE_FACTOR`` x its isolated best-degree latency (the
request alone on the box at its fastest degree: steps x min_k T(k)); a request's deadline is
arrival + scale x base. Policies: TetriServe, SP=1/2/4/8, the best fixed degree per class
(``ClassDegreePolicy``: per class the degree of least GPU time whose isolated latency meets the
class base, else the fastest; FCFS like SP=k), and EDF with those per-class degrees.
"""
from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..cost import CostModel
from ..flop_cost import FlopCostModel
from ..policy import make_policy
from ..policy.baselines import EdfPolicy, _capped_degree, _plan
from ..policy.common import fcfs_order, usable_degrees
from ..types import GenRequest, RoundPlan, SchedulerView
from .simulator import SimConfig, simulate

#: base deadline = BASE_FACTOR x isolated best-degree latency
BASE_FACTOR = 1.5
VIDEO_POLICIES = ("tetriserve", "sp1", "sp2", "sp4", "sp8", "best-per-class", "edf")


@dataclass(frozen=True)
class VideoClass:
    name: str
    model: str
    height: int
    width: int
    num_steps: int
    batch: int  # sequences per forward (2: CFG)
    weight: float


VIDEO_CLASSES: tuple[VideoClass, ...] = (
    VideoClass("flux-256", "flux-dev", 256, 256, 50, 1, 0.2),
    VideoClass("flux-512", "flux-dev", 512, 512, 50, 1, 0.2),
    VideoClass("flux-1024", "flux-dev", 1024, 1024, 50, 1, 0.2),
    VideoClass("flux-2048", "flux-dev", 2048, 2048, 50, 1, 0.2),
    VideoClass("wan-480p", "wan2.1-t2v-14b", 480, 832, 30, 2, 0.12),
    VideoClass("wan-720p", "wan2.1-t2v-14b", 720, 1280, 30, 2, 0.08),
)


def class_key(r: GenRequest) -> tuple[str, int, int]:
    return (r.model, r.height, r.width)


def best_latency_s(cost: CostModel, c: VideoClass, num_gpus: int) -> float:
    ks = usable_degrees(cost, c.model, num_gpus)
    return c.num_steps * min(cost.step_time_s(c.model, c.height, c.width, c.batch, k) for k in ks)


def base_deadlines(cost: CostModel, num_gpus: int,
                   classes: tuple[VideoClass, ...] = VIDEO_CLASSES) -> dict[str, float]:
    return {c.name: BASE_FACTOR * best_latency_s(cost, c, num_gpus) for c in classes}


def class_degrees(cost: CostModel, num_gpus: int, classes: tuple[VideoClass, ...] = VIDEO_CLASSES
                  ) -> dict[tuple[str, int, int], int]:
    """Per class: least GPU time among degrees whose isolated latency meets the base (else fastest)."""
    base = base_deadlines(cost, num_gpus, classes)
    out = {}
    for c in classes:
        ks = usable_degrees(cost, c.model, num_gpus)
        times = {k: c.num_steps * cost.step_time_s(c.model, c.height, c.width, c.batch, k) for k in ks}
        fits = [k for k in ks if times[k] <= base[c.name]]
        out[(c.model, c.height, c.width)] = (min(fits, key=lambda k: (k * times[k], k)) if fits
                                             else min(ks, key=lambda k: (times[k], k)))
    return out


@dataclass(frozen=True)
class ClassDegreePolicy:
    """One fixed degree per request class (model, height, width); FCFS, non-preemptive, backfill."""

    degrees: Mapping[tuple[str, int, int], int] = field(default_factory=dict)
    backfill: bool = True
    name: str = "best-per-class"

    def degree_for(self, snap, cost: CostModel, num_gpus: int) -> int:
        r = snap.request
        return _capped_degree(cost, r.model, self.degrees.get(class_key(r), 1), num_gpus)

    def plan_round(self, view: SchedulerView, cost: CostModel) -> RoundPlan:
        n = len(view.gpu_ids)
        return _plan(view, cost, fcfs_order(view.plannable), lambda s: self.degree_for(s, cost, n),
                     lambda s: s.steps_left, self.backfill)


def make_video_trace(num_requests: int, rate_per_min: float, scale: float, seed: int,
                     base: Mapping[str, float], classes: tuple[VideoClass, ...] = VIDEO_CLASSES
                     ) -> tuple[GenRequest, ...]:
    """Poisson arrivals, classes by weight; the same arrivals for every scale of one seed."""
    rng = random.Random(f"video/{seed}/{rate_per_min}")
    t, out = 0.0, []
    for i in range(num_requests):
        t += rng.expovariate(rate_per_min / 60.0)
        c = rng.choices(classes, weights=[x.weight for x in classes])[0]
        out.append(GenRequest(request_id=f"v{i:04d}", model=c.model, height=c.height, width=c.width,
                              num_steps=c.num_steps, arrival_at=t, deadline_at=t + scale * base[c.name],
                              batch=c.batch))
    return tuple(out)


def make_video_policy(name: str, cost: CostModel, num_gpus: int):
    if name == "best-per-class":
        return ClassDegreePolicy(class_degrees(cost, num_gpus))
    if name == "edf":
        return EdfPolicy(rssp=ClassDegreePolicy(class_degrees(cost, num_gpus)))  # type: ignore[arg-type]
    return make_policy(name)


_COST: dict[str, FlopCostModel] = {}


def video_cost(profile: str) -> FlopCostModel:
    if profile not in _COST:
        from ..cost import load_cost_model

        _COST[profile] = FlopCostModel(load_cost_model(profile))
    return _COST[profile]


def run_video_task(args: tuple[str, str, int, int, float, float, int]) -> dict[str, Any]:
    """One simulation (worker process): (profile, policy, num_gpus, num_requests, rate, scale, seed)."""
    profile, policy, num_gpus, num_requests, rate, scale, seed = args
    cost = video_cost(profile)
    trace = make_video_trace(num_requests, rate, scale, seed, base_deadlines(cost, num_gpus))
    pol = (make_policy("tetriserve", **TETRISERVE_VIDEO_OPTIONS) if policy == "tetriserve"
           else make_video_policy(policy, cost, num_gpus))
    res = simulate(trace, pol, cost, SimConfig(num_gpus=num_gpus),
                   cost_name=f"{profile} + FLOPs (modelled)")
    by_class = {}
    for c in VIDEO_CLASSES:
        outs = [o for o in res.outcomes if class_key(o.request) == (c.model, c.height, c.width)]
        by_class[c.name] = res.sar(outs) if outs else float("nan")
    return {"sar": res.sar(), "sar_by_class": by_class, "mean_degree": res.mean_degree()}


#: TetriServe's settings in this section: one-step rounds of the fastest live step ("fast-min").
#: The image defaults (5 steps of the slowest request's fastest step) make rounds several seconds
#: long once a Wan clip is live (a 720p step is over 3 s even at 8 GPUs), and images arriving
#: mid-round wait for the round end; both variants are reported.
TETRISERVE_VIDEO_OPTIONS: dict[str, Any] = {"granularity_steps": 1, "tau_rule": "fast-min"}


def run_variant_task(args: tuple[str, str, int, int, float, float, int]) -> dict[str, Any]:
    """TetriServe with its image defaults (``tetriserve-image-defaults``) or a listed policy."""
    profile, policy, num_gpus, num_requests, rate, scale, seed = args
    if policy != "tetriserve-image-defaults":
        return run_video_task(args)
    cost = video_cost(profile)
    trace = make_video_trace(num_requests, rate, scale, seed, base_deadlines(cost, num_gpus))
    res = simulate(trace, make_policy("tetriserve"), cost, SimConfig(num_gpus=num_gpus))
    return {"sar": res.sar(), "sar_by_class": {}, "mean_degree": res.mean_degree()}


def section(bench) -> str:
    """The bench section (``Bench.section_video`` delegates here); fills report["video"]."""
    from . import report as rep
    from .bench import _map, _mean

    c = bench.c
    cost = video_cost(c.profile)
    policies = list(VIDEO_POLICIES) + ["tetriserve-image-defaults"]
    keys, tasks = [], []
    for scale in c.scales:
        for p in policies:
            for seed in range(c.seeds):
                keys.append((scale, p))
                tasks.append((c.profile, p, c.num_gpus, c.video_requests, c.video_rate_per_min, scale,
                              c.first_seed + seed))
    results = _map(run_variant_task, tasks, bench.jobs)
    grid: dict = {}
    for k, r in zip(keys, results):
        grid.setdefault(k, []).append(r)
    sar: dict = {}
    by_class: dict = {}
    for (scale, p), runs in grid.items():
        s = f"{scale:.1f}"
        sar.setdefault(s, {})[p] = _mean(r["sar"] for r in runs)
        if runs[0]["sar_by_class"]:
            by_class.setdefault(s, {})[p] = {cls: _mean(r["sar_by_class"][cls] for r in runs)
                                              for cls in runs[0]["sar_by_class"]}
    base = base_deadlines(cost, c.num_gpus)
    bench.report["video"] = {
        "sar": sar, "sar_by_class": by_class,
        "cost_model": f"{c.profile} rows (FLUX-dev, measured) + FLOP pricing from them for Wan (modelled): "
                      + cost.describe(),
        "classes": [{"name": x.name, "model": x.model, "height": x.height, "width": x.width, "steps": x.num_steps,
                     "batch": x.batch, "weight": x.weight, "base_deadline_s": round(base[x.name], 3)}
                    for x in VIDEO_CLASSES],
        "base_factor": BASE_FACTOR, "rate_per_min": c.video_rate_per_min, "num_requests": c.video_requests,
        "tetriserve_options": TETRISERVE_VIDEO_OPTIONS,
        "best_per_class_degrees": {f"{m} {h}x{w}": k for (m, h, w), k in class_degrees(cost, c.num_gpus).items()},
    }
    rows = [[s] + [f"{sar[s][p]:.3f}" for p in policies] for s in sar]
    bases = ", ".join(f"{x.name} {base[x.name]:.1f} s" for x in VIDEO_CLASSES)
    return (f"Studio mix (FLUX images + Wan 14B 81-frame clips), {c.num_gpus} GPUs, {c.video_rate_per_min:g} req/min; "
            f"cost: FLUX rows measured, Wan modelled by FLOPs\nbase deadlines: {bases}\n"
            + rep.format_table(["scale"] + policies, rows))
