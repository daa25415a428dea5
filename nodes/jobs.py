"""One sampling job at the service, as a ComfyUI node runs it: submit, follow, cancel, fetch.

``sample_remote`` runs the job's I/O (lease heartbeats, submit, the event stream, the result)
as one coroutine on an *I/O loop*, and reports progress back to the caller's loop through a
queue. Inside ComfyUI the I/O loop is the server's own loop (``PromptServer.instance.loop``):
a prompt's loop stops while a synchronous node runs (a VAE decode in a sibling branch), and a
lease that is not renewed for its ttl gets the job cancelled; the server's loop never stops.
Without an I/O loop (tests, scripts) everything runs on the caller's loop.

The caller's side polls ``check_interrupt`` (ComfyUI's interrupt flag) and hands every progress
update to ``on_progress`` (the node's bar and phase text, which may raise on interrupt too).
Whatever ends the wait early (an interrupt, a failing sibling node cancelling this task, the
prompt's loop closing) cancels the I/O coroutine, whose ``finally`` cancels the job at the
service and releases the lease; the caller waits a few seconds for that to be done.

Imports neither ComfyUI nor torch at module level.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from comfy_tetriserve.client import (JobCancelled, JobFailed, ServiceRestarted, TetriServeClient, decode_result,
                                     encode_job)
from comfy_tetriserve.errors import Conflict

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often the caller checks the interrupt flag
STATUS_REFRESH_S = 1.0  # fastest refresh of the predicted finish from the job status
CANCEL_WAIT_S = 10.0  # how long a cancelled caller waits for the cancel to reach the service
RESUBMITS = 1  # a job lost in a restart of the service is submitted again this many times


@dataclass(frozen=True)
class JobProgress:
    """What the node shows about its job: phase, steps, devices, predicted finish (unix times)."""

    job_id: str
    phase: str  # queued | running | waiting | cancelling | finished | failed | cancelled
    steps_done: int = 0
    num_steps: int = 0
    gpu_ids: tuple[int, ...] = ()
    submitted_at: float | None = None
    predicted_finish_at: float | None = None
    deadline_at: float | None = None
    feasible: bool | None = None
    ended_at: float | None = None
    met_deadline: bool | None = None
    simulated: bool = False

    @classmethod
    def from_status(cls, status: dict) -> "JobProgress":
        return cls(job_id=status["job_id"], phase=status["status"], steps_done=status.get("steps_done") or 0,
                   num_steps=status.get("num_steps") or 0, gpu_ids=tuple(status.get("gpu_ids") or ()),
                   submitted_at=status.get("submitted_at"), predicted_finish_at=status.get("predicted_finish_at"),
                   deadline_at=status.get("deadline_at"), feasible=status.get("feasible"),
                   ended_at=status.get("ended_at"), met_deadline=status.get("met_deadline"),
                   simulated=bool(status.get("simulated")))

    def with_status(self, status: dict) -> "JobProgress":
        """Refresh the planner's numbers from a status answer, keeping the event-driven phase."""
        return replace(self, predicted_finish_at=status.get("predicted_finish_at"),
                       feasible=status.get("feasible"), steps_done=max(self.steps_done, status.get("steps_done") or 0))

    def with_event(self, event: dict) -> "JobProgress":
        """The progress after one of the job's events. Steps never go back: the event stream may
        lag behind a status answer, and step events coalesce."""
        kind = event.get("type")
        steps = max(self.steps_done, event.get("step") or event.get("steps_done") or 0)
        if kind == "queued":
            return replace(self, phase="queued", predicted_finish_at=event.get("predicted_finish_at",
                                                                                self.predicted_finish_at),
                           feasible=event.get("feasible", self.feasible))
        if kind == "placed":
            return replace(self, phase="running", gpu_ids=tuple(event.get("gpu_ids") or ()), steps_done=steps)
        if kind == "step":
            return replace(self, phase="running", steps_done=steps)
        if kind == "waiting":
            return replace(self, phase="waiting", gpu_ids=(), steps_done=steps)
        if kind == "cancelling":
            return replace(self, phase="cancelling")
        if kind in ("finished", "failed", "cancelled"):
            return replace(self, phase=kind, gpu_ids=(), ended_at=event.get("ended_at"), steps_done=steps,
                           met_deadline=event.get("met_deadline", self.met_deadline))
        return self

    def text(self, now: float | None = None) -> str:
        """The node's phase text, e.g. ``on 2 GPUs (0,1) · step 5/20 · finish in 1.3 s · deadline in 4.0 s``."""
        now = time.time() if now is None else now
        sim = " (simulated)" if self.simulated else ""
        if self.phase == "finished":
            took = f" in {self.ended_at - self.submitted_at:.1f} s" if self.ended_at and self.submitted_at else ""
            parts = [f"done{took}{sim}"]
            if self.deadline_at is not None and self.ended_at is not None:
                slack = self.deadline_at - self.ended_at
                parts.append("deadline met" if slack >= 0 else f"{-slack:.1f} s late")
            return " · ".join(parts)
        if self.phase in ("failed", "cancelled", "cancelling"):
            return f"{self.phase}{sim}"
        if self.phase == "running" and self.gpu_ids:
            k = len(self.gpu_ids)
            head = f"on {k} GPU{'s' if k != 1 else ''} ({','.join(map(str, self.gpu_ids))})"
        elif self.phase == "waiting":
            head = "waiting for GPUs"
        else:
            head = "queued"
        parts = [head + sim]
        if self.num_steps:
            parts.append(f"step {self.steps_done}/{self.num_steps}")
        if self.predicted_finish_at is not None:
            left = self.predicted_finish_at - now
            parts.append(f"finish in {max(left, 0.0):.1f} s" if left > -0.05 else f"finish overdue by {-left:.1f} s")
        if self.deadline_at is not None:
            late = self.feasible is False
            parts.append(f"deadline in {_seconds(self.deadline_at - now)}{' (predicted late)' if late else ''}")
        return " · ".join(parts)


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s >= 0 else f"-{-s:.1f} s (passed)"


@dataclass
class RemoteResult:
    latent: Any  # torch.Tensor in the space the job asked for
    metadata: dict
    status: dict
    progress: JobProgress


@dataclass
class _Closed:
    """Sentinel on the progress queue: the I/O coroutine has ended (and cleaned up)."""

    error: BaseException | None = field(default=None)


async def run_job_io(client: TetriServeClient, tensors: dict, settings: dict, report: Callable[[Any], None], *,
                     tenant: str, reload_model: Callable[[], Awaitable[Any]] | None = None,
                     status_refresh_s: float = STATUS_REFRESH_S, resubmits: int = RESUBMITS) -> RemoteResult:
    """Submit under a lease, follow the events (reporting JobProgress), fetch the result.

    Cancelled (or failing) before the job ended: the job is cancelled at the service and the
    lease released. A submit answered "model not loaded" (e.g. the service restarted since the
    model was loaded) calls ``reload_model`` once and submits again. A job the service lost in a
    restart (killed, crashed) is submitted again under a new lease, up to ``resubmits`` times:
    sampling is deterministic, so the image is the same.
    """
    body = await asyncio.to_thread(encode_job, tensors, settings)  # the lease rides in a header
    for attempt in range(resubmits + 1):
        try:
            return await _run_job_once(client, body, report, tenant=tenant, reload_model=reload_model,
                                       status_refresh_s=status_refresh_s)
        except ServiceRestarted as exc:
            if attempt == resubmits:
                raise
            log.warning("%s; submitting the job again", exc)
    raise AssertionError("unreachable")


async def _run_job_once(client: TetriServeClient, body: bytes, report: Callable[[Any], None], *, tenant: str,
                        reload_model: Callable[[], Awaitable[Any]] | None, status_refresh_s: float) -> RemoteResult:
    job_id: str | None = None
    ended = False
    try:
        async with client.lease(tenant=tenant) as lease:
            try:
                receipt = await client.submit(body, lease=lease)
            except Conflict as exc:
                if reload_model is None or "not loaded" not in str(exc) and "failed to load" not in str(exc):
                    raise
                log.info("model not loaded at the service; loading it again")
                await reload_model()
                receipt = await client.submit(body, lease=lease)
            job_id = receipt["job_id"]
            progress = JobProgress.from_status(receipt)
            report(progress)
            last_refresh = 0.0

            async def on_event(event: dict) -> None:
                nonlocal progress, last_refresh
                progress = progress.with_event(event)
                if event.get("type") in ("placed", "waiting") and time.monotonic() - last_refresh > status_refresh_s:
                    last_refresh = time.monotonic()
                    with contextlib.suppress(Exception):
                        progress = progress.with_status(await client.status(job_id))
                report(progress)

            try:
                status = await client.wait(job_id, on_event)
            except (JobCancelled, JobFailed, ServiceRestarted):
                ended = True  # nothing left to cancel
                raise
            ended = True
            progress = progress.with_status(status)
            progress = replace(progress, phase="finished", ended_at=status.get("ended_at"),
                               met_deadline=status.get("met_deadline"), steps_done=status.get("steps_done") or 0)
            tensors_out, metadata = await asyncio.to_thread(decode_result, await client.result(job_id))
            report(progress)
            return RemoteResult(tensors_out["latent"], metadata, status, progress)
    finally:
        if job_id is not None and not ended:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.cancel(job_id), CANCEL_WAIT_S)
            log.info("job %s cancelled at the service", job_id)


async def sample_remote(client: TetriServeClient, tensors: dict, settings: dict, *, tenant: str,
                        on_progress: Callable[[JobProgress], None] | None = None,
                        check_interrupt: Callable[[], None] | None = None,
                        reload_model: Callable[[], Awaitable[Any]] | None = None,
                        io_loop: asyncio.AbstractEventLoop | None = None, poll_s: float = POLL_S) -> RemoteResult:
    """Run one job (see the module docstring). ``client`` must belong to ``io_loop`` (or to the
    caller's loop when ``io_loop`` is None)."""
    caller = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    same_loop = io_loop is None or io_loop is caller

    def report(item: Any) -> None:
        if same_loop:
            queue.put_nowait(item)
            return
        with contextlib.suppress(RuntimeError):  # the caller's loop closed (the prompt ended)
            caller.call_soon_threadsafe(queue.put_nowait, item)

    async def io() -> RemoteResult:
        try:
            result = await run_job_io(client, tensors, settings, report, tenant=tenant, reload_model=reload_model)
        except BaseException as exc:
            report(_Closed(exc))
            raise
        report(_Closed())
        return result

    future = asyncio.ensure_future(io()) if same_loop else asyncio.wrap_future(
        asyncio.run_coroutine_threadsafe(io(), io_loop))
    closed = False

    def drain() -> None:
        nonlocal closed
        while not queue.empty():
            item = queue.get_nowait()
            if isinstance(item, _Closed):
                closed = True
            elif on_progress is not None:
                on_progress(item)

    try:
        while not future.done():
            drain()
            if check_interrupt is not None:
                check_interrupt()
            await asyncio.wait({future}, timeout=poll_s)
        drain()
        return future.result()
    finally:
        if not future.done():
            future.cancel()
            if not closed:
                await _wait_closed(queue, CANCEL_WAIT_S)


async def _wait_closed(queue: asyncio.Queue, timeout_s: float) -> None:
    """Wait (bounded) until the I/O side reports that it ended, so the cancel reached the service."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            log.warning("the job's I/O did not confirm its cancel within %.0f s", timeout_s)
            return
        try:
            item = await asyncio.wait_for(queue.get(), left)
        except asyncio.TimeoutError:
            continue
        except asyncio.CancelledError:
            return
        if isinstance(item, _Closed):
            return


def deadline_setting(deadline_s: float) -> float | None:
    """The node's deadline widget (0 = best effort) as the service's ``deadline_s``."""
    if deadline_s is None or not math.isfinite(deadline_s) or deadline_s <= 0:
        return None
    return float(deadline_s)
