"""Keeping the devices serving when workers die: degrade at once, rebuild the pool at a quiet moment.

A torch.distributed world has a fixed size: a replacement process cannot join the world its
dead predecessor belonged to, so the only way to get a device back is to rebuild the whole pool
(new processes, new world, models reloaded). That costs seconds on CPU and tens of seconds on
a GPU box (weights reloaded), during which nothing runs. So the service degrades first:

1. **Fault.** The executor reports it (``WorkerFault``, on the event loop, the moment the
   process sentinel fires). The dead device, and the survivors of the assignment it broke until
   they report that assignment ended, are marked unhealthy in the engine at once: the very next
   plan sees the reduced device count. The lost assignment's jobs go back to the queue with the
   steps of their last checkpoint (the loop does that, and counts the fault against them).
2. **Degraded.** The planner keeps placing jobs on the healthy devices. Under gloo every group
   without the dead rank keeps working; under NCCL the same holds for communicators without the
   dead rank, while the dead rank's peers may block in a collective until it times out: the
   executor keeps those peers unavailable, so nothing is queued behind a stuck collective.
3. **Drain and rebuild**, as soon as any of: nothing is running (a quiet moment: a rebuild loses
   nothing), the pool has been degraded for ``rebuild_after_s``, no healthy device is left, or
   the policy cannot place the waiting jobs on what is left (e.g. a job that needs all eight
   devices). Draining stops the running assignments at their next step boundary (their steps
   are checkpointed, nothing is lost), then ``executor.restart()`` runs; new jobs are accepted
   and queue meanwhile. ``rebuild_after_s = 0`` rebuilds at once after every fault.
4. A rebuild that fails is retried with a growing pause; after ``max_restart_attempts`` failures
   in a row the executor is declared broken: the loop fails the jobs that wait (with the reason)
   and new submits get 503.
5. **Quarantine.** A device whose worker died ``max_device_faults`` times within
   ``device_fault_window_s``, each time under different jobs (or none), is taken out of the plan
   until the service restarts: a rebuild brings its worker back, but the planner no longer places
   work on it, and it alone being down asks for no rebuild. Faults that share a job count once,
   so a poison job (which kills whatever device runs it) cannot quarantine healthy devices; that
   is ``max_job_faults``' business; nor do deaths that follow a peer's fault in the same assignment
   (``WorkerFault.collateral``). The last device that is not quarantined never is, and a policy
   that cannot place the waiting jobs without the quarantined devices (a fixed degree that needs an
   aligned block the quarantine broke) gets them back (``executor_quarantine_lifted``).

Events on the service stream: ``executor_fault``, ``executor_draining``, ``executor_restarting``,
``executor_restarted``, ``executor_restart_failed``, ``executor_broken``, ``executor_device_quarantined`` (and, from the loop's stall
watchdog, ``executor_stalled``: a hung assignment whose workers it killed).
"""
from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from ..core.engine import Engine
from ..core.executor import RecoverableExecutor, WorkerFault
from .events import EventLog
from .jobs import Clock
from .settings import ServiceConfig

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 5.0, 15.0, 30.0)


class RecoveryState(enum.Enum):
    OK = "ok"  # every device up
    DEGRADED = "degraded"  # some devices down; the rest serve
    DRAINING = "draining"  # stopping what runs, to rebuild the pool
    RESTARTING = "restarting"  # the pool is being rebuilt; jobs queue
    BROKEN = "broken"  # the pool could not be rebuilt: jobs fail, submits get 503


def supports_recovery(executor) -> bool:
    return isinstance(executor, RecoverableExecutor)


class ExecutorRecovery:
    """The recovery state machine of one executor (see the module docstring)."""

    def __init__(self, executor, engine: Engine, config: ServiceConfig, clock: Clock, hub: EventLog,
                 wake: Callable[[], None], stop_inflight: Callable[[], Awaitable[None]]) -> None:
        self.executor = executor
        self.engine = engine
        self.config = config
        self.clock = clock
        self.hub = hub
        self.wake = wake
        self.stop_inflight = stop_inflight
        self.supported = supports_recovery(executor)
        self.state = RecoveryState.OK
        self.degraded_since_at: float | None = None
        self.num_faults = 0
        self.num_restarts = 0
        self.failed_attempts = 0  # restart failures in a row
        self.last_fault: str | None = None
        self.broken_reason: str | None = None
        self.last_restart_s: float | None = None
        self._rebuild_reason: str | None = None
        self._next_attempt_at = 0.0
        #: device -> its recent deaths (at, the jobs on it), within device_fault_window_s
        self._device_faults: dict[int, deque[tuple[float, frozenset[str]]]] = {}
        #: devices taken out of the plan until the service restarts -> why
        self.quarantined: dict[int, str] = {}
        self._task: asyncio.Task | None = None
        if self.supported:
            executor.on_fault = self.on_fault

    # ------------------------------------------------------------------ facts
    @property
    def planning(self) -> bool:
        """Whether the planner may place work now."""
        return self.state in (RecoveryState.OK, RecoveryState.DEGRADED)

    def to_json(self) -> dict:
        unavailable = sorted(set(self.engine.all_gpu_ids) - set(self.engine.healthy_gpu_ids))
        return {"state": self.state.value, "num_faults": self.num_faults, "num_restarts": self.num_restarts,
                "last_fault": self.last_fault, "error": self.broken_reason, "unavailable_gpu_ids": unavailable,
                "quarantined": {str(g): why for g, why in sorted(self.quarantined.items())},
                "degraded_since_at": self.clock.to_wall(self.degraded_since_at),
                "last_restart_s": self.last_restart_s, "recoverable": self.supported}

    # ------------------------------------------------------------------ faults
    def on_fault(self, fault: WorkerFault) -> None:
        """The executor's listener: a device failed (or came back)."""
        if fault.reason is not None:
            self.num_faults += 1
            self.last_fault = fault.reason
            self.hub.append({"type": "executor_fault", "gpu_ids": list(fault.gpu_ids), "error": fault.reason,
                             "job_ids": list(fault.request_ids), "fatal": fault.fatal})
            if fault.fatal and not fault.collateral:
                for g in fault.gpu_ids:
                    self._count_device_fault(g, frozenset(fault.request_ids), fault.reason)
        self.sync_health()
        self.wake()

    def _count_device_fault(self, gpu_id: int, jobs: frozenset[str], reason: str) -> None:
        limit = self.config.max_device_faults
        if limit < 1 or gpu_id in self.quarantined:
            return
        now = self.clock.now()
        recent = self._device_faults.setdefault(gpu_id, deque())
        recent.append((now, jobs))
        while recent and now - recent[0][0] > self.config.device_fault_window_s:
            recent.popleft()
        seen: set[str] = set()
        causes = 0
        for _, on_it in recent:  # faults that share a job are one cause (a poison job, not the device)
            if not on_it & seen:
                causes += 1
            seen |= on_it
        if causes < limit or len(self.quarantined) + 1 >= len(self.engine.all_gpu_ids):
            return
        why = (f"its worker died {causes} times within {self.config.device_fault_window_s:g} s under different "
               f"jobs (last: {reason}); out of the plan until the service restarts (--max-device-faults {limit})")
        self.quarantined[gpu_id] = why
        del self._device_faults[gpu_id]
        log.error("device %d quarantined: %s", gpu_id, why)
        self.hub.append({"type": "executor_device_quarantined", "gpu_id": gpu_id, "reason": why})

    def lift_quarantine(self, why: str) -> bool:
        """Put every quarantined device back into the plan (a policy that cannot work without them);
        returns whether there were any."""
        if not self.quarantined:
            return False
        gpu_ids = sorted(self.quarantined)
        log.error("quarantine of devices %s lifted: %s", gpu_ids, why)
        self.hub.append({"type": "executor_quarantine_lifted", "gpu_ids": gpu_ids, "reason": why})
        self.quarantined.clear()
        self.sync_health()
        return True

    def _unavailable(self) -> frozenset[int]:
        """Devices the executor cannot use now, and the quarantined ones."""
        return frozenset(self.executor.unavailable_gpu_ids) | frozenset(self.quarantined)

    def sync_health(self) -> None:
        """The engine's device health from the executor's (all down while draining or restarting)."""
        if not self.supported:
            return
        if self.planning:
            down = self._unavailable()
        else:
            down = frozenset(self.engine.all_gpu_ids)
        for g in self.engine.all_gpu_ids:
            self.engine.set_gpu_health(g, g not in down)

    def request_rebuild(self, reason: str) -> None:
        """Rebuild as soon as what runs has stopped (the degraded pool cannot serve what waits)."""
        if self.state is RecoveryState.DEGRADED and self._rebuild_reason is None:
            self._rebuild_reason = reason

    # -------------------------------------------------------------------- tick
    def tick(self, now: float) -> bool:
        """Advance the state machine (called before every plan); returns whether to plan."""
        if not self.supported or self.state is RecoveryState.BROKEN:
            return self.state is not RecoveryState.BROKEN
        need = self.executor.needs_restart
        if need and set(self.executor.unavailable_gpu_ids) <= set(self.quarantined):
            need = None  # only quarantined devices are down: a rebuild would bring back nothing we use
        if self.state is RecoveryState.OK and need:
            self.state = RecoveryState.DEGRADED
            self.degraded_since_at = now
            log.warning("executor degraded: %s; serving on %d of %d devices", need,
                        len(self.engine.healthy_gpu_ids), len(self.engine.all_gpu_ids))
        if self.state is RecoveryState.DEGRADED:
            if not need:  # came back by itself (not something the worker pool does; harmless)
                self.state, self.degraded_since_at, self._rebuild_reason = RecoveryState.OK, None, None
            elif why := self._drain_reason(now):
                self._begin_drain(why)
        if self.state is RecoveryState.DRAINING and not self.engine.inflight() and now >= self._next_attempt_at:
            self.state = RecoveryState.RESTARTING
            self.hub.append({"type": "executor_restarting", "attempt": self.failed_attempts + 1})
            self._task = asyncio.ensure_future(self._restart())
        self.sync_health()
        return self.planning

    def _drain_reason(self, now: float) -> str | None:
        if self._rebuild_reason:
            return self._rebuild_reason
        if not self.engine.inflight():
            return "nothing is running"
        if not set(self.engine.all_gpu_ids) - self._unavailable():
            return "no healthy device is left"
        if now - (self.degraded_since_at or now) >= self.config.rebuild_after_s:
            return f"degraded for {self.config.rebuild_after_s:g} s"
        return None

    def _begin_drain(self, why: str) -> None:
        self.state = RecoveryState.DRAINING
        self._rebuild_reason = None
        running = sorted({rid for a in self.engine.inflight() for rid in a.request_ids})
        log.warning("rebuilding the worker pool (%s); stopping %d running jobs at their next step", why, len(running))
        self.hub.append({"type": "executor_draining", "reason": why, "job_ids": running})
        if running:
            task = asyncio.ensure_future(self.stop_inflight())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _restart(self) -> None:
        t0 = self.clock.now()
        try:
            await asyncio.wait_for(self.executor.restart(), self.config.restart_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a failed rebuild is retried, then reported
            self.failed_attempts += 1
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.error("restarting the worker pool failed (attempt %d of %d): %s", self.failed_attempts,
                      self.config.max_restart_attempts, error)
            self.hub.append({"type": "executor_restart_failed", "attempt": self.failed_attempts, "error": error})
            if self.failed_attempts >= self.config.max_restart_attempts:
                self.state = RecoveryState.BROKEN
                self.broken_reason = (f"the worker pool could not be restarted ({self.failed_attempts} attempts; "
                                      f"last: {error}) after {self.last_fault}")
                self.hub.append({"type": "executor_broken", "error": self.broken_reason})
            else:
                self.state = RecoveryState.DRAINING
                pause = RESTART_BACKOFF_S[min(self.failed_attempts - 1, len(RESTART_BACKOFF_S) - 1)]
                self._next_attempt_at = self.clock.now() + pause
        else:
            self.last_restart_s = self.clock.now() - t0
            self.failed_attempts = 0
            self.num_restarts += 1
            self.state = RecoveryState.OK
            self.degraded_since_at = None
            log.warning("worker pool rebuilt in %.1f s (restart %d)", self.last_restart_s, self.num_restarts)
            self.hub.append({"type": "executor_restarted", "num_restarts": self.num_restarts,
                             "took_s": round(self.last_restart_s, 3)})
        finally:
            self._task = None
            self.sync_health()
            self.wake()

    async def close(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001 - closing
                pass
