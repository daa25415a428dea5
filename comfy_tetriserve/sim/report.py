"""Readable tables and paper-style PNG plots of a bench report (matplotlib, Agg backend, no display).

Everything here reads the report dictionary that ``sim.bench`` builds (and writes as JSON), so a
saved report can be re-plotted without re-running anything:
``python -c "from comfy_tetriserve.sim.report import *; write_plots(load_report(p), outdir)"``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PAPER_BASELINES = ("sp1", "sp2", "sp4", "sp8", "rssp")
#: drawing order and style: TetriServe stands out, baselines grey-ish, EDF dashed
STYLE = {
    "tetriserve": dict(color="#d62728", marker="o", linewidth=2.2),
    "edf": dict(color="#9467bd", marker="D", linestyle="--"),
    "rssp": dict(color="#2ca02c", marker="s"),
    "rssp-paper": dict(color="#98df8a", marker="s", linestyle=":"),
    "sp1": dict(color="#7f7f7f", marker="v"),
    "sp2": dict(color="#8c564b", marker="^"),
    "sp4": dict(color="#1f77b4", marker="<"),
    "sp8": dict(color="#17becf", marker=">"),
}
LABEL = {"tetriserve": "TetriServe", "edf": "EDF (RSSP degree)", "rssp": "RSSP", "rssp-paper": "RSSP (1/1/2/8)",
         "sp1": "SP=1", "sp2": "SP=2", "sp4": "SP=4", "sp8": "SP=8"}
# the admission variants: the colour of their base policy, dotted, hollow markers
for _base in ("sp1", "sp2", "sp4", "sp8", "rssp", "edf"):
    STYLE[f"{_base}-admit"] = dict(STYLE[_base], linestyle=":", markerfacecolor="none")
    LABEL[f"{_base}-admit"] = f"{LABEL[_base]} + admit"


def strongest_baseline(by_policy: dict[str, float]) -> tuple[str, float] | None:
    """(name, SAR) of the best policy other than TetriServe (ties: the first), None if there is none."""
    rivals = [(p, v) for p, v in by_policy.items() if p != "tetriserve"]
    return max(rivals, key=lambda t: t[1]) if rivals else None


def strongest_table(sar: dict[str, dict[str, float]], iso: dict[str, float]) -> str:
    """Per SLO scale of one mix: TetriServe, the strongest baseline, the gain, the isolated bound."""
    rows = []
    for scale, by_policy in sar.items():
        best = strongest_baseline(by_policy)
        if best is None or "tetriserve" not in by_policy:
            continue
        t = by_policy["tetriserve"]
        gain = (t - best[1]) / best[1] if best[1] > 0 else float("inf")
        rows.append([scale, t, f"{best[0]} {best[1]:.3f}", f"{gain:+.1%}", iso.get(scale, float("nan"))])
    return format_table(["scale", "tetriserve", "strongest baseline", "gain", "isolated bound"], rows)


# ------------------------------------------------------------------------------- tables
def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_fmt(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def sar_table(sar: dict[str, dict[str, float]], policies: Sequence[str], std: dict | None = None) -> str:
    """Rows = SLO scales, columns = policies (one mix)."""
    rows = []
    for scale, by_policy in sar.items():
        row: list[Any] = [scale]
        for p in policies:
            v = by_policy.get(p, float("nan"))
            if std is not None and p in std.get(scale, {}):
                row.append(f"{v:.3f}±{std[scale][p]:.3f}")
            else:
                row.append(v)
        rows.append(row)
    return format_table(["scale"] + list(policies), rows)


def gains_table(gains: dict[str, dict[str, Any]]) -> str:
    rows = []
    for mix, g in gains.items():
        per = " ".join(f"{s}:{v:+.0%}" for s, v in g.get("per_scale_vs_strongest", {}).items())
        rows.append([mix, f"{g.get('mean_vs_strongest', float('nan')):+.1%}", f"{g['mean']:+.1%}",
                     f"{g['mean_vs_edf']:+.1%}", per])
    return format_table(["mix", "mean gain vs strongest baseline", "vs best paper baseline", "vs EDF",
                         "per scale (vs strongest)"], rows)


# ------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 120,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _policy_lines(ax, xs, series: dict[str, list[float]], errs: dict[str, list[float]] | None = None) -> None:
    for p, ys in series.items():
        style = STYLE.get(p, {})
        if errs and p in errs:
            ax.errorbar(xs, ys, yerr=errs[p], label=LABEL.get(p, p), capsize=2, markersize=4, **style)
        else:
            ax.plot(xs, ys, label=LABEL.get(p, p), markersize=4, **style)


def plot_sar_vs_scale(report: dict, path: Path) -> None:
    plt = _plt()
    mixes = list(report["sar"])
    fig, axes = plt.subplots(1, len(mixes), figsize=(5.2 * len(mixes), 3.6), sharey=True)
    axes = [axes] if len(mixes) == 1 else axes
    for ax, mix in zip(axes, mixes):
        scales = list(report["sar"][mix])
        pols = list(next(iter(report["sar"][mix].values())))
        xs = [float(s) for s in scales]
        series = {p: [report["sar"][mix][s][p] for s in scales] for p in pols}
        errs = {p: [report["sar_std"][mix][s][p] for s in scales] for p in pols} if "sar_std" in report else None
        _policy_lines(ax, xs, series, errs)
        ax.set_title(f"{mix.capitalize()} mix")
        ax.set_xlabel("SLO scale")
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("SLO attainment ratio (SAR)")
    _legend_outside(fig, axes[-1])
    _save(fig, path, report)


def plot_rate_sweep(report: dict, path: Path) -> None:
    plt = _plt()
    sweep = report["rate_sweep"]["sar"]
    mixes = list(sweep)
    fig, axes = plt.subplots(1, len(mixes), figsize=(5.2 * len(mixes), 3.6), sharey=True)
    axes = [axes] if len(mixes) == 1 else axes
    for ax, mix in zip(axes, mixes):
        rates = list(sweep[mix])
        pols = list(next(iter(sweep[mix].values())))
        _policy_lines(ax, [float(r) for r in rates], {p: [sweep[mix][r][p] for r in rates] for p in pols})
        ax.set_title(f"{mix.capitalize()} mix, SLO scale {report['rate_sweep']['slo_scale']}")
        ax.set_xlabel("arrival rate (requests / min)")
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("SAR")
    _legend_outside(fig, axes[-1])
    _save(fig, path, report)


def plot_per_resolution(report: dict, path: Path) -> None:
    plt = _plt()
    per = report["sar_by_resolution"]
    panels = [(mix, scale) for mix in per for scale in per[mix]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), sharey=True)
    axes = [axes] if len(panels) == 1 else axes
    for ax, (mix, scale) in zip(axes, panels):
        data = per[mix][scale]
        pols = list(data)
        resolutions = list(next(iter(data.values())))
        width = 0.8 / len(pols)
        for i, p in enumerate(pols):
            xs = [j + (i - len(pols) / 2 + 0.5) * width for j in range(len(resolutions))]
            ax.bar(xs, [data[p][r] for r in resolutions], width, label=LABEL.get(p, p),
                   color=STYLE.get(p, {}).get("color"))
        ax.set_xticks(range(len(resolutions)), [f"{r}²" for r in resolutions])
        ax.set_title(f"{mix.capitalize()} mix, SLO scale {scale}")
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel("SAR per resolution")
    _legend_outside(fig, axes[-1])
    _save(fig, path, report)


def plot_ablation(report: dict, path: Path) -> None:
    plt = _plt()
    ab = report["ablation"]["steps"]
    settings = list(ab)
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 3.4))
    axes = [axes] if len(settings) == 1 else axes
    for ax, setting in zip(axes, settings):
        names = list(ab[setting])
        vals = [ab[setting][n]["sar"] for n in names]
        bars = ax.bar(range(len(names)), vals, color=["#c7c7c7", "#9ecae1", "#6baed6", "#d62728"][:len(names)])
        for b, n in zip(bars, names):
            ax.annotate(f"{ab[setting][n]['sar']:.2f}\n({ab[setting][n]['latency_mean_s']:.2f} s)",
                        (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
        ax.set_title(setting)
        ax.set_ylim(0, 1.1)
    axes[0].set_ylabel("SAR (mean latency)")
    _save(fig, path, report)


def plot_granularity(report: dict, path: Path) -> None:
    plt = _plt()
    gran = report["granularity"]["sar"]
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for setting, by_g in gran.items():
        gs = list(by_g)
        ax.plot([int(g) for g in gs], [by_g[g] for g in gs], marker="o", label=setting)
    ax.set_xlabel("round length (steps of the slowest request's fastest step)")
    ax.set_ylabel("TetriServe SAR")
    ax.legend(fontsize=8)
    _save(fig, path, report)


def plot_latency_cdf(report: dict, path: Path) -> None:
    plt = _plt()
    lat = report.get("latency_samples", {})
    if not lat:
        return
    setting = lat["setting"]
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for p, values in lat["latency_s"].items():
        xs = sorted(values)
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=LABEL.get(p, p),
                **{k: v for k, v in STYLE.get(p, {}).items() if k != "marker"})
    ax.set_xscale("log")
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("CDF")
    ax.set_title(setting)
    ax.legend(fontsize=8)
    _save(fig, path, report)


def plot_decision_time(report: dict, path: Path) -> None:
    plt = _plt()
    dec = report["decision_ms"]
    ns = [int(n) for n in dec]
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.plot(ns, [dec[str(n)]["p50"] for n in ns], marker="o", label="p50")
    ax.plot(ns, [dec[str(n)]["p99"] for n in ns], marker="s", label="p99")
    ax.axhline(1.0, color="grey", linestyle=":", label="1 ms")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("active requests")
    ax.set_ylabel("TetriServe decision time per round (ms)")
    ax.legend(fontsize=8)
    _save(fig, path, report)


def plot_probes(report: dict, path: Path) -> None:
    """One panel per probe: SAR against SLO scale, TetriServe and the strongest baselines, both mixes."""
    plt = _plt()
    probes = report["probes"]
    names = list(probes)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.4), sharey=True)
    axes = [axes] if len(names) == 1 else axes
    for ax, name in zip(axes, names):
        for mix, by_scale in probes[name].items():
            scales = list(by_scale)
            xs = [float(s) for s in scales]
            ls = "-" if mix == next(iter(probes[name])) else "--"
            ax.plot(xs, [by_scale[s]["tetriserve"] for s in scales], color=STYLE["tetriserve"]["color"],
                    marker="o", linestyle=ls, label=f"TetriServe, {mix}")
            ax.plot(xs, [strongest_baseline(by_scale[s])[1] for s in scales], color="#555555", marker="s",
                    linestyle=ls, label=f"strongest baseline, {mix}")
        ax.set_title(name)
        ax.set_xlabel("SLO scale")
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("SAR")
    _legend_outside(fig, axes[-1])
    _save(fig, path, report)


def _legend_outside(fig, ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)


def _save(fig, path: Path, report: dict) -> None:
    fig.text(0.99, 0.005, f"cost model: {report.get('cost_model', {}).get('name', '?')} (simulated)",
             ha="right", va="bottom", fontsize=6, color="grey")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)


PLOTS = {
    "sar_vs_scale.png": (plot_sar_vs_scale, "sar"),
    "rate_sweep.png": (plot_rate_sweep, "rate_sweep"),
    "sar_per_resolution.png": (plot_per_resolution, "sar_by_resolution"),
    "ablation.png": (plot_ablation, "ablation"),
    "granularity.png": (plot_granularity, "granularity"),
    "latency_cdf.png": (plot_latency_cdf, "latency_samples"),
    "decision_time.png": (plot_decision_time, "decision_ms"),
    "probes.png": (plot_probes, "probes"),
}


def write_plots(report: dict, outdir: Path) -> list[Path]:
    """Every plot whose data is in the report; returns the files written."""
    out = []
    for name, (fn, key) in PLOTS.items():
        if report.get(key):
            fn(report, Path(outdir) / name)
            out.append(Path(outdir) / name)
    return out


def write_report(report: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def load_report(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
