"""``comfy-tetriserve bench``: the paper's evaluation in the simulator, as tables, JSON and PNG plots.

Sections (``--sections``): ``sar`` (every policy x SLO scale x mix, seeds; per resolution; latency;
gains), ``rate`` (arrival-rate sweep), ``ablation`` (planner only -> + placement -> + scale-up ->
+ batching, and the open decisions: tie-break, round length rule, two-degree order, admission,
margins, round alignment, GPU-id choice, aligned blocks vs all subsets, late cap, best-effort load,
arrival-aware limits on scale-up and round length),
``granularity`` (round length in steps), ``bound`` (offline MILP upper bound on small traces),
``decision`` (planner time per round at 16/64/256 active requests), ``steps`` (20/28/50 steps),
``overload`` (small images only, far beyond the paper's load: where EDF is hardest to beat; with
the TetriServe variants of ``ARRIVAL_VARIANTS`` at the two highest rates), ``multimodel`` (three models
that do not all fit everywhere: placement, loads, evictions; multimodel_bench.py), ``probes`` (the paper's
workload with one thing changed: bursty arrivals, step-time noise, a slower engine, 4 GPUs, twice
the rate; sim/probes.py, each with the offline bound on small traces), ``video`` (FLUX images and Wan 14B
clips, Wan priced by FLOPs: video_bench.py), ``cluster`` (two boxes at twice the rate: one cluster-wide
planner vs one planner per box behind a router, sim/cluster.py; not in the default run).
Every SAR row also carries the isolated bound (share of requests that could meet their deadline
alone on the whole box, sim.bound.isolated_bound) and the gain over the strongest of all baselines.
Every simulated number comes from the cost model named in the report (``cost_model``).

    comfy-tetriserve bench                      # the full run (about 4 minutes on 2 busy cores)
    comfy-tetriserve bench --quick              # a smoke run in seconds
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config as cfg
from ..cost import CostModel, ProfileCostModel, load_cost_model
from ..policy import make_policy
from ..types import GenRequest
from . import report as rep
from .bound import isolated_bound
from .probes import PROBES, ScaledCostModel
from .simulator import SimConfig, simulate
from .workload import MIXES, WorkloadSpec, make_random_view, make_trace

log = logging.getLogger(__name__)

ALL_POLICIES = ("tetriserve", "sp1", "sp2", "sp4", "sp8", "rssp", "rssp-paper", "edf",
                "sp1-admit", "sp2-admit", "sp4-admit", "sp8-admit", "rssp-admit", "edf-admit")
#: TetriServe variants measured both on the paper's load (ablation) and in the overload section:
#: the margins that contention scales, and the arrival-aware limits on scale-up and round length
ARRIVAL_VARIANTS: dict[str, dict[str, Any]] = {
    "fixed margins (plan 15%, admission 0%)": {"plan_margin_frac": 0.15, "admit_margin_frac": 0.0},
    "no admission margin": {"admit_margin_frac": 0.0},
    "scale-up: 1 GPU kept free": {"scale_up_reserve": 1},
    "scale-up: grants end within 40 ms": {"scale_up_commit_s": 0.04},
    "tau: at most 1/2 the tightest slack": {"tau_slack_frac": 0.5},
}
#: the probes compare TetriServe with the baselines that are strongest somewhere on the main table
PROBE_POLICIES = ("tetriserve", "edf", "sp2-admit", "sp4-admit", "sp8-admit", "rssp-admit", "edf-admit")
SECTIONS = ("sar", "rate", "ablation", "granularity", "bound", "decision", "steps", "overload", "multimodel",
            "probes", "video", "cluster")
#: run by default (``cluster`` simulates two boxes at twice the load, about 6 minutes on 2 cores: ask for it)
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != "cluster")


@dataclass(frozen=True)
class BenchConfig:
    profile: str = cfg.field("h200", help="cost model: a shipped profile name or a profile JSON path")
    model: str = cfg.field("flux-dev", help="model of every request")
    num_gpus: int = cfg.field(8, help="GPUs in the simulated box")
    num_requests: int = cfg.field(300, help="requests per trace")
    rate_per_min: float = cfg.field(12.0, help="Poisson arrival rate, requests per minute")
    num_steps: int = cfg.field(50, help="denoising steps per request")
    seeds: int = cfg.field(3, help="traces (seeds) per setting")
    first_seed: int = cfg.field(0, help="seed of each setting's first trace (the bound's small traces: 1000 + it); "
                                "another value reruns the bench on fresh traces")
    scales: tuple[float, ...] = cfg.field((1.0, 1.1, 1.2, 1.3, 1.4, 1.5), help="SLO scales")
    mixes: tuple[str, ...] = cfg.field(("uniform", "skewed"), help="resolution mixes")
    policies: tuple[str, ...] = cfg.field(ALL_POLICIES, help="policies to compare")
    rates: tuple[float, ...] = cfg.field((6.0, 9.0, 12.0, 15.0, 18.0), help="rate sweep, requests per minute")
    sweep_scale: float = cfg.field(1.2, help="SLO scale of the rate and granularity sweeps")
    granularities: tuple[int, ...] = cfg.field((1, 2, 5, 10, 15), help="round lengths to sweep, in steps")
    bound_requests: int = cfg.field(40, help="requests per small trace for the offline bound")
    bound_seeds: int = cfg.field(3, help="small traces per (mix, scale) for the bound")
    bound_tau_s: float = cfg.field(0.25, help="round length of the bound's program, seconds")
    decision_sizes: tuple[int, ...] = cfg.field((16, 64, 256), help="active requests for decision timing")
    decision_samples: int = cfg.field(300, help="views timed per size")
    step_counts: tuple[int, ...] = cfg.field((20, 28, 50), help="steps per request for the sensitivity section")
    overload_rates: tuple[float, ...] = cfg.field((60.0, 120.0, 180.0),
                                                  help="overload section: rates of 256/512 px requests, per minute")
    probes: tuple[str, ...] = cfg.field(tuple(PROBES), help=f"probes to run ({' '.join(PROBES)})")
    probe_scales: tuple[float, ...] = cfg.field((1.0, 1.2, 1.5), help="SLO scales of the probes section")
    probe_policies: tuple[str, ...] = cfg.field(PROBE_POLICIES, help="policies of the probes section (those of "
                                                "--policies among them)")
    video_rate_per_min: float = cfg.field(2.5, help="video section: arrivals per minute (FLUX images + Wan clips)")
    video_requests: int = cfg.field(150, help="video section: requests per trace")
    sections: tuple[str, ...] = cfg.field(DEFAULT_SECTIONS, help=f"sections to run ({' '.join(SECTIONS)}; "
                                                                  "cluster only when named)")
    out: str = cfg.field("out/bench", help="folder for report.json and the PNG plots")
    jobs: int = cfg.field(0, help="worker processes (0: one per CPU core)")
    plots: bool = cfg.field(True, help="write PNG plots")
    quick: bool = cfg.field(False, help="smoke run: small traces, one seed, few settings (seconds)")

    def effective(self) -> "BenchConfig":
        if not self.quick:
            return self
        return dataclasses.replace(
            self, num_requests=min(self.num_requests, 24), seeds=1, scales=(1.0, 1.5), rates=(6.0, 18.0),
            granularities=(1, 5), bound_requests=min(self.bound_requests, 12), bound_seeds=1,
            decision_sizes=(16, 64), decision_samples=20, step_counts=(28,), overload_rates=(120.0,),
            probe_scales=(1.0,), video_requests=min(self.video_requests, 24))


# ------------------------------------------------------------------------------ running sims
_COSTS: dict[str, ProfileCostModel] = {}


def _cost(profile: str) -> ProfileCostModel:
    if profile not in _COSTS:
        _COSTS[profile] = load_cost_model(profile)
    return _COSTS[profile]


@dataclass(frozen=True)
class SimTask:
    policy: str
    options: tuple[tuple[str, Any], ...]
    spec: WorkloadSpec
    sim: SimConfig
    profile: str
    extra_best_effort_per_min: float = 0.0
    keep_latencies: bool = False
    true_cost_scale: float = 1.0  # the simulated engine's step time / the planner's (probes)


def _true_cost(task: SimTask, planned: CostModel) -> CostModel:
    """The engine's step times of ``task``: the planner's model scaled by its ``true_cost_scale``."""
    return ScaledCostModel(planned, task.true_cost_scale) if task.true_cost_scale != 1.0 else planned


def run_task(task: SimTask) -> dict[str, Any]:
    """One simulation, summarised (runs in a worker process)."""
    cost = _cost(task.profile)
    trace = make_trace(task.spec)
    if task.extra_best_effort_per_min > 0:
        extra = make_trace(dataclasses.replace(task.spec, rate_per_min=task.extra_best_effort_per_min,
                                               best_effort_fraction=1.0, id_prefix="be", seed=task.spec.seed + 10_000))
        trace = tuple(sorted(trace + extra, key=lambda r: r.arrival_at))
    policy = make_policy(task.policy, **dict(task.options))
    true_cost = _true_cost(task, cost)
    res = simulate(trace, policy, cost, task.sim, true_cost=true_cost, cost_name=task.profile)
    lat = res.latency_stats()
    dec = sorted(res.decision_times_s)
    best_effort = [o.latency_s for o in res.outcomes if o.request.deadline_at is None and o.latency_s is not None]
    out = {
        "sar": res.sar(),
        "sar_by_resolution": {str(k): v for k, v in res.sar_by_resolution().items()},
        "latency_mean_s": lat["mean"], "latency_p95_s": lat["p95"],
        "mean_degree": res.mean_degree(),
        "decision_p50_ms": 1e3 * dec[len(dec) // 2] if dec else 0.0,
        "decision_p99_ms": 1e3 * dec[min(len(dec) - 1, int(0.99 * len(dec)))] if dec else 0.0,
        "num_plans": res.num_plans, "num_assignments": res.num_assignments,
        "utilisation": res.busy_gpu_seconds / max(res.makespan_s * task.sim.num_gpus, 1e-9),
        "best_effort_latency_mean_s": statistics.fmean(best_effort) if best_effort else None,
        "isolated_bound": isolated_bound(trace, true_cost, task.sim.num_gpus,
                                         overhead_s=task.sim.dispatch_overhead_s),
    }
    if task.keep_latencies:
        out["latencies_s"] = [round(o.latency_s, 4) for o in res.outcomes if o.latency_s is not None]
    return out


def _map(fn: Callable, items: Sequence, jobs: int) -> list:
    if jobs <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(fn, items, chunksize=max(1, len(items) // (jobs * 8))))


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.fmean(xs) if xs else float("nan")


def _std(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.pstdev(xs) if len(xs) > 1 else 0.0


# ------------------------------------------------------------------------------ sections
class Bench:
    def __init__(self, config: BenchConfig) -> None:
        self.c = config.effective()
        self.jobs = self.c.jobs or os.cpu_count() or 1
        self.cost = _cost(self.c.profile)
        self.report: dict[str, Any] = {}

    def spec(self, **kw: Any) -> WorkloadSpec:
        base = dict(num_requests=self.c.num_requests, rate_per_min=self.c.rate_per_min, num_steps=self.c.num_steps,
                    model=self.c.model)
        base.update(kw)
        if "seed" in kw:  # --first-seed shifts every trace (0: the recorded ones)
            base["seed"] = kw["seed"] + self.c.first_seed
        return WorkloadSpec(**base)

    def task(self, policy: str, spec: WorkloadSpec, options: dict | None = None, sim: SimConfig | None = None,
             **kw: Any) -> SimTask:
        return SimTask(policy, tuple(sorted((options or {}).items())), spec,
                       sim or SimConfig(num_gpus=self.c.num_gpus), self.c.profile, **kw)

    def run_grid(self, keys: list, tasks: list[SimTask]) -> dict:
        results = _map(run_task, tasks, self.jobs)
        out: dict = {}
        for k, r in zip(keys, results):
            out.setdefault(k, []).append(r)
        return out

    # -- SAR x scale x mix, per resolution, latency, gains
    def section_sar(self) -> str:
        c = self.c
        keys, tasks = [], []
        for mix in c.mixes:
            for scale in c.scales:
                for p in c.policies:
                    for seed in range(c.seeds):
                        keys.append((mix, scale, p))
                        keep = seed == 0 and mix == c.mixes[0] and scale == c.scales[0]
                        tasks.append(self.task(p, self.spec(mix=mix, slo_scale=scale, seed=seed), keep_latencies=keep))
        grid = self.run_grid(keys, tasks)
        sar, std, lat, deg, per_res, dec = {}, {}, {}, {}, {}, []
        samples, iso = {}, {}
        for (mix, scale, p), runs in grid.items():
            s = f"{scale:.1f}"
            iso.setdefault(mix, {})[s] = _mean(r["isolated_bound"] for r in runs)
            sar.setdefault(mix, {}).setdefault(s, {})[p] = _mean(r["sar"] for r in runs)
            std.setdefault(mix, {}).setdefault(s, {})[p] = _std(r["sar"] for r in runs)
            lat.setdefault(mix, {}).setdefault(s, {})[p] = {
                "mean_s": _mean(r["latency_mean_s"] for r in runs), "p95_s": _mean(r["latency_p95_s"] for r in runs)}
            deg.setdefault(mix, {}).setdefault(s, {})[p] = _mean(r["mean_degree"] for r in runs)
            per_res.setdefault(mix, {}).setdefault(s, {})[p] = {
                res: _mean(r["sar_by_resolution"][res] for r in runs) for res in runs[0]["sar_by_resolution"]}
            if p == "tetriserve":
                dec += [(r["decision_p50_ms"], r["decision_p99_ms"]) for r in runs]
            if "latencies_s" in runs[0]:
                samples[p] = runs[0]["latencies_s"]
        self.report.update(sar=sar, sar_std=std, latency=lat, mean_degree=deg, sar_by_resolution_all=per_res,
                           isolated_bound=iso)
        panels = {}
        for mix, scale in ((c.mixes[0], c.scales[0]), (c.mixes[-1], c.scales[-1])):
            panels.setdefault(mix, {})[f"{scale:.1f}"] = per_res[mix][f"{scale:.1f}"]
        self.report["sar_by_resolution"] = panels
        if samples:
            self.report["latency_samples"] = {
                "setting": f"{c.mixes[0]} mix, SLO scale {c.scales[0]}, seed {c.first_seed}", "latency_s": samples}
        if dec:
            self.report["decision_ms_in_sim"] = {"p50": statistics.median(d[0] for d in dec),
                                                 "p99": statistics.median(d[1] for d in dec),
                                                 "p99_worst_run": max(d[1] for d in dec)}
        self.report["gains"] = gains = self._gains(sar, iso)
        text = []
        for mix in c.mixes:
            text.append(f"SAR, {mix} mix (mean ± std over {c.seeds} seeds)\n" + rep.sar_table(sar[mix], c.policies, std[mix]))
            text.append(f"vs the strongest baseline, {mix} mix\n" + rep.strongest_table(sar[mix], iso[mix]))
            rows = [[s] + [f"{lat[mix][s][p]['mean_s']:.2f}/{lat[mix][s][p]['p95_s']:.2f}" for p in c.policies]
                    for s in sar[mix]]
            text.append(f"latency mean/p95 (s), {mix} mix\n" + rep.format_table(["scale", *c.policies], rows))
        if gains:
            text.append("TetriServe's relative SAR gain\n" + rep.gains_table(gains))
        return "\n\n".join(text)

    def _gains(self, sar: dict, iso: dict | None = None) -> dict:
        """Per mix: TetriServe's relative gain over the strongest of all baselines (and which one it
        is), over the best of the paper's baselines, over EDF; the isolated bound per scale."""
        out = {}
        for mix, by_scale in sar.items():
            per, vs_edf, beats, strongest, vs_best = {}, {}, {}, {}, {}
            for s, v in by_scale.items():
                if "tetriserve" not in v:
                    continue
                t = v["tetriserve"]
                base = [v[p] for p in rep.PAPER_BASELINES if p in v]
                if base:
                    best = max(base)
                    per[s] = (t - best) / best if best > 0 else float("inf")
                if "edf" in v and v["edf"] > 0:
                    vs_edf[s] = (t - v["edf"]) / v["edf"]
                beats[s] = all(t >= v[p] - 1e-12 for p in v if p != "tetriserve")
                rival = rep.strongest_baseline(v)
                if rival is not None:
                    strongest[s] = rival[0]
                    vs_best[s] = (t - rival[1]) / rival[1] if rival[1] > 0 else float("inf")
            if vs_best:
                out[mix] = {"per_scale_vs_strongest": vs_best, "mean_vs_strongest": _mean(vs_best.values()),
                            "strongest_baseline": strongest,
                            "isolated_bound": dict(iso.get(mix, {})) if iso else {},
                            "per_scale": per, "mean": _mean(per.values()) if per else float("nan"),
                            "per_scale_vs_edf": vs_edf, "mean_vs_edf": _mean(vs_edf.values()) if vs_edf else float("nan"),
                            "tetriserve_at_or_above_all": beats}
        return out

    # -- rate sweep
    def section_rate(self) -> str:
        c = self.c
        keys, tasks = [], []
        for mix in c.mixes:
            for rate in c.rates:
                for p in c.policies:
                    for seed in range(c.seeds):
                        keys.append((mix, rate, p))
                        tasks.append(self.task(p, self.spec(mix=mix, slo_scale=c.sweep_scale, seed=seed, rate_per_min=rate)))
        grid = self.run_grid(keys, tasks)
        sar: dict = {}
        for (mix, rate, p), runs in grid.items():
            sar.setdefault(mix, {}).setdefault(f"{rate:g}", {})[p] = _mean(r["sar"] for r in runs)
        self.report["rate_sweep"] = {"slo_scale": c.sweep_scale, "sar": sar}
        return "\n\n".join(
            f"SAR vs arrival rate (req/min), {mix} mix, SLO scale {c.sweep_scale}\n"
            + rep.sar_table(sar[mix], c.policies).replace("scale", "rate ", 1) for mix in c.mixes)

    # -- ablation: the paper's steps and our decisions
    def _settings(self) -> list[tuple[str, str, float]]:
        c = self.c
        return [(f"{c.mixes[0].capitalize()} {c.scales[0]}x", c.mixes[0], c.scales[0]),
                (f"{c.mixes[-1].capitalize()} {c.scales[-1]}x", c.mixes[-1], c.scales[-1])]

    def section_ablation(self) -> str:
        c = self.c
        steps = {
            "planner only": dict(placement=False, scale_up=False, batching=False),
            "+ placement": dict(placement=True, scale_up=False, batching=False),
            "+ scale-up": dict(placement=True, scale_up=True, batching=False),
            "+ batching": dict(placement=True, scale_up=True, batching=True),
        }
        settings = self._settings()
        keys, tasks = [], []
        for name, opts in steps.items():
            for label, mix, scale in settings:
                for seed in range(c.seeds):
                    keys.append((name, label))
                    tasks.append(self.task("tetriserve", self.spec(mix=mix, slo_scale=scale, seed=seed), opts))
        grid = self.run_grid(keys, tasks)
        table: dict = {}
        for (name, label), runs in grid.items():
            table.setdefault(label, {})[name] = {
                "sar": _mean(r["sar"] for r in runs), "latency_mean_s": _mean(r["latency_mean_s"] for r in runs),
                "latency_p95_s": _mean(r["latency_p95_s"] for r in runs)}
        decisions = self._decision_variants()
        dsettings = [(f"{m} {s}x", m, s) for m in c.mixes
                     for s in ((c.scales[0], c.scales[-1]) if c.quick else (c.scales[0], c.sweep_scale, c.scales[-1]))]
        keys, tasks = [], []
        for name, (policy, opts, sim, extra) in decisions.items():
            for label, mix, scale in dsettings:
                for seed in range(c.seeds):
                    keys.append((name, label))
                    tasks.append(self.task(policy, self.spec(mix=mix, slo_scale=scale, seed=seed), opts, sim,
                                           extra_best_effort_per_min=extra))
        grid = self.run_grid(keys, tasks)
        dec: dict = {}
        for (name, label), runs in grid.items():
            entry = dec.setdefault(name, {})
            entry[label] = _mean(r["sar"] for r in runs)
            be = [r["best_effort_latency_mean_s"] for r in runs if r["best_effort_latency_mean_s"] is not None]
            if be:
                entry.setdefault("best_effort_latency_mean_s", {})[label] = _mean(be)
        for entry in dec.values():
            entry["mean"] = _mean(v for k, v in entry.items() if isinstance(v, float))
        self.report["ablation"] = {"steps": table, "decisions": dec}
        rows = [[name] + [f"{table[l][name]['sar']:.3f} ({table[l][name]['latency_mean_s']:.2f} s)" for l, _, _ in settings]
                for name in steps]
        text = ["Ablation: SAR (mean latency)\n" + rep.format_table(["variant"] + [l for l, _, _ in settings], rows)]
        labels = [l for l, _, _ in dsettings]
        rows = [[name] + [dec[name][l] for l in labels] + [dec[name]["mean"]] for name in decisions]
        text.append("Decisions: TetriServe SAR per variant\n" + rep.format_table(["variant"] + labels + ["mean"], rows))
        return "\n\n".join(text)

    def _decision_variants(self) -> dict[str, tuple[str, dict, SimConfig | None, float]]:
        n = self.c.num_gpus
        all_groups = SimConfig(num_gpus=n, groups="all")
        be_rate = self.c.rate_per_min / 4
        return {
            "default": ("tetriserve", {}, None, 0.0),
            "tie-break: count, then slack": ("tetriserve", {"tie_break": "count-slack"}, None, 0.0),
            "tie-break: gpus, then slack": ("tetriserve", {"tie_break": "gpus-slack"}, None, 0.0),
            "tie-break: slack only": ("tetriserve", {"tie_break": "slack"}, None, 0.0),
            "tie-break: none": ("tetriserve", {"tie_break": "none"}, None, 0.0),
            "tau: 5 x median fastest step": ("tetriserve", {"tau_rule": "fast-median"}, None, 0.0),
            "tau: 5 x max planned step": ("tetriserve", {"tau_rule": "plan-max"}, None, 0.0),
            "tau: fixed 0.25 s": ("tetriserve", {"tau_rule": "fixed:0.25"}, None, 0.0),
            "two degrees: knapsack picks": ("tetriserve", {"mix_order": "both"}, None, 0.0),
            "two degrees: fast first": ("tetriserve", {"mix_order": "fast-first"}, None, 0.0),
            "no admission control": ("tetriserve", {"admission": False}, None, 0.0),
            "no plan margin": ("tetriserve", {"plan_margin_frac": 0.0}, None, 0.0),
            **{name: ("tetriserve", opts, None, 0.0) for name, opts in ARRIVAL_VARIANTS.items()},
            "no round alignment": ("tetriserve", {"align_rounds": False}, None, 0.0),
            "GPU ids: lowest free": ("tetriserve", {"placement_fit": "first"}, None, 0.0),
            "groups: all subsets": ("tetriserve", {}, all_groups, 0.0),
            "late: no 1-GPU cap": ("tetriserve", {"late_max_gpus": n}, None, 0.0),
            f"+ best-effort load {be_rate:g}/min": ("tetriserve", {}, None, be_rate),
            "edf (reference)": ("edf", {}, None, 0.0),
            "edf, groups: all subsets": ("edf", {}, all_groups, 0.0),
        }

    # -- round length sweep
    def section_granularity(self) -> str:
        c = self.c
        settings = [(f"{mix} {rate:g}/min", mix, rate) for mix in c.mixes
                    for rate in sorted({c.rate_per_min, max(c.rates)})]
        keys, tasks = [], []
        for g in c.granularities:
            for label, mix, rate in settings:
                for seed in range(c.seeds):
                    keys.append((g, label))
                    tasks.append(self.task("tetriserve", self.spec(mix=mix, slo_scale=c.sweep_scale, seed=seed,
                                                                   rate_per_min=rate), {"granularity_steps": g}))
        grid = self.run_grid(keys, tasks)
        sar: dict = {}
        for (g, label), runs in grid.items():
            sar.setdefault(label, {})[str(g)] = _mean(r["sar"] for r in runs)
        self.report["granularity"] = {"slo_scale": c.sweep_scale, "sar": sar}
        rows = [[label] + [sar[label][str(g)] for g in c.granularities] for label, _, _ in settings]
        return (f"Round length sweep: TetriServe SAR, SLO scale {c.sweep_scale}\n"
                + rep.format_table(["setting"] + [f"{g} steps" for g in c.granularities], rows))

    # -- offline bound
    def section_bound(self) -> str:
        c = self.c
        keys, tasks, specs = [], [], []
        for mix in c.mixes:
            for scale in c.scales:
                for seed in range(c.bound_seeds):
                    spec = self.spec(mix=mix, slo_scale=scale, seed=1000 + seed, num_requests=c.bound_requests)
                    specs.append((mix, scale, seed, spec))
                    for p in ("tetriserve", "edf"):
                        keys.append((mix, scale, seed, p))
                        tasks.append(self.task(p, spec))
        grid = self.run_grid(keys, tasks)
        bounds = _map(_bound_task, [(spec, c.profile, c.num_gpus, c.bound_tau_s) for *_, spec in specs], self.jobs)
        per: dict = {}
        tot = {"bound": 0, "tetriserve": 0.0, "edf": 0.0}
        solve = []
        for (mix, scale, seed, spec), b in zip(specs, bounds):
            t = grid[(mix, scale, seed, "tetriserve")][0]["sar"] * b["num_requests"]
            e = grid[(mix, scale, seed, "edf")][0]["sar"] * b["num_requests"]
            row = per.setdefault(mix, {}).setdefault(f"{scale:.1f}", {"bound": 0, "tetriserve": 0.0, "edf": 0.0})
            row["bound"] += b["num_on_time"]
            row["tetriserve"] += t
            row["edf"] += e
            tot["bound"] += b["num_on_time"]
            tot["tetriserve"] += t
            tot["edf"] += e
            solve.append(b["solve_s"])
        for mix in per:
            for s, row in per[mix].items():
                row["ratio"] = row["tetriserve"] / row["bound"] if row["bound"] else float("nan")
                row["edf_ratio"] = row["edf"] / row["bound"] if row["bound"] else float("nan")
        ratio = tot["tetriserve"] / tot["bound"] if tot["bound"] else float("nan")
        self.report["bound_ratio"] = ratio
        self.report["bound"] = {
            "num_requests": c.bound_requests, "traces": len(specs), "tau_s": c.bound_tau_s,
            "solver": "HiGHS (scipy.optimize.milp)", "solve_s_max": max(solve) if solve else 0.0,
            "edf_ratio": tot["edf"] / tot["bound"] if tot["bound"] else float("nan"), "per_setting": per,
            "formulation": "docs/planner.md, section 'The offline bound'"}
        rows = [[mix, s, int(r["bound"]), int(round(r["tetriserve"])), int(round(r["edf"])), r["ratio"], r["edf_ratio"]]
                for mix in per for s, r in per[mix].items()]
        return (f"Offline bound (MILP over {c.bound_tau_s} s rounds, {c.bound_requests}-request traces, "
                f"{c.bound_seeds} per setting): on-time requests\n"
                + rep.format_table(["mix", "scale", "bound", "tetriserve", "edf", "ratio", "edf ratio"], rows)
                + f"\nTetriServe / bound, pooled: {ratio:.3f}")

    # -- decision time
    def section_decision(self) -> str:
        c = self.c
        policy = make_policy("tetriserve")
        out = {}
        for n in c.decision_sizes:
            views = [make_random_view(n, seed=i, num_gpus=c.num_gpus, model=c.model, num_steps=c.num_steps)
                     for i in range(c.decision_samples)]
            for v in views[:3]:
                policy.plan_round(v, self.cost)  # warm the cost model's memo
            times = []
            for v in views:  # the fastest of 3 timings per view: the machine is shared, preemption is noise
                best = math.inf
                for _ in range(3):
                    t0 = time.perf_counter()
                    policy.plan_round(v, self.cost)
                    best = min(best, time.perf_counter() - t0)
                times.append(best)
            times.sort()
            out[str(n)] = {"p50": 1e3 * times[len(times) // 2],
                           "p99": 1e3 * times[min(len(times) - 1, int(0.99 * len(times)))],
                           "samples": len(times)}
        self.report["decision_ms"] = out
        rows = [[n, v["p50"], v["p99"], v["samples"]] for n, v in out.items()]
        text = ("TetriServe decision time per round (ms, this machine, single thread)\n"
                + rep.format_table(["active requests", "p50", "p99", "views"], rows))
        if "decision_ms_in_sim" in self.report:
            d = self.report["decision_ms_in_sim"]
            text += (f"\nduring the SAR runs (median over runs): p50 {d['p50']:.3f} ms, p99 {d['p99']:.3f} ms "
                     f"(worst run's p99 {d['p99_worst_run']:.3f} ms, wall-clock on a shared machine)")
        return text

    # -- steps sensitivity
    def section_steps(self) -> str:
        c = self.c
        scales = (c.scales[0], c.scales[-1])
        keys, tasks = [], []
        for steps in c.step_counts:
            for mix in c.mixes:
                for scale in scales:
                    for p in c.policies:
                        for seed in range(c.seeds):
                            keys.append((steps, mix, scale, p))
                            tasks.append(self.task(p, self.spec(mix=mix, slo_scale=scale, seed=seed, num_steps=steps)))
        grid = self.run_grid(keys, tasks)
        sar: dict = {}
        for (steps, mix, scale, p), runs in grid.items():
            sar.setdefault(str(steps), {}).setdefault(mix, {}).setdefault(f"{scale:.1f}", {})[p] = _mean(
                r["sar"] for r in runs)
        self.report["steps_sensitivity"] = sar
        text = []
        for steps in c.step_counts:
            for mix in c.mixes:
                text.append(f"SAR with {steps} steps, {mix} mix\n" + rep.sar_table(sar[str(steps)][mix], c.policies))
        return "\n\n".join(text)

    # -- overload of small images (not in the paper: where EDF is hardest to beat)
    def section_overload(self) -> str:
        c = self.c
        policies = [p for p in ("tetriserve", "edf", "rssp", "sp2", "sp4") if p in c.policies or p == "tetriserve"]
        scales = (c.scales[0], c.scales[-1])
        keys, tasks = [], []
        for rate in c.overload_rates:
            for scale in scales:
                for p in policies:
                    for seed in range(c.seeds):
                        keys.append((rate, scale, p))
                        tasks.append(self.task(p, self.spec(mix="small", slo_scale=scale, seed=seed, rate_per_min=rate)))
        grid = self.run_grid(keys, tasks)
        sar: dict = {}
        util: dict = {}
        for (rate, scale, p), runs in grid.items():
            key = f"{rate:g}/min {scale}x"
            sar.setdefault(key, {})[p] = _mean(r["sar"] for r in runs)
            util.setdefault(key, {})[p] = _mean(r["utilisation"] for r in runs)
        # TetriServe variants where arrivals matter most: the two highest rates
        vrates = sorted(c.overload_rates)[-2:]
        keys, tasks = [], []
        for name, opts in ARRIVAL_VARIANTS.items():
            for rate in vrates:
                for scale in scales:
                    for seed in range(c.seeds):
                        keys.append((name, f"{rate:g}/min {scale}x"))
                        tasks.append(self.task("tetriserve", self.spec(mix="small", slo_scale=scale, seed=seed,
                                                                       rate_per_min=rate), opts))
        vgrid = self.run_grid(keys, tasks)
        variants: dict = {}
        for (name, key), runs in vgrid.items():
            variants.setdefault(name, {})[key] = {"sar": _mean(r["sar"] for r in runs),
                                                  "utilisation": _mean(r["utilisation"] for r in runs)}
        self.report["overload"] = {"mix": "small (256/512 px, half each)", "sar": sar, "utilisation": util,
                                   "tetriserve_variants": variants}
        rows = [[k] + [f"{sar[k][p]:.3f} ({util[k][p]:.0%})" for p in policies] for k in sar]
        vkeys = [f"{rate:g}/min {scale}x" for rate in vrates for scale in scales]
        vrows = [["tetriserve (default)"] + [f"{sar[k]['tetriserve']:.3f}" for k in vkeys]]
        vrows += [[name] + [f"{variants[name][k]['sar']:.3f}" for k in vkeys] for name in variants]
        return ("Overload of small images (256/512 px only): SAR (GPU utilisation)\n"
                + rep.format_table(["setting"] + policies, rows)
                + "\n\nTetriServe variants in overload: SAR\n" + rep.format_table(["variant"] + vkeys, vrows))

    def section_video(self) -> str:
        from .video_bench import section

        return section(self)

    def section_cluster(self) -> str:
        """Two boxes at twice the rate: one cluster-wide planner vs per-box planners behind routers (sim/cluster.py)."""
        from .cluster import section

        self.report["cluster"], text = section(self)
        return text
    # -- several models: placement, loads and evictions (sim/multimodel_bench.py)
    def section_multimodel(self) -> str:
        from . import multimodel_bench as mm

        c = self.c
        keys, tasks = [], []
        for p in mm.POLICIES:
            for seed in range(c.seeds):
                keys.append(p)
                spec = self.spec(slo_scale=c.sweep_scale, seed=seed, mix="uniform")
                tasks.append((p, spec, c.profile, c.num_gpus))
        results = _map(mm.run_multimodel_task, tasks, self.jobs)
        runs: dict = {}
        for k, r in zip(keys, results):
            runs.setdefault(k, []).append(r)
        out: dict = {"setup": {"models": list(mm.MODELS), "mix_before": list(mm.MIX_BEFORE),
                               "mix_after": list(mm.MIX_AFTER), "model_gb": mm.MODEL_BYTES / 1e9,
                               "budget_gb_per_gpu": mm.BUDGET_COPIES * mm.MODEL_BYTES / 1e9,
                               "load_gb_per_s": mm.TRUE_LOAD_BYTES_PER_S / 1e9, "slo_scale": c.sweep_scale,
                               "note": "modelled: h200 step times, load = bytes / bandwidth"}}
        for field_ in ("sar", "sar_before_shift", "sar_after_shift", "loads", "evictions", "load_s"):
            out[field_] = {p: _mean(r[field_] for r in runs[p]) for p in mm.POLICIES}
        out["memory_gb_per_gpu"] = {"placement": mm.BUDGET_COPIES * mm.MODEL_BYTES / 1e9,
                                    "static": mm.BUDGET_COPIES * mm.MODEL_BYTES / 1e9,
                                    "everywhere": len(mm.MODELS) * mm.MODEL_BYTES / 1e9}
        out["everywhere_fits_budget"] = False
        out["decision_ms"] = {str(n): mm.decision_timing(c.profile, n, c.decision_samples, c.num_gpus, c.num_steps)
                              for n in c.decision_sizes}
        self.report["multimodel"] = out
        rows = [[p, out["sar"][p], out["sar_before_shift"][p], out["sar_after_shift"][p], out["loads"][p],
                 out["evictions"][p], out["load_s"][p], out["memory_gb_per_gpu"][p]] for p in mm.POLICIES]
        drows = [[n, d["p50"], d["p99"], d["plain_p50"], d["plain_p99"], d["samples"], d["plans_with_loads"],
                  d["plans_with_evictions"]] for n, d in out["decision_ms"].items()]
        return ("Three FLUX-size models, popularity 60/30/10 -> 10/30/60 halfway (modelled)\n"
                + rep.format_table(["policy", "SAR", "before shift", "after shift", "loads", "evictions",
                                    "GPU-s loading", "GB/GPU needed"], rows)
                + "\n(everywhere needs 3 copies per GPU: more than the 2.2-copy budget, shown for reference)\n\n"
                + "Decision time with placement (ms, best of 3 per view; plain: the same views, every model "
                  "everywhere, timed alternately)\n"
                + rep.format_table(["active requests", "p50", "p99", "plain p50", "plain p99", "views", "with loads",
                                    "with evictions"], drows))

    # -- probes: the paper's workload with one thing changed (sim/probes.py)
    def _probe_task(self, probe, policy: str, mix: str, scale: float, seed: int, **spec_kw: Any) -> SimTask:
        c = self.c
        spec = self.spec(mix=mix, slo_scale=scale, seed=seed, rate_per_min=c.rate_per_min * probe.rate_factor,
                         **{**probe.spec, **spec_kw})
        sim = SimConfig(**{"num_gpus": c.num_gpus, "seed": spec.seed, **probe.sim})
        return self.task(policy, spec, sim=sim, true_cost_scale=probe.true_cost_scale)

    def section_probes(self) -> str:
        c = self.c
        unknown = set(c.probes) - set(PROBES)
        if unknown:
            raise ValueError(f"unknown probe(s) {sorted(unknown)} (known: {' '.join(PROBES)})")
        probes = [PROBES[name] for name in c.probes]
        policies = [p for p in c.probe_policies if p in c.policies] or list(c.policies)
        keys, tasks = [], []
        for probe in probes:
            for mix in c.mixes:
                for scale in c.probe_scales:
                    for p in policies:
                        for seed in range(c.seeds):
                            keys.append((probe.name, mix, scale, p))
                            tasks.append(self._probe_task(probe, p, mix, scale, seed))
        grid = self.run_grid(keys, tasks)
        sar: dict = {}
        iso: dict = {}
        for (name, mix, scale, p), runs in grid.items():
            s = f"{scale:.1f}"
            sar.setdefault(name, {}).setdefault(mix, {}).setdefault(s, {})[p] = _mean(r["sar"] for r in runs)
            iso.setdefault(name, {}).setdefault(mix, {})[s] = _mean(r["isolated_bound"] for r in runs)
        # the offline bound on small traces of every probe (the noisy probe: of its noise-free times)
        bkeys, btasks, bargs = [], [], []
        for probe in probes:
            for mix in c.mixes:
                for scale in c.probe_scales:
                    for seed in range(c.bound_seeds):
                        t = self._probe_task(probe, "tetriserve", mix, scale, 1000 + seed, num_requests=c.bound_requests)
                        bkeys.append((probe.name, mix, scale))
                        btasks.append(t)
                        bargs.append((t.spec, c.profile, t.sim.num_gpus, c.bound_tau_s, probe.true_cost_scale))
        runs = _map(run_task, btasks, self.jobs)
        bounds = _map(_bound_task, bargs, self.jobs)
        bound: dict = {}
        for (name, mix, scale), r, b in zip(bkeys, runs, bounds):
            row = bound.setdefault(name, {"bound": 0, "tetriserve": 0.0, "per_setting": {}})
            on_time = r["sar"] * b["num_requests"]
            row["bound"] += b["num_on_time"]
            row["tetriserve"] += on_time
            cell = row["per_setting"].setdefault(mix, {}).setdefault(f"{scale:.1f}", {"bound": 0, "tetriserve": 0.0})
            cell["bound"] += b["num_on_time"]
            cell["tetriserve"] += on_time
        # bursts one by one: each burst of a bursty trace alone on the box, TetriServe and the bound
        bursty = [(key[0], (t, a)) for key, t, a in zip(bkeys, btasks, bargs) if t.spec.burst_size > 1]
        for (name, _), parts in zip(bursty, _map(_bursts_task, [job for _, job in bursty], self.jobs)):
            alone = bound[name].setdefault("bursts_alone", {"bound": 0, "tetriserve": 0, "bursts": 0})
            for k in alone:
                alone[k] += parts[k]
        for row in bound.values():
            row["ratio"] = row["tetriserve"] / row["bound"] if row["bound"] else float("nan")
            if "bursts_alone" in row:
                alone = row["bursts_alone"]
                alone["ratio"] = alone["tetriserve"] / alone["bound"] if alone["bound"] else float("nan")
            for cells in row["per_setting"].values():
                for cell in cells.values():
                    cell["ratio"] = cell["tetriserve"] / cell["bound"] if cell["bound"] else float("nan")
        details: dict = {}
        for probe in probes:
            rows = {}
            for mix, by_scale in sar[probe.name].items():
                for s, v in by_scale.items():
                    best = rep.strongest_baseline(v)
                    t = v.get("tetriserve", float("nan"))
                    rows.setdefault(mix, {})[s] = {
                        "tetriserve": t, "strongest_baseline": best[0] if best else None,
                        "strongest_sar": best[1] if best else float("nan"),
                        "gain": (t - best[1]) / best[1] if best and best[1] > 0 else float("nan"),
                        "isolated_bound": iso[probe.name][mix][s],
                        "tetriserve_at_or_above_all": best is None or t >= best[1] - 1e-12}
            details[probe.name] = {"what": probe.what, "rows": rows, "bound": bound[probe.name]}
        self.report["probes"] = sar
        self.report["probe_details"] = {
            "scales": list(c.probe_scales), "seeds": c.seeds, "bound_requests": c.bound_requests,
            "bound_seeds": c.bound_seeds, "probes": details,
            "note": "the bound of the noisy probe is that of its noise-free step times; slow-engine's is "
                    "computed on the engine's (1.1x) step times"}
        text = []
        for probe in probes:
            for mix in c.mixes:
                text.append(f"Probe {probe.name} ({probe.what}), {mix} mix\n"
                            + rep.strongest_table(sar[probe.name][mix], iso[probe.name][mix]))
        rows = [[name, int(b["bound"]), int(round(b["tetriserve"])), b["ratio"]] for name, b in bound.items()]
        rows += [[f"{name}, each burst alone", b["bursts_alone"]["bound"], b["bursts_alone"]["tetriserve"],
                  b["bursts_alone"]["ratio"]] for name, b in bound.items() if "bursts_alone" in b]
        text.append(f"Probes: offline bound on {c.bound_requests}-request traces ({c.bound_seeds} per setting)\n"
                    + rep.format_table(["probe", "bound", "tetriserve", "ratio"], rows))
        return "\n\n".join(text)

    # ---------------------------------------------------------------------- all
    def run(self, sections: Sequence[str], echo: Callable[[str], None] = print) -> dict[str, Any]:
        c = self.c
        t0 = time.perf_counter()
        table = self.cost.table
        self.report["cost_model"] = {
            "name": c.profile, "device": table.device, "measured_on": table.measured_on,
            "comm": dataclasses.asdict(table.comm) if table.comm else None,
            "note": "simulated: measured per-step compute + the alpha/beta Ulysses all-to-all model",
        }
        self.report["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(c).items()}
        echo(f"comfy-tetriserve bench: cost model {c.profile} ({table.device}, measured {table.measured_on}; "
             f"compute + comm model), {c.model}, {c.num_gpus} GPUs, {c.num_requests} requests, "
             f"{c.rate_per_min:g} req/min, {c.num_steps} steps, {c.seeds} seeds from {c.first_seed}, "
             f"{self.jobs} worker processes")
        timings = {}
        for name in SECTIONS:
            if name not in sections:
                continue
            s0 = time.perf_counter()
            text = getattr(self, f"section_{name}")()
            timings[name] = round(time.perf_counter() - s0, 2)
            echo(f"\n== {name} ({timings[name]:.1f} s)\n{text}")
        self.report["runtime_s"] = {"total": round(time.perf_counter() - t0, 2), **timings}
        self.report["machine"] = {"cpus": os.cpu_count(), "jobs": self.jobs, "python": platform.python_version(),
                                  "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
        return self.report


def _bound_task(args: tuple) -> dict[str, Any]:
    """(spec, profile, GPUs, tau[, step-time scale]) -> the offline bound of that trace."""
    from .bound import sar_upper_bound

    spec, profile, num_gpus, tau, *scale = args
    cost = _cost(profile)
    if scale and scale[0] != 1.0:
        cost = ScaledCostModel(cost, scale[0])
    b = sar_upper_bound(make_trace(spec), cost, num_gpus, tau_s=tau)
    return {"num_requests": b.num_requests, "num_on_time": b.num_on_time, "solve_s": b.solve_s, "status": b.status}


def _bursts_task(args: tuple) -> dict[str, int]:
    """(SimTask, bound args) of a bursty trace -> TetriServe's and the bound's on-time requests
    over its bursts (requests arriving at one instant), each burst alone on an idle box: what is
    left of the gap to the bound when bursts never overlap."""
    from .bound import sar_upper_bound

    task, (_, profile, num_gpus, tau, *_) = args
    planned = _cost(profile)
    cost = _true_cost(task, planned)
    bursts: dict[float, list[GenRequest]] = {}
    for r in make_trace(task.spec):
        bursts.setdefault(r.arrival_at, []).append(r)
    out = {"bound": 0, "tetriserve": 0, "bursts": len(bursts)}
    for at, group in bursts.items():
        alone = tuple(dataclasses.replace(r, arrival_at=0.0, deadline_at=None if r.deadline_at is None
                                          else r.deadline_at - at) for r in group)
        res = simulate(alone, make_policy(task.policy, **dict(task.options)), planned, task.sim, true_cost=cost)
        out["tetriserve"] += sum(o.met for o in res.outcomes)
        out["bound"] += sar_upper_bound(alone, cost, num_gpus, tau_s=tau).num_on_time
    return out


# ------------------------------------------------------------------------------ CLI
def add_arguments(parser) -> None:
    cfg.add_arguments(parser, BenchConfig)


def run(args) -> int:
    config = cfg.from_args(BenchConfig, args)
    unknown = set(config.sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section(s): {', '.join(sorted(unknown))} (known: {' '.join(SECTIONS)})")
    for mix in config.mixes:
        if mix not in MIXES:
            raise SystemExit(f"unknown mix {mix!r} (known: {', '.join(MIXES)})")
    bench = Bench(config)
    report = bench.run(config.sections)
    out = Path(config.out)
    rep.write_report(report, out / "report.json")
    written = rep.write_plots(report, out) if config.plots else []
    print(f"\nwrote {out / 'report.json'}" + (f" and {len(written)} plots" if written else "")
          + f"; total {report['runtime_s']['total']:.1f} s")
    return 0
