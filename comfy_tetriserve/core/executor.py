"""The seam between the service's round loop and whatever runs denoising steps.

An ``Executor`` runs assignments on the wall clock. The worker pool (workers.py) runs real DiT
steps on one process per device; other executors implement the same protocol. The simulator
does not use this protocol: on a virtual clock an assignment's end is computed, not awaited.

Life of a request on an executor:

    await ex.admit(job)                    # once: conditioning and initial latent reach the workers
    result = await ex.execute(a, on_step)  # per assignment: num_steps steps on a.gpu_ids
    ...                                    # (the executor keeps each request's latest latent)
    latent = await ex.fetch_result(rid)    # after the last step: the final latent (model space)
    await ex.release(rid)                  # forget everything about the request

``execute`` never raises for a failure of the work itself: it returns an AssignmentResult with
``error`` set and ``steps_done`` the number of steps that completed (and were checkpointed);
``lost`` is set when the failure was the devices' (a worker died or ran out of memory), not the
request's, so the request may resume from its checkpoint. It raises ``DevicesUnavailable`` when
asked to run on devices it knows are down (nothing ran).

An executor whose devices capture step shapes (CUDA graphs: the first step at a new shape on a
device group costs the capture) reports which are warm (``WarmKeysReporter.warm_keys()``): the
keys (group, model, height, width, batch) captured on every member of the group, or None when it
captures nothing. The engine puts them in the planner's view and prices the first step at a cold
key (core/warmup.py). Executors without the method warm up for free.

An executor that can recover from device faults (``RecoverableExecutor``) also reports which
devices cannot take work now, whether it needs a restart, calls ``on_fault`` when a device
fails or comes back, and rebuilds itself on ``restart()``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import WorkerError
from ..types import Assignment, AssignmentResult

#: a torch.Tensor: the protocol carries tensors between the service and the workers, but core never
#: imports torch (the layering test imports it with torch blocked)
Tensor = Any

#: on_step(request_id, step_index_done (1-based, over the whole trajectory), step_seconds)
StepCallback = Callable[[str, int, float], None]


class DevicesUnavailable(WorkerError):
    """An assignment named devices that are down or being restarted; nothing ran."""


@dataclass(frozen=True)
class WorkerFault:
    """Devices failed (``gpu_ids``, e.g. a worker process died) or came back (``gpu_ids`` empty, ``reason`` None).

    ``request_ids``: the requests in flight that the fault hit (their assignment ends ``lost``).
    ``fatal``: the devices stay down until a restart (a dead process); False for a fault the
    worker survived (it ran out of memory in one assignment). ``collateral``: the device died after
    its assignment had already ended lost through a peer's fault (e.g. a worker that left its broken
    collective, or the next rank of a hung assignment the watchdog killed); the fault is the peer's.
    """

    gpu_ids: tuple[int, ...] = ()
    reason: str | None = None
    request_ids: tuple[str, ...] = ()
    fatal: bool = True
    collateral: bool = False


@dataclass(frozen=True)
class SamplingJob:
    """Everything the workers need to denoise one request, already resolved by the service.

    Tensors are CPU tensors. ``latent`` is in the model's space: the latent format's process_in
    already applied when the latent has any non-zero entry, an all-zero (text-to-image) latent
    left as zeros, as ComfyUI does. ``sigmas`` has num_steps + 1 entries, ending at 0 for a full
    denoise. ``noise`` is the initial noise (ComfyUI: torch.manual_seed(seed) then CPU randn of
    the latent's shape). The first model input is ``sigmas[0] * noise + (1 - sigmas[0]) * latent``.
    ``cfg`` != 1 with ``neg_context`` runs cond and uncond as one batch of 2B.

    Image conditioning (FLUX Fill / Kontext, see sampling/image_cond.py), in model space:
    ``concat`` [B, C + 64, H, W] the masked-image latent and packed mask a Fill model takes as
    extra input channels; ``ref_latents`` reference latents [1 or B, C, h, w] appended as extra
    image tokens, placed by ``ref_method``.
    """

    request_id: str
    model: str
    latent: "Tensor"  # [B, C, H/8, W/8]
    noise: "Tensor"  # same shape
    sigmas: "Tensor"  # [num_steps + 1]
    context: "Tensor"  # [B, tokens, dim]
    pooled: "Tensor"  # [B, pooled_dim]
    sampler: str = "euler"
    seed: int = 0
    cfg: float = 1.0
    guidance: float | None = None  # FLUX-dev distilled guidance
    neg_context: "Tensor | None" = None
    neg_pooled: "Tensor | None" = None
    extra: dict[str, Any] = field(default_factory=dict)
    concat: "Tensor | None" = None
    ref_latents: tuple = ()
    ref_method: str = "offset"

    @property
    def num_reference_tokens(self) -> int:
        """Image tokens the reference latents add to every forward (2x2 patches)."""
        return sum(((int(r.shape[-2]) + 1) // 2) * ((int(r.shape[-1]) + 1) // 2) for r in self.ref_latents)
    loras: tuple[tuple[str, float], ...] = ()  # LoRA stack: (resolved file path, strength), in order

    @property
    def num_steps(self) -> int:
        return int(self.sigmas.numel()) - 1

    @property
    def uses_cfg(self) -> bool:
        return self.cfg != 1.0 and self.neg_context is not None

    @property
    def batch(self) -> int:
        """Sequences per DiT forward: images times CFG branches (what the cost model prices)."""
        return int(self.latent.shape[0]) * (2 if self.uses_cfg else 1)


@dataclass(frozen=True)
class ModelInfo:
    """What the planner and the service need to know of a loaded DiT (no tensors)."""

    name: str
    family: str  # "flux" | "sd3"
    num_heads: int
    in_channels: int  # latent channels the service expects (16 for FLUX and SD3)
    context_dim: int  # text token width (4096 for the real models)
    pooled_dim: int
    guidance_embeds: bool = False  # FLUX-dev: takes a guidance value
    dtype: str = "bf16"
    source: str = ""  # where the weights came from (file or folder name, never shown to other tenants)
    concat_channels: int = 0  # extra input channels (FLUX Fill: 80 = masked-image latent 16 + mask 64)
    #: architecture read from the file, for size-aware pricing (0: unknown)
    num_attention_layers: int = 0
    hidden_size: int = 0
    num_text_tokens: int = 0
    #: bytes of weights one worker holds for it (0: unknown)
    num_bytes: int = 0
    storage: str = ""  # how the weights are held: "bf16", "fp8_e4m3fn", "gguf Q8_0", ... (worker/quant.py)
    resident_bytes: int = 0  # bytes of the model's weights on one worker


@runtime_checkable
class Executor(Protocol):
    """Runs assignments; see the module docstring for the life of a request."""

    @property
    def gpu_ids(self) -> tuple[int, ...]: ...

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]: ...

    async def start(self) -> None: ...

    async def load_model(self, name: str, path: str, dtype: str = "bf16",
                         on_progress: Callable[[int, int], None] | None = None) -> ModelInfo:
        """Load weights once on every worker (idempotent for the same name and file).

        ``on_progress(workers_loaded, num_workers)``, when given, is called on the event loop as
        workers finish loading.
        """
        ...

    async def admit(self, job: SamplingJob) -> None: ...

    async def execute(self, assignment: Assignment, on_step: StepCallback | None = None) -> AssignmentResult: ...

    async def stop(self, request_ids: tuple[str, ...]) -> None:
        """Ask the in-flight assignment of these requests to end after its current step."""
        ...

    async def fetch_result(self, request_id: str) -> "Tensor": ...

    async def release(self, request_id: str) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class WarmKeysReporter(Protocol):
    """An executor that reports its warm keys (see the module docstring)."""

    def warm_keys(self) -> frozenset | None: ...


def warm_keys_source(executor) -> "Callable[[], frozenset | None] | None":
    """The executor's ``warm_keys`` method for ``Engine(warm_keys=...)``, None when it has none."""
    return executor.warm_keys if isinstance(executor, WarmKeysReporter) else None


@runtime_checkable
class RecoverableExecutor(Executor, Protocol):
    """An executor that survives device faults (the worker pool); the service drives its recovery.

    ``unavailable_gpu_ids``: devices that cannot take an assignment now (dead, stuck in an
    assignment a dead peer broke, or all of them while restarting). ``needs_restart``: why a
    restart is needed to get every device back (None when all are up). ``on_fault`` (set by the
    service) is called on the event loop with each ``WorkerFault``. ``restart()`` rebuilds the
    whole executor (new processes, models reloaded); requests resume from their checkpoints.
    """

    on_fault: Callable[[WorkerFault], None] | None

    @property
    def unavailable_gpu_ids(self) -> frozenset[int]: ...

    @property
    def needs_restart(self) -> str | None: ...

    async def restart(self) -> None: ...


@runtime_checkable
class MovingExecutor(Executor, Protocol):
    """An executor over several boxes (the cluster executor): an assignment on another box than the
    one holding a request first moves the request there. ``move_s(assignment)`` is the priced time of
    those moves (0 when nothing moves); the service adds it to the assignment's expected end, so the
    planner sees it in ``running_until_at``, as the cluster simulation does."""

    def move_s(self, assignment: Assignment) -> float: ...
