"""Models the service may serve: configured names, files inside model folders, what is loaded.

Clients never send a path. They name a model the operator configured (``--model NAME=PATH``)
or a file inside one of the operator's model folders (``--model-dir``), e.g. the
``flux1-dev.safetensors`` a ComfyUI loader lists. ``resolve_path`` turns such a name into a
path only if it is a plain relative name (no ``..``, no absolute path, no backslash or control
character) whose real location, symlinks followed, stays inside that folder.

``ModelCost`` is the cost model the planner sees: it prices a loaded model the profile does not
know like a profiled model of the same family (``--profile-as flux=flux-dev``) and allows only
sequence-parallel degrees that divide the model's head count.
"""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..cost import CostModel, ModelProfile, model_profile_of, parallel_capacity, step_flops
from ..errors import Conflict, InvalidRequest, NotFound, TetriServeError
from ..core.executor import Executor, ModelInfo

log = logging.getLogger(__name__)

MODEL_SUFFIXES = (".safetensors", ".sft", ".gguf")
MAX_NAME_CHARS = 255
MAX_LISTED_FILES = 1000
MAX_LIST_DEPTH = 4


class ModelStatus(enum.Enum):
    AVAILABLE = "available"  # may be loaded on request
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    origin: str  # "configured" | "directory"
    status: ModelStatus
    info: ModelInfo | None = None
    error: str | None = None

    def to_json(self) -> dict:
        out = {"name": self.name, "origin": self.origin, "status": self.status.value}
        if self.info is not None:
            out.update(family=self.info.family, num_heads=self.info.num_heads, in_channels=self.info.in_channels,
                       context_dim=self.info.context_dim, pooled_dim=self.info.pooled_dim,
                       guidance_embeds=self.info.guidance_embeds, dtype=self.info.dtype,
                       concat_channels=self.info.concat_channels)
            if self.info.storage:  # how the weights are held: bf16, fp8_e4m3fn, gguf Q8_0, ...
                out["storage"] = self.info.storage
        if self.error:
            out["error"] = self.error
        return out


def check_model_name(name: object) -> str:
    """A model name as a client may send it; raises InvalidRequest saying what is wrong."""
    if not isinstance(name, str) or not name:
        raise InvalidRequest("model must be a non-empty string")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidRequest(f"model name longer than {MAX_NAME_CHARS} characters")
    if any(ord(c) < 32 or c in "\\\x7f" for c in name):
        raise InvalidRequest("model name contains a backslash or control character")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise InvalidRequest("model must be a name, not an absolute path")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise InvalidRequest("model name must not contain '..', '.' or empty path parts")
    return name


def find_file(name: str, roots: tuple[str, ...], kind: str, suffixes: tuple[str, ...],
              folders: bool = False) -> str | None:
    """The real path of file ``name`` inside one of ``roots`` (a ``kind`` file: "model", "LoRA"), None if no
    root has it; InvalidRequest for a name that leads outside its root or is not a ``suffixes`` file (nor,
    with ``folders``, a diffusers folder)."""
    check_model_name(name)
    for root in roots:
        root_real = os.path.realpath(root)
        candidate = os.path.join(root_real, *name.split("/"))
        if not os.path.lexists(candidate):
            continue
        real = os.path.realpath(candidate)
        if os.path.commonpath([real, root_real]) != root_real:
            raise InvalidRequest(f"{kind} {name!r} leads outside the {kind} folders (symlink)")
        if os.path.isfile(real) and real.endswith(suffixes):
            return real
        if folders and os.path.isdir(real) and os.path.exists(os.path.join(real, "config.json")):
            return real  # a diffusers transformer folder
        raise InvalidRequest(f"{kind} {name!r} is not a {'/'.join(suffixes)} file"
                             + (" or a diffusers folder" if folders else ""))
    return None


def resolve_path(name: str, roots: tuple[str, ...]) -> str:
    """The real path of model file ``name`` inside one of ``roots``; NotFound if none has it."""
    found = find_file(name, roots, "model", MODEL_SUFFIXES, folders=True)
    if found is None:
        raise NotFound(f"unknown model {name!r}: not configured and not a file in the model folders")
    return found


def list_model_files(roots: tuple[str, ...]) -> list[str]:
    """Model file names (relative, '/'-separated) found in ``roots``, without following symlinks out."""
    names: list[str] = []
    for root in roots:
        root_real = os.path.realpath(root)
        if not os.path.isdir(root_real):
            continue
        for dirpath, dirnames, filenames in os.walk(root_real):
            rel = os.path.relpath(dirpath, root_real)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and depth < MAX_LIST_DEPTH)
            for fn in sorted(filenames):
                if not fn.endswith(MODEL_SUFFIXES):
                    continue
                full = os.path.join(dirpath, fn)
                if os.path.commonpath([os.path.realpath(full), root_real]) != root_real:
                    continue
                names.append(fn if rel == "." else "/".join(rel.split(os.sep) + [fn]))
                if len(names) >= MAX_LISTED_FILES:
                    return names
    return names


class ModelCost:
    """The planner's cost model over loaded models (see the module docstring).

    ``observe`` and ``drift`` are forwarded when the wrapped model has them (an online model).
    """

    def __init__(self, base: CostModel, profile_as: dict[str, str] | None = None,
                 raw: CostModel | None = None) -> None:
        self.base = base
        self.raw = raw if raw is not None else base  # the same model without online correction
        self.profile_as = dict(profile_as or {})
        self._alias: dict[str, str] = {}
        self._heads: dict[str, int] = {}
        self._arch: dict[str, tuple[ModelProfile, ModelProfile]] = {}  # modelled: (its arch, reference's)
        self._ratio_memo: dict[tuple[str, int, int, int], float] = {}

    def _knows(self, model: str) -> bool:
        try:
            return bool(self.base.allowed_degrees(model))
        except (TetriServeError, KeyError, ValueError):
            return False

    def register(self, info: ModelInfo) -> None:
        """Make a loaded model priceable; raises InvalidRequest if nothing can price it.

        A model the profile does not know is priced by its family's profiled model
        (``profile_as``): scaled by the FLOP ratio of the two architectures when the file told us
        its layers and width (``is_modelled``), else as that model outright (a warning says so).
        """
        if not self._knows(info.name):
            ref = self.profile_as.get(info.family)
            if ref is None or not self._knows(ref):
                raise InvalidRequest(
                    f"the cost model has no profile for {info.name!r} (family {info.family}); "
                    f"profile it or map the family with --profile-as {info.family}=PROFILED_MODEL")
            self._alias[info.name] = ref
            ref_arch = model_profile_of(self.raw, ref)
            if info.num_attention_layers and info.hidden_size and ref_arch is not None:
                self._arch[info.name] = (ModelProfile(
                    num_heads=info.num_heads, num_attention_layers=info.num_attention_layers,
                    hidden_size=info.hidden_size, num_text_tokens=info.num_text_tokens or ref_arch.num_text_tokens),
                    ref_arch)
                self._ratio_memo = {k: v for k, v in self._ratio_memo.items() if k[0] != info.name}
                log.warning("model %s is priced from %s scaled by FLOPs (%d vs %d attention layers, width %d vs "
                            "%d: x%.2f at 1024 px); modelled, not measured: profile it (comfy-tetriserve profile) "
                            "and pass the profile with --cost for measured numbers", info.name, ref,
                            info.num_attention_layers, ref_arch.num_attention_layers, info.hidden_size,
                            ref_arch.hidden_size, self.flop_ratio(info.name, 1024, 1024, 1))
            else:
                log.warning("model %s is priced as %s (the cost model has no profile for it): deadlines, forecasts "
                            "and degree choices assume %s's step times; profile it "
                            "(comfy-tetriserve profile) and pass the profile with --cost for real numbers",
                            info.name, ref, ref)
        self._heads[info.name] = info.num_heads

    def priced_as(self, model: str) -> str:
        return self._alias.get(model, model)

    def is_modelled(self, model: str) -> bool:
        """True when ``model``'s step times are another model's scaled by FLOPs (not measured)."""
        return model in self._arch

    def pricing(self, model: str) -> dict:
        """How ``model`` is priced, for GET /v1/models."""
        if model in self._arch:
            return {"priced_as": self._alias[model], "modelled": True,
                    "flop_ratio_1024": round(self.flop_ratio(model, 1024, 1024, 1), 4)}
        return {"priced_as": self.priced_as(model), "modelled": False}

    def flop_ratio(self, model: str, height: int, width: int, batch: int) -> float:
        arch = self._arch.get(model)
        if arch is None:
            return 1.0
        key = (model, height, width, batch)
        ratio = self._ratio_memo.get(key)
        if ratio is None:
            ratio = step_flops(arch[0], height, width, batch) / step_flops(arch[1], height, width, batch)
            self._ratio_memo[key] = ratio
        return ratio

    def step_time_s(self, model: str, height: int, width: int, batch: int, sp_degree: int) -> float:
        return (self.base.step_time_s(self.priced_as(model), height, width, batch, sp_degree)
                * self.flop_ratio(model, height, width, batch))

    def allowed_degrees(self, model: str) -> tuple[int, ...]:
        degrees = tuple(self.base.allowed_degrees(self.priced_as(model)))
        heads = self._heads.get(model)
        return tuple(d for d in degrees if heads is None or heads % d == 0)

    @property
    def parallel_capacity(self) -> int | None:
        """Forwarded from the wrapped model (the CostModel's optional ``parallel_capacity``)."""
        return parallel_capacity(self.base)

    @property
    def capture_steps(self) -> float:
        """Forwarded from the wrapped model (the warm-up a first step at a new shape costs)."""
        return float(getattr(self.base, "capture_steps", 0.0) or 0.0)

    def uncorrected(self) -> CostModel:
        """These aliases and degrees over the raw (uncorrected) model: what a simulated executor runs at."""
        return _Uncorrected(self)

    def observe(self, model: str, height: int, width: int, batch: int, sp_degree: int, measured_step_s: float) -> None:
        observe = getattr(self.base, "observe", None)
        if observe is not None:
            ratio = self.flop_ratio(model, height, width, batch)
            observe(self.priced_as(model), height, width, batch, sp_degree, measured_step_s / ratio)

    def drift(self) -> dict[str, float]:
        drift = getattr(self.base, "drift", None)
        return dict(drift()) if drift is not None else {}


class _Uncorrected:
    def __init__(self, owner: ModelCost) -> None:
        self._owner = owner

    def step_time_s(self, model: str, height: int, width: int, batch: int, sp_degree: int) -> float:
        owner = self._owner
        return (owner.raw.step_time_s(owner.priced_as(model), height, width, batch, sp_degree)
                * owner.flop_ratio(model, height, width, batch))

    def allowed_degrees(self, model: str) -> tuple[int, ...]:
        return self._owner.allowed_degrees(model)

    @property
    def capture_steps(self) -> float:
        return self._owner.capture_steps


class ModelCatalog:
    """Configured models, model folders, and the load state of each model (one load per name)."""

    def __init__(self, configured: dict[str, str], model_dirs: tuple[str, ...], executor: Executor,
                 cost: ModelCost, on_event: Callable[[dict], None] = lambda e: None) -> None:
        for name in configured:
            check_model_name(name)
        self.configured = dict(configured)
        self.model_dirs = tuple(model_dirs)
        self.executor = executor
        self.cost = cost
        self.on_event = on_event
        self._entries: dict[str, ModelEntry] = {}
        self._tasks: dict[str, asyncio.Task] = {}

    def _path_of(self, name: str) -> tuple[str, str]:
        if name in self.configured:
            return self.configured[name], "configured"
        return resolve_path(name, self.model_dirs), "directory"

    def entry(self, name: str) -> ModelEntry:
        check_model_name(name)
        if name in self._entries:
            return self._entries[name]
        _, origin = self._path_of(name)
        return ModelEntry(name, origin, ModelStatus.AVAILABLE)

    def info(self, name: str) -> ModelInfo:
        """The loaded model ``name``, or a NotFound/Conflict saying why it cannot serve jobs."""
        entry = self.entry(name)
        if entry.status is ModelStatus.LOADED:
            assert entry.info is not None
            return entry.info
        if entry.status is ModelStatus.LOADING:
            raise Conflict(f"model {name!r} is still loading")
        if entry.status is ModelStatus.FAILED:
            raise Conflict(f"model {name!r} failed to load: {entry.error}")
        raise Conflict(f"model {name!r} is not loaded; load it first (POST /v1/models/load)")

    def describe(self, name: str) -> dict:
        """The entry of ``name`` as JSON, with how a loaded model is priced (``modelled``)."""
        entry = self.entry(name)
        out = entry.to_json()
        if entry.status is ModelStatus.LOADED:
            out.update(self.cost.pricing(name))
            residency_of = getattr(self.executor, "residency_of", None)
            if residency_of is not None:
                out.update(residency_of(name))
        return out

    async def unload(self, name: str) -> dict:
        """Free ``name``'s weights on every worker (POST /v1/models/unload). It stays loaded in the
        sense of servable: the next job for it loads it again where the job runs."""
        entry = self.entry(name)
        if entry.status is not ModelStatus.LOADED:
            raise Conflict(f"model {name!r} is {entry.status.value}, not loaded")
        unload_model = getattr(self.executor, "unload_model", None)
        if unload_model is None:
            raise InvalidRequest(f"the {type(self.executor).__name__} holds no weights to unload")
        freed = await unload_model(name)
        self.on_event({"type": "model_unloaded", "model": name, "gpu_ids": list(freed)})
        return {**self.describe(name), "unloaded_from": list(freed)}

    def listing(self) -> list[dict]:
        names = dict.fromkeys(list(self.configured) + list(self._entries) + list_model_files(self.model_dirs))
        out = []
        for name in names:
            try:
                out.append(self.describe(name))
            except TetriServeError:
                continue
        return out

    def start_load(self, name: str, dtype: str = "bf16", *, pinned: bool = False) -> ModelEntry:
        """Begin loading (idempotent): returns the entry, LOADING or LOADED. ``pinned``: never evicted
        (models given at start unless --evictable)."""
        entry = self.entry(name)
        if entry.status in (ModelStatus.LOADING, ModelStatus.LOADED):
            return entry
        path, origin = self._path_of(name)
        entry = ModelEntry(name, origin, ModelStatus.LOADING)
        self._entries[name] = entry
        self.on_event({"type": "model_loading", "model": name, "workers_loaded": 0,
                       "num_workers": len(self.executor.gpu_ids)})
        self._tasks[name] = asyncio.ensure_future(self._load(name, path, origin, dtype, pinned))
        return entry

    async def wait_loaded(self, name: str) -> ModelEntry:
        task = self._tasks.get(name)
        if task is not None:
            await asyncio.shield(task)
        return self.entry(name)

    async def _load(self, name: str, path: str, origin: str, dtype: str, pinned: bool = False) -> None:
        try:
            def progress(workers_loaded: int, num_workers: int) -> None:
                self.on_event({"type": "model_loading", "model": name, "workers_loaded": workers_loaded,
                               "num_workers": num_workers})

            extra = {"pinned": True} if pinned and hasattr(self.executor, "residency_of") else {}
            started_at = time.monotonic()
            info = await self.executor.load_model(name, path, dtype, on_progress=progress, **extra)
            load_s = time.monotonic() - started_at
            if info.name != name:
                info = dataclasses.replace(info, name=name)
            self.cost.register(info)
        except asyncio.CancelledError:
            self._entries[name] = ModelEntry(name, origin, ModelStatus.FAILED, error="load cancelled")
            raise
        except Exception as exc:  # noqa: BLE001 - any loader failure is reported, the service goes on
            log.warning("loading model %s failed: %s", name, exc)
            message = str(exc) if isinstance(exc, TetriServeError) else f"{type(exc).__name__}: {exc}"
            self._entries[name] = ModelEntry(name, origin, ModelStatus.FAILED, error=message)
            self.on_event({"type": "model_failed", "model": name, "error": message})
        else:
            self._entries[name] = ModelEntry(name, origin, ModelStatus.LOADED, info=info)
            self.on_event({"type": "model_loaded", "model": name, "family": info.family, "load_s": load_s})
        finally:
            self._tasks.pop(name, None)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            try:
                await task
            except BaseException:  # noqa: BLE001
                pass
