"""A request's conditioning in shared memory: written once per job, read by every worker that needs it.

``share_conditioning(job)`` (run off the event loop: it copies the tensors) puts the context,
pooled output, their negative counterparts, FLUX Fill's extra channels and Kontext reference
latents into one ``multiprocessing.shared_memory`` block
and returns a ``SharedConditioning``: a small picklable handle (block name, tensor layout, cfg,
guidance). The pool sends the handle, not the tensors, so a job's conditioning is copied once,
however many workers and assignments use it; ``load`` on a worker copies the tensors straight
onto its device in the model's dtype. The pool owns the block and unlinks it at ``release``
(and when it closes for good).
"""
from __future__ import annotations

from dataclasses import dataclass
from multiprocessing import shared_memory

import torch

from ..core.executor import SamplingJob
from .runner import Conditioning

_FIELDS = ("context", "pooled", "neg_context", "neg_pooled", "concat")
_ALIGN = 64


@dataclass(frozen=True)
class TensorSlot:
    field: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class SharedConditioning:
    """A job's conditioning in a shared-memory block (see the module docstring)."""

    request_id: str
    model: str
    block: str  # the shared-memory block's name
    slots: tuple[TensorSlot, ...]
    cfg: float = 1.0
    guidance: float | None = None
    num_refs: int = 0  # Kontext reference latents, in slots "ref0", "ref1", ...
    ref_method: str = "offset"
    expert: tuple[str, float] | None = None  # Wan 2.2 two-expert jobs (experts.py)
    loras: tuple[tuple[str, float], ...] = ()  # the job's LoRA stack (lora.py)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slots)

    def load(self, device: torch.device, dtype: torch.dtype) -> Conditioning:
        """The conditioning on ``device`` in ``dtype`` (own memory: the block may go away after)."""
        shm = shared_memory.SharedMemory(name=self.block)
        try:
            tensors = {}
            for s in self.slots:
                if s.nbytes == 0:  # an empty tensor (Wan's [B, 0] pooled): its shape is all there is
                    tensors[s.field] = torch.empty(s.shape, device=device, dtype=dtype)
                    continue
                flat = torch.frombuffer(shm.buf, dtype=s.dtype, count=s.nbytes // s.dtype.itemsize, offset=s.offset)
                tensors[s.field] = flat.view(s.shape).to(device=device, dtype=dtype, copy=True)
                del flat
        finally:
            shm.close()
        return Conditioning(request_id=self.request_id, model=self.model, cfg=self.cfg, guidance=self.guidance,
                            context=tensors["context"], pooled=tensors["pooled"],
                            neg_context=tensors.get("neg_context"), neg_pooled=tensors.get("neg_pooled"),
                            concat=tensors.get("concat"), refs=tuple(tensors[f"ref{i}"] for i in range(self.num_refs)),
                            ref_method=self.ref_method, expert=self.expert, loras=self.loras)


def share_conditioning(job: SamplingJob) -> tuple[SharedConditioning, shared_memory.SharedMemory]:
    from .experts import parse_expert

    """Copy ``job``'s conditioning into a new shared-memory block; returns the handle and the block
    (the caller keeps the block open and unlinks it when the job is released)."""
    tensors = {f: getattr(job, f) for f in _FIELDS if getattr(job, f, None) is not None}
    refs = tuple(getattr(job, "ref_latents", ()) or ())
    tensors.update({f"ref{i}": r for i, r in enumerate(refs)})
    slots, offset = [], 0
    for name, t in tensors.items():
        t = t.detach()
        nbytes = t.numel() * t.element_size()
        slots.append(TensorSlot(name, t.dtype, tuple(t.shape), offset, nbytes))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    shm = shared_memory.SharedMemory(create=True, size=max(offset, 1))
    try:
        for slot in slots:
            if slot.nbytes == 0:
                continue
            src = tensors[slot.field].detach().to("cpu").contiguous()
            dst = torch.frombuffer(shm.buf, dtype=slot.dtype, count=src.numel(), offset=slot.offset)
            dst.copy_(src.view(-1))
            del dst
    except BaseException:
        free_block(shm)
        raise
    handle = SharedConditioning(request_id=job.request_id, model=job.model, block=shm.name, slots=tuple(slots),
                                cfg=float(job.cfg), guidance=job.guidance, num_refs=len(refs),
                                ref_method=getattr(job, "ref_method", "offset"), expert=parse_expert(job.extra),
                                loras=tuple(job.loras))
    return handle, shm


def free_block(shm: shared_memory.SharedMemory) -> None:
    """Close and unlink a block (a second call is harmless)."""
    try:
        shm.close()
    except BufferError:  # a view still open in this process: unlinking still frees the name
        pass
    try:
        shm.unlink()
    except FileNotFoundError:
        pass
