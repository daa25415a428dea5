"""The demo's cached assets: tiny model files and the step-time profile measured on this machine.

Both live under ``config.home_dir()/demo`` (``TETRISERVE_HOME``, default ~/.cache/comfy_tetriserve):

- ``models/``: ``tiny-flux.safetensors`` (FLUX in ComfyUI's prefixed BFL layout) and
  ``tiny-sd3.safetensors`` (SD3 single-file layout), written once by ``worker.tiny`` with fixed
  seeds. The service loads them by file name from this folder (``--model-dir``), through the
  same loaders as real checkpoints.
- ``profiles/profile-<key>.json``: T(model, resolution, degree) measured through a worker pool
  with ``worker.profile`` (the format ``--cost PATH`` reads), each point the median of three
  passes over all points (a load burst from another process spoils one pass, not the point).
  Each point is measured *loaded* (``PROFILE_LOADED``): the same request runs at the same degree
  on every other group of the workers meanwhile. The demo's workers outnumber a small machine's
  cores, so a worker steps 2-2.4x slower when the others are busy; a profile measured one request
  at a time would tell the planner of four devices where the box has about two. The key hashes
  the machine (host name, CPU model and count, torch version), the devices, the dtype, what is
  measured and how, and the model files' contents: another machine or another model gets its own
  profile.
"""
from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import os
import platform
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path

from .. import config as config_module
from ..cost import ModelProfile, ProfileRow, ProfileTable, load_profile, save_profile

log = logging.getLogger(__name__)

#: family -> (file name in the model folder, checkpoint layout, weight seed)
DEMO_MODELS: dict[str, tuple[str, str, int]] = {
    "flux": ("tiny-flux.safetensors", "comfy", 1),
    "sd3": ("tiny-sd3.safetensors", "sd3_single", 2),
}
PROFILE_STEPS = 4
PROFILE_WARMUP = 2
#: the whole profile is measured this many times and each point keeps its median: a burst of load
#: from other processes on a shared machine then spoils one pass of a point, not the point
PROFILE_PASSES = 3
#: measure every point with the other workers busy (worker.profile's ``loaded``): the cost model
#: then describes the box when it is busy, where a plan's promises matter
PROFILE_LOADED = True

Say = Callable[[str], None]


def demo_home() -> Path:
    path = config_module.home_dir() / "demo"
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_models(home: Path, say: Say = print) -> dict[str, Path]:
    """family -> model file; written on first use (atomically), reused afterwards."""
    from ..worker.tiny import write_tiny_checkpoint

    folder = home / "models"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for family, (file_name, layout, seed) in DEMO_MODELS.items():
        path = folder / file_name
        if path.exists():
            say(f"  {file_name}: cached ({path})")
        else:
            tmp_name = f".{file_name}.{os.getpid()}.tmp.safetensors"
            tmp = write_tiny_checkpoint(family, layout, folder / tmp_name, seed=seed)
            os.replace(tmp, path)
            say(f"  {file_name}: built (tiny {family.upper()}, {layout} layout, {path.stat().st_size // 1024} KiB)")
        out[family] = path
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def machine_description() -> dict[str, str]:
    import torch

    return {"host": platform.node(), "machine": platform.machine(), "cpu": _cpu_model(),
            "cpu_count": str(os.cpu_count()), "torch": torch.__version__}


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def profile_key(models: Mapping[str, Path], resolutions: Mapping[str, tuple[int, ...]], devices: str,
                dtype: str, text_tokens: int) -> str:
    parts = {"machine": machine_description(), "devices": devices, "dtype": dtype,
             "steps": [PROFILE_STEPS, PROFILE_WARMUP, PROFILE_PASSES], "loaded": PROFILE_LOADED,
             "text_tokens": text_tokens,
             "models": {name: [file_digest(p), list(resolutions[name])] for name, p in sorted(models.items())}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


async def measure_profile(models: Mapping[str, Path], resolutions: Mapping[str, tuple[int, ...]], devices: str,
                          dtype: str, text_tokens: int, say: Say = print) -> ProfileTable:
    """Every model at its resolutions and every allowed degree, through one worker pool."""
    from ..worker.profile import ProfileSpec, capacity_extra, device_description, measure_concurrency, profile_model
    from ..worker.pool import WorkerPool

    pool = WorkerPool(devices)
    say(f"  starting {len(pool.devices)} workers for the profile ...")
    await pool.start()
    try:
        profiles: dict[str, ModelProfile] = {}
        passes: dict[tuple, list[float]] = {}
        busy_passes: dict[int, list[float]] = {}
        first = next(iter(models))  # the concurrency test: the first model at its largest size
        for n in range(PROFILE_PASSES):
            for name, path in models.items():
                spec = ProfileSpec(resolutions=tuple((r, r) for r in resolutions[name]), steps=PROFILE_STEPS,
                                   warmup=PROFILE_WARMUP, text_tokens=text_tokens, loaded=PROFILE_LOADED)
                profiles[name], model_rows = await profile_model(pool, name, str(path), dtype, spec)
                for r in model_rows:
                    passes.setdefault((r.model, r.height, r.width, r.batch, r.sp_degree), []).append(r.compute_s)
            if PROFILE_LOADED:
                res = max(resolutions[first])
                by_busy = await measure_concurrency(pool, first, pool.models()[first], res, res, text_tokens,
                                                    PROFILE_STEPS, PROFILE_WARMUP)
                for b, t in by_busy.items():
                    busy_passes.setdefault(b, []).append(t)
            say(f"  pass {n + 1}/{PROFILE_PASSES} measured")
        extra: dict = {"machine": machine_description()}
        if busy_passes:
            res = max(resolutions[first])
            extra.update(capacity_extra({b: statistics.median(ts) for b, ts in busy_passes.items()},
                                        f"{first} {res}x{res}"))
            say(f"  parallel capacity: {extra['parallel_capacity']} of {len(pool.devices)} workers step at full speed "
                f"at once (ms per step with 1..{len(busy_passes)} busy: "
                + ", ".join(f"{v:.0f}" for v in extra["step_ms_by_busy_devices"].values()) + ")")
        rows = tuple(ProfileRow(model=m, height=h, width=w, batch=b, sp_degree=k, compute_s=statistics.median(ts),
                                includes_comm=True) for (m, h, w, b, k), ts in passes.items())
        for name in models:
            say("  " + name + ": " + ", ".join(f"{r.height}px k{r.sp_degree} {r.compute_s * 1000:.1f} ms"
                                               for r in rows if r.model == name))
        return ProfileTable(models=profiles, rows=rows, comm=None, device=device_description(pool),
                            measured_on=datetime.date.today().isoformat(),
                            how=f"comfy-tetriserve demo: per point the median over {PROFILE_PASSES} passes of the "
                                f"median of {PROFILE_STEPS} sampler steps after {PROFILE_WARMUP} warm-up steps, "
                                f"measured by the group leader in the worker pool ({dtype}, {text_tokens} text "
                                f"tokens), "
                                + ("loaded: every other group of the point's degree ran the same request meanwhile"
                                   if PROFILE_LOADED else "one request at a time"),
                            extra=extra)
    finally:
        await pool.close()


def ensure_profile(home: Path, models: Mapping[str, Path], resolutions: Mapping[str, tuple[int, ...]], devices: str,
                   dtype: str, text_tokens: int, say: Say = print,
                   remeasure: bool = False) -> tuple[Path, ProfileTable, bool]:
    """(profile file, table, measured now?) for these models on this machine; measured once, then cached."""
    folder = home / "profiles"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"profile-{profile_key(models, resolutions, devices, dtype, text_tokens)}.json"
    if path.exists() and not remeasure:
        try:
            table = load_profile(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            say(f"  cached profile {path} unreadable ({exc}); measuring again")
        else:
            say(f"  cached profile for this machine: {path}")
            return path, table, False
    table = asyncio.run(measure_profile(models, resolutions, devices, dtype, text_tokens, say))
    save_profile(table, path)
    say(f"  profile written to {path}")
    return path, table, True
