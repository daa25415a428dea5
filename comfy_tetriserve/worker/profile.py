"""``comfy-tetriserve profile``: measure T(resolution, batch, degree) on this machine's devices.

For every model, resolution, batch and allowed degree, a synthetic text-to-image request runs
``--warmup`` steps and then ``--steps`` measured steps on the first group of that degree, through
the worker pool itself: each time is a whole sampler step as the engine runs it (Ulysses
all-to-alls, the end-of-step gather, the stop flag), so the rows are written with
``includes_comm: true``. The median step time becomes ``compute_s`` of the profile table row
(cost.py's format), which the planner reads (``--cost PATH``).

``--loaded`` measures every point while the other devices are busy too: the same request runs,
at the same degree, on every other disjoint group of the pool (one request per group, until the
point's measured steps are done). Devices that share hardware (CPU workers sharing cores, GPUs
sharing a host link) step slower when their neighbours work; a profile measured one request at
a time then promises capacity the box does not have once it is busy. A loaded profile describes
the busy box, which is when the planner's decisions matter. It also measures the pool's
*parallel capacity*: the same request at degree 1 on 1, 2, ... devices at once; the capacity is
the most devices that step within ``CAPACITY_TOLERANCE`` of the time one device takes alone
(``extra["parallel_capacity"]`` of the table; the planner's scale-up never makes more devices
busy than that). Four CPU workers on two cores: 2. Eight GPUs: 8.

    comfy-tetriserve profile --devices cuda:0-7 --model flux-dev=/models/flux1-dev.safetensors \\
        --res 512 768 1024 --batch 1 2 --out profiles/this-box.json

``--model NAME=random:flux-dev`` profiles the architecture with random weights (no download).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import logging
import statistics
import sys
from dataclasses import dataclass

import torch

from ..cost import ModelProfile, ProfileRow, ProfileTable, save_profile
from ..errors import InvalidRequest
from ..types import Assignment
from ..core.executor import SamplingJob
from .samplers import compute_sigmas, prepare_noise

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileSpec:
    resolutions: tuple[tuple[int, int], ...] = ((512, 512), (1024, 1024))
    batches: tuple[int, ...] = (1,)
    degrees: tuple[int, ...] | None = None  # None: every allowed degree that fits the devices
    steps: int = 5
    warmup: int = 2
    text_tokens: int | None = None  # None: the family's usual count (FLUX 512, SD3 333)
    loaded: bool = False  # measure with every other disjoint group running the same request
    frames: int = 81  # video models (Wan): pixel frames per clip; rows fold latent frames into the height
    cuda_graphs: bool = False  # the pool captures each step shape as a CUDA graph (GPU workers)


#: a device count is within the parallel capacity while its step takes at most this x the time alone
CAPACITY_TOLERANCE = 1.25


def load_groups(groups, group: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The pool's groups of ``group``'s size that are disjoint from it and from each other
    (first fit in the pool's order): where the background load runs while ``group`` is measured."""
    out: list[tuple[int, ...]] = []
    taken = set(group)
    for g in groups:
        if len(g) == len(group) and taken.isdisjoint(g):
            out.append(g)
            taken.update(g)
    return out


def parse_resolution(text: str) -> tuple[int, int]:
    """"1024" -> (1024, 1024); "768x1344" -> height 768, width 1344 (multiples of 16)."""
    h, _, w = text.lower().partition("x")
    try:
        height, width = int(h), int(w or h)
    except ValueError:
        raise InvalidRequest(f"bad resolution {text!r} (use 1024 or 768x1344)") from None
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        raise InvalidRequest(f"resolution {text!r}: sides must be positive multiples of 16")
    return height, width


def latent_frames(info, frames: int) -> int:
    """Latent frames of a ``frames``-frame clip for a video model (Wan's VAE: 1 + (frames - 1) / 4), else 1."""
    return 1 + (frames - 1) // 4 if info.family == "wan" else 1


def synthetic_job(request_id: str, model: str, info, height: int, width: int, batch: int, tokens: int,
                  num_steps: int, frames: int = 81) -> SamplingJob:
    from ..sampling.latents import sampling_family_of

    g = torch.Generator().manual_seed(0)
    shape = (batch, info.in_channels, height // 8, width // 8)
    if info.family == "wan":
        shape = shape[:2] + (latent_frames(info, frames),) + shape[2:]
    latent = torch.zeros(shape)
    return SamplingJob(request_id=request_id, model=model, latent=latent, noise=prepare_noise(latent, 0),
                       sigmas=compute_sigmas(sampling_family_of(info), "simple", num_steps),
                       context=torch.randn(1, tokens, info.context_dim, generator=g),
                       pooled=torch.randn(1, info.pooled_dim, generator=g),
                       guidance=3.5 if info.guidance_embeds else None)


async def profile_model(pool, name: str, source: str, dtype: str, spec: ProfileSpec,
                        first_over_step: dict[str, float] | None = None) -> tuple[ModelProfile, list[ProfileRow]]:
    """Profile one model on a started pool; ``first_over_step`` (if given) gets, per point, the first
    warm-up step's time over the median step (what warm-up and CUDA-graph capture cost)."""
    from . import families
    from .models import DEFAULT_TEXT_TOKENS, allowed_degrees, source_config

    info = await pool.load_model(name, source, dtype)
    config = source_config(source)
    tokens = spec.text_tokens or {**DEFAULT_TEXT_TOKENS, **families.DEFAULT_TEXT_TOKENS}[info.family]
    if info.family in families.DEFAULT_TEXT_TOKENS:
        layers = families.num_attention_layers(info.family, config)
    else:
        layers = (config["num_layers"] + config["num_single_layers"] if info.family == "flux"
                  else config["num_layers"] + len(config.get("dual_attention_layers") or ()))
    profile = ModelProfile(num_heads=info.num_heads, num_attention_layers=int(layers),
                           hidden_size=int(info.num_heads * config["attention_head_dim"]), num_text_tokens=tokens)
    degrees = allowed_degrees(info.num_heads, len(pool.gpu_ids))
    if spec.degrees is not None:
        degrees = tuple(k for k in degrees if k in spec.degrees)
    rows = []
    first_over_step = {} if first_over_step is None else first_over_step
    for height, width in spec.resolutions:
        for batch in spec.batches:
            for k in degrees:
                group = next(g for g in pool.groups if len(g) == k)
                rid = f"profile-{name}-{height}x{width}-b{batch}-k{k}"
                job = synthetic_job(rid, name, info, height, width, batch, tokens, spec.warmup + spec.steps,
                                    spec.frames)
                await pool.admit(job)
                load = await _start_load(pool, spec, name, info, height, width, batch, tokens, rid, group)
                try:
                    times: list[float] = []
                    for n, keep in ((spec.warmup, False), (spec.steps, True)):
                        if n == 0:
                            continue
                        result = await pool.execute(Assignment((rid,), group, n))
                        if result.error:
                            raise RuntimeError(f"{rid}: {result.error}")
                        if keep:
                            times.extend(result.step_times_s)
                        elif result.step_times_s:
                            first_step_s = result.step_times_s[0]
                finally:
                    await _stop_load(pool, load)
                    await pool.release(rid)
                step_s = statistics.median(times)
                if spec.warmup:
                    first_over_step[f"{name}/{height}x{width}/b{batch}/k{k}"] = round(first_step_s / step_s, 3)
                # a clip's latent frames fold into the height, as the service prices video jobs
                rows.append(ProfileRow(model=name, height=height * latent_frames(info, spec.frames), width=width,
                                       batch=batch, sp_degree=k,
                                       compute_s=step_s, includes_comm=True))
                log.info("%s %dx%d batch %d degree %d: %.4f s/step", name, height, width, batch, k, step_s)
    return profile, rows


def capture_extra(first_over_step: dict[str, float], cuda_graphs: bool) -> dict:
    """The table's ``extra`` entries for the first step at a new shape (``cost.warmup_time_s``)."""
    if not first_over_step:
        return {"cuda_graphs": cuda_graphs}
    ratios = sorted(first_over_step.values())
    return {"cuda_graphs": cuda_graphs, "first_step_over_step": first_over_step,
            "capture_steps": round(max(0.0, statistics.median(ratios) - 1.0), 3) if cuda_graphs else 0.0}


async def _start_load(pool, spec: ProfileSpec, name: str, info, height: int, width: int, batch: int,
                      tokens: int, rid: str, group: tuple[int, ...]) -> list[tuple[str, asyncio.Task]]:
    """With ``spec.loaded``: the same request on every other disjoint group, running (with room
    to spare) until stopped; its own warm-up steps come first, so the load is on before the
    measured request's warm-up ends."""
    if not spec.loaded:
        return []
    load = []
    room = 50 * (spec.warmup + spec.steps) + 50
    for i, g in enumerate(load_groups(pool.groups, group)):
        lid = f"{rid}-load{i}"
        await pool.admit(synthetic_job(lid, name, info, height, width, batch, tokens, room, spec.frames))
        load.append((lid, asyncio.ensure_future(pool.execute(Assignment((lid,), g, room)))))
    return load


async def _stop_load(pool, load: list[tuple[str, asyncio.Task]]) -> None:
    if not load:
        return
    await pool.stop(tuple(lid for lid, _ in load))
    for lid, task in load:
        result = await task
        await pool.release(lid)
        if result.error:
            log.warning("background load %s ended with an error: %s", lid, result.error)


async def measure_concurrency(pool, name: str, info, height: int, width: int, tokens: int, steps: int,
                              warmup: int) -> dict[int, float]:
    """Median step time (s) of the same degree-1 request on b devices at once, b = 1 .. devices."""
    singles = [g for g in pool.groups if len(g) == 1]
    out: dict[int, float] = {}
    for b in range(1, len(singles) + 1):
        rids = [f"capacity-{name}-{b}-{i}" for i in range(b)]
        for rid in rids:
            await pool.admit(synthetic_job(rid, name, info, height, width, 1, tokens, warmup + steps))
        try:
            times: list[float] = []
            for n, keep in ((warmup, False), (steps, True)):
                if n == 0:
                    continue
                results = await asyncio.gather(*(pool.execute(Assignment((rid,), g, n))
                                                  for rid, g in zip(rids, singles)))
                for r in results:
                    if r.error:
                        raise RuntimeError(f"capacity measurement: {r.error}")
                    if keep:
                        times.extend(r.step_times_s)
        finally:
            for rid in rids:
                await pool.release(rid)
        out[b] = statistics.median(times)
    return out


def capacity_from(step_s_by_busy: dict[int, float], tolerance: float = CAPACITY_TOLERANCE) -> int:
    """The most devices busy at once whose steps (and those of every smaller count) stay within
    ``tolerance`` x the step alone."""
    alone = step_s_by_busy[1]
    capacity = 1
    for b in sorted(step_s_by_busy):
        if step_s_by_busy[b] > tolerance * alone:
            break
        capacity = b
    return capacity


def device_description(pool) -> str:
    dev = pool.devices[0]
    if dev.startswith("cuda") and torch.cuda.is_available():
        return f"{len(pool.devices)} x {torch.cuda.get_device_name(torch.device(dev))} ({pool.backend})"
    return f"{len(pool.devices)} x {dev} workers ({pool.backend})"


async def profile(devices: str, models: dict[str, str], dtype: str, spec: ProfileSpec) -> ProfileTable:
    from .pool import WorkerPool

    pool = WorkerPool(devices, cuda_graphs=spec.cuda_graphs)
    await pool.start()
    try:
        profiles, rows, firsts = {}, [], {}
        for name, source in models.items():
            profiles[name], model_rows = await profile_model(pool, name, source, dtype, spec, firsts)
            rows.extend(model_rows)
        extra = capture_extra(firsts, spec.cuda_graphs)
        if spec.loaded:
            name = next(iter(models))
            height, width = max(spec.resolutions, key=lambda hw: hw[0] * hw[1])
            by_busy = await measure_concurrency(pool, name, pool.models()[name], height, width,
                                                profiles[name].num_text_tokens, spec.steps, spec.warmup)
            extra.update(capacity_extra(by_busy, f"{name} {height}x{width}"))
        return ProfileTable(
            models=profiles, rows=tuple(rows), comm=None, device=device_description(pool),
            measured_on=_dt.date.today().isoformat(),
            how=(f"comfy-tetriserve profile: median of {spec.steps} sampler steps after {spec.warmup} warm-up steps, "
                 f"measured by the group leader inside the worker pool ({dtype}, Ulysses all-to-alls and the "
                 f"end-of-step gather included"
                 + ("; loaded: every other disjoint group of the same size ran the same request meanwhile)"
                    if spec.loaded else ", one request at a time)")),
            extra=extra,
        )
    finally:
        await pool.close()


def capacity_extra(step_s_by_busy: dict[int, float], what: str) -> dict:
    """The profile table's ``extra`` entries for a concurrency measurement."""
    return {"parallel_capacity": capacity_from(step_s_by_busy),
            "parallel_capacity_how": (f"{what} at degree 1 on 1..{len(step_s_by_busy)} devices at once; the most "
                                      f"devices whose step stays within {CAPACITY_TOLERANCE}x the step alone"),
            "step_ms_by_busy_devices": {str(b): round(t * 1000, 2) for b, t in sorted(step_s_by_busy.items())}}


def parse_models(specs: list[str]) -> dict[str, str]:
    out = {}
    for s in specs:
        name, eq, source = s.partition("=")
        if not eq or not name or not source:
            raise InvalidRequest(f"--model {s!r}: expected NAME=PATH (or NAME=random:PRESET)")
        out[name] = source
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", default="cuda:0" if torch.cuda.is_available() else "cpu:2",
                        help="worker devices: cuda:0-7, cuda:0,1, cpu:N (default: cuda:0 with a GPU, else cpu:2)")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                        help="model to profile (repeatable); PATH a file, a diffusers folder, or random:PRESET")
    parser.add_argument("--res", nargs="+", default=["512", "1024"], help="resolutions: 1024 or HxW (default: 512 1024)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1], help="batch sizes (default: 1)")
    parser.add_argument("--degrees", nargs="+", type=int, default=None,
                        help="degrees to measure (default: every allowed degree that fits the devices)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per point (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per point (default: 2)")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help="text tokens (default: FLUX 512, SD3 333, Qwen-Image 256, Wan 512)")
    parser.add_argument("--frames", type=int, default=81,
                        help="video models (Wan): frames per clip (default: 81); rows fold latent frames into the height")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weights dtype (default: bf16)")
    parser.add_argument("--loaded", action="store_true",
                        help="measure each point while every other disjoint group of its size runs the same "
                             "request (devices that share hardware: the busy box's step times), and the "
                             "parallel capacity (how many devices step at full speed at once)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="capture each step shape as a CUDA graph (GPU workers); the table's extra then holds "
                             "capture_steps, what the first step at a new shape costs in extra steps")
    parser.add_argument("--out", required=True, help="profile table file to write (JSON)")


def run(args: argparse.Namespace) -> int:
    try:
        spec = ProfileSpec(resolutions=tuple(parse_resolution(r) for r in args.res), batches=tuple(args.batch),
                           degrees=tuple(args.degrees) if args.degrees else None, steps=args.steps,
                           warmup=args.warmup, text_tokens=args.text_tokens, loaded=args.loaded,
                           frames=args.frames, cuda_graphs=args.cuda_graphs)
        if spec.steps < 1 or spec.warmup < 0 or any(b < 1 for b in spec.batches):
            raise InvalidRequest("--steps must be >= 1, --warmup >= 0, batches >= 1")
        models = parse_models(args.model)
    except InvalidRequest as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = asyncio.run(profile(args.devices, models, args.dtype, spec))
    save_profile(table, args.out)
    for r in table.rows:
        print(f"{r.model:20s} {r.height:5d}x{r.width:<5d} batch {r.batch}  degree {r.sp_degree}  {r.compute_s * 1000:9.2f} ms/step")
    print(f"wrote {len(table.rows)} rows to {args.out}", file=sys.stderr)
    return 0
