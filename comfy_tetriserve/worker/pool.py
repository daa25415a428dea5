"""The worker pool: the Executor that runs real DiT steps on one process per device.

``WorkerPool("cuda:0-7")`` starts eight worker processes (runner.py) joined by NCCL; ``"cpu:4"``
starts four CPU workers joined by gloo. All process groups the planner may name (``groups``,
aligned power-of-two blocks by default) are created and warmed at start.

What the pool keeps per request (the state a restart would resume from):

- the job (conditioning and sampler settings) and the set of workers that already hold its
  conditioning (sent once per worker, dropped at ``release``);
- the latest checkpoint, a CPU ``Trajectory`` returned by the group leader after every
  assignment (latent, sigmas, step index, sampler memory), and, inside a long assignment, after
  the first step that ends ``checkpoint_every_s`` seconds after the last one, so a death costs a
  request at most about that much work plus a step;
- which workers hold which step of the trajectory on their device.

When a request's next assignment runs on a group, each member gets the trajectory from the
cheapest place: its own device (it ran the last assignment), a broadcast inside the new group
from a member that holds the latest step (device to device over the pre-warmed group), or the
pool's checkpoint when no member holds it (from 512 KiB on, sent in one member's message, which
broadcasts it to the others: one copy pickled per group).

Failures: ``execute`` never raises for the work itself. A worker process that dies is noticed at
once (its process sentinel): every assignment on it ends ``lost`` (its requests keep their last
checkpoint), ``on_fault`` reports the dead device, and the pool runs on degraded. Its other
workers keep serving every group without the dead rank; the survivors of an assignment the dead
rank broke are held back until they report that assignment ended (gloo: at once, with a
connection error; NCCL: when the collective times out, or never), so no new work queues behind a
stuck collective. torch.distributed cannot re-admit a rank into a running world, so getting the
device back means a new world: ``restart()`` stops every worker, starts a fresh set, reloads the
models, and forgets which worker held what, so the next assignment of each request resumes from
the pool's checkpoint and re-sends its conditioning. The service decides when (service/recovery.py).

A worker that hits a CUDA error other than out-of-memory (the context is unusable) or any error
inside a multi-device assignment (its peers may be stuck in a collective) reports it and exits,
which is a death as above; out of memory in a one-device assignment ends that assignment
``lost`` and the worker lives on.
"""
from __future__ import annotations


import asyncio
import itertools
import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import Conflict, InvalidRequest, NotFound, WorkerError
from ..plan import aligned_groups
from ..types import Assignment, AssignmentResult
from ..sampling.image_cond import check_image_conditioning
from ..core.executor import DevicesUnavailable, ModelInfo, SamplingJob, StepCallback, WorkerFault
from ..core.warmup import WarmTracker
from .condshare import SharedConditioning, free_block, share_conditioning
from .pool_memory import PoolMemory
from .runner import Conditioning, WorkerConfig, traj_tensors, worker_main
from .samplers import Trajectory, finish_latent, start_trajectory

log = logging.getLogger(__name__)

Group = tuple[int, ...]
#: on_progress(workers_loaded, num_workers) while a model loads
LoadProgress = Callable[[int, int], None]
STATS_KEPT = 1000  # hand-off times kept per kind (a pool runs for weeks)


def parse_devices(spec: str) -> list[str]:
    """"cpu:4" -> four CPU workers; "cuda:0-7", "cuda:0,1,3", "cuda:2" -> those GPUs; "cuda:0,0" repeats one."""
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    if kind == "cpu":
        count = int(rest) if rest else 1
        if count < 1:
            raise InvalidRequest(f"device spec {spec!r}: need at least one CPU worker")
        return ["cpu"] * count
    if kind != "cuda" or not rest:
        raise InvalidRequest(f"device spec {spec!r}: expected cpu:N or cuda:IDS (e.g. cuda:0-7, cuda:0,1,3)")
    out = []
    for part in rest.split(","):
        a, dash, b = part.partition("-")
        if not a.isdigit() or (dash and not b.isdigit()):
            raise InvalidRequest(f"device spec {spec!r}: bad GPU id {part!r}")
        lo, hi = int(a), int(b) if dash else int(a)
        if hi < lo:
            raise InvalidRequest(f"device spec {spec!r}: empty range {part!r}")
        out.extend(f"cuda:{i}" for i in range(lo, hi + 1))
    return out


@dataclass
class _Request:
    job: SamplingJob
    family: str
    checkpoint: Trajectory  # CPU, the latest completed step
    cond_on: set[int] = field(default_factory=set)  # workers holding the conditioning
    holders: dict[int, int] = field(default_factory=dict)  # worker -> step index it holds
    task_id: int | None = None  # assignment in flight
    shared: SharedConditioning | None = None  # the conditioning in shared memory (sent to workers)
    block: object | None = None  # its SharedMemory block, unlinked at release


@dataclass
class _Task:
    task_id: int
    assignment: Assignment
    future: asyncio.Future
    on_step: StepCallback | None
    started_at: float
    pending: set[int]
    leader: int
    steps_done: int | None = None
    step_times_s: tuple[float, ...] = ()
    checkpoints: dict[str, Trajectory] | None = None
    partial: dict[str, Trajectory] | None = None  # the leader's latest checkpoint inside the assignment
    errors: list[str] = field(default_factory=list)
    retryable: bool = False  # a rank ran out of memory: the requests may resume from their checkpoints


class WorkerPool(PoolMemory):
    """Executor over one worker process per device (see the module docstring)."""

    def __init__(self, devices: str | Sequence[str] = "cpu:2", *, groups: Sequence[Sequence[int]] | None = None,
                 backend: str | None = None, collective_timeout_s: float = 300.0, start_timeout_s: float = 600.0,
                 num_threads: int | None = None, clock: Callable[[], float] = time.monotonic,
                 checkpoint_every_s: float | None = 1.0, memory_budget: str | int | None = None,
                 cuda_graphs: bool = False) -> None:
        self.devices = parse_devices(devices) if isinstance(devices, str) else list(devices)
        if not self.devices:
            raise InvalidRequest("a worker pool needs at least one device")
        n = len(self.devices)
        self._gpu_ids = tuple(range(n))
        self._groups = tuple(tuple(sorted(g)) for g in groups) if groups is not None else aligned_groups(self._gpu_ids)
        for g in self._groups:
            if not g or not set(g) <= set(self._gpu_ids) or len(set(g)) != len(g):
                raise InvalidRequest(f"group {g} is not a set of worker ids 0..{n - 1}")
        on_cuda = all(d.startswith("cuda") for d in self.devices)
        distinct = len(set(self.devices)) == n
        self.backend = backend or ("nccl" if on_cuda and distinct else "gloo")
        if self.backend == "nccl" and not distinct:
            raise InvalidRequest("NCCL cannot run two ranks on one GPU; use backend='gloo' for that")
        self.collective_timeout_s = collective_timeout_s
        self.start_timeout_s = start_timeout_s
        cpu_workers = sum(d == "cpu" for d in self.devices)
        self.num_threads = num_threads if num_threads is not None else (
            max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else 0)
        if checkpoint_every_s is not None and not checkpoint_every_s >= 0:
            raise InvalidRequest(f"checkpoint_every_s must be >= 0 or None, got {checkpoint_every_s}")
        #: inside an assignment, the leader sends a checkpoint after a step once this many seconds passed
        #: since the assignment began or the last one (0: every step; None: only when it ends)
        self.checkpoint_every_s = checkpoint_every_s
        #: capture each step shape's model evaluation as a CUDA graph on GPU workers (off: eager;
        #: no effect on CPU workers; graphs.py)
        self.cuda_graphs = bool(cuda_graphs)
        #: keys each worker holds a CUDA graph for, from their reports (core/warmup.py)
        self._warm = WarmTracker()
        self.clock = clock
        self._procs: list = []
        self._cmd: list = []
        self._res: list = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: threading.Thread | None = None
        self._closing = False
        self._store_dir: str | None = None
        self._ready: list[asyncio.Future] = []
        self._init_memory(memory_budget)  # per-worker budgets and residency (pool_memory.py)
        self._models: dict[str, tuple[str, str, ModelInfo]] = {}
        self._requests: dict[str, _Request] = {}
        self._tasks: dict[int, _Task] = {}
        self._ids = itertools.count(1)
        self._outstanding: dict[int, set[int]] = {}  # rank -> task ids sent to it and not reported done
        self._restarting = False
        self._last_words: dict[int, str] = {}  # rank -> the fatal error it reported before exiting
        #: rank -> why its process is gone (until the next start)
        self.dead: dict[int, str] = {}
        #: the first worker death since the last start (None while every worker lives)
        self.broken: str | None = None
        self.num_restarts = 0
        #: called on the event loop with every WorkerFault (the service sets it)
        self.on_fault: Callable[[WorkerFault], None] | None = None
        #: called on the event loop with {request_id: CPU trajectory} for each checkpoint inside an assignment
        self.on_checkpoint: Callable[[dict[str, Trajectory]], None] | None = None
        self.worker_info: list[dict] = []
        self.stats: dict[str, deque[float]] = {k: deque(maxlen=STATS_KEPT)
                                               for k in ("handoff_local_s", "handoff_bcast_s", "handoff_pool_s",
                                                         "handoff_seed_s")}
        #: a group none of whose members holds a request's latest step gets the pool's checkpoint in
        #: one member's message, which broadcasts it (False: in every member's message), when the
        #: checkpoint has at least ``seed_min_bytes``: measured on 2 gloo CPU workers
        #: (scripts/measure_overheads.py), a 1 MiB latent costs the event loop 1.30 ms per move seeded
        #: against 1.73 ms in both messages at the same wall time, while a 64 KiB one is 2.7 ms slower
        #: seeded (a broadcast costs more than the pipe for it)
        self.seed_broadcast = True
        self.seed_min_bytes = 512 << 10

    # ------------------------------------------------------------ protocol properties
    @property
    def gpu_ids(self) -> tuple[int, ...]:
        return self._gpu_ids

    @property
    def groups(self) -> tuple[Group, ...]:
        return self._groups

    def warm_keys(self) -> frozenset | None:
        """Keys (group, model, height, width, batch) every member of the group holds a CUDA graph for
        (reported by the workers with each assignment that captured); None when the workers capture
        nothing (graphs off, or not on CUDA): their steps cost the same from the first on."""
        if not (self.cuda_graphs and all(d.startswith("cuda") for d in self.devices)):
            return None
        return self._warm.keys()

    @property
    def alive(self) -> bool:
        """Every worker is up (not restarting, none dead)."""
        return bool(self._procs) and not self.dead and not self._restarting

    @property
    def unavailable_gpu_ids(self) -> frozenset[int]:
        """Workers that cannot take an assignment now: dead, restarting, or stuck in an assignment
        that a dead peer broke (held back until they report it ended)."""
        if not self._procs or self._restarting:
            return frozenset(self._gpu_ids)
        stuck = {rank for rank, ids in self._outstanding.items() if any(t not in self._tasks for t in ids)}
        return frozenset(self.dead) | frozenset(stuck)

    @property
    def needs_restart(self) -> str | None:
        """Why the pool must be rebuilt to have every worker again (None when it need not)."""
        if self._restarting:
            return None
        if self.broken:
            return self.broken
        return None if self._procs else "the worker pool is not running"

    def workers(self) -> list[dict]:
        """One entry per worker: ``gpu_id``, ``device``, ``pid``, ``alive`` (for operators and fault drills)."""
        out = []
        for rank, device in enumerate(self.devices):
            info = self.worker_info[rank] if rank < len(self.worker_info) else {}
            proc = self._procs[rank] if rank < len(self._procs) else None
            out.append({"gpu_id": rank, "device": device, "pid": info.get("pid"),
                        "alive": proc is not None and proc.is_alive() and rank not in self.dead})
        return out

    def _notify(self, fault: WorkerFault) -> None:
        if self.on_fault is None:
            return
        try:
            self.on_fault(fault)
        except Exception:  # noqa: BLE001 - a listener must not break the pool
            log.exception("on_fault listener failed")

    # ------------------------------------------------------------ life cycle
    async def start(self) -> None:
        if self._procs:
            return
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self.broken = None
        self.dead = {}
        self._warm.clear()  # new processes hold no graph
        self._outstanding = {rank: set() for rank in self._gpu_ids}
        self._last_words = {}
        self._store_dir = tempfile.mkdtemp(prefix="tetriserve-pool-")
        ctx = mp.get_context("spawn")
        n = len(self.devices)
        self._ready = [self._loop.create_future() for _ in range(n)]
        for rank, device in enumerate(self.devices):
            cmd_r, cmd_w = ctx.Pipe(duplex=False)
            res_r, res_w = ctx.Pipe(duplex=False)
            cfg = WorkerConfig(rank=rank, world_size=n, device=device, backend=self.backend,
                               store_path=os.path.join(self._store_dir, "store"), groups=self._groups,
                               collective_timeout_s=self.collective_timeout_s, num_threads=self.num_threads,
                               cuda_graphs=self.cuda_graphs,
                               log_level=logging.getLogger().level or logging.WARNING)
            proc = ctx.Process(target=worker_main, args=(cfg, cmd_r, res_w), name=f"tetriserve-worker{rank}",
                               daemon=True)
            proc.start()
            cmd_r.close()
            res_w.close()
            self._procs.append(proc)
            self._cmd.append(cmd_w)
            self._res.append(res_r)
        self._reader = threading.Thread(target=self._read_loop, name="tetriserve-pool-reader", daemon=True)
        self._reader.start()
        try:
            infos = await asyncio.wait_for(asyncio.gather(*self._ready), self.start_timeout_s)
        except BaseException:
            await self.close()
            raise
        self.worker_info = list(infos)
        self._setup_budgets()
        log.info("worker pool up: %d workers (%s), %d groups", n, self.backend, len(self._groups))

    async def close(self) -> None:
        self._closing = True
        for conn in self._cmd:
            try:
                conn.send_bytes(pickle.dumps(("exit",)))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 10.0
        for proc in self._procs:
            await asyncio.to_thread(proc.join, max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                await asyncio.to_thread(proc.join, 5.0)
            if proc.is_alive():
                proc.kill()
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 5.0)
        for conn in self._cmd + self._res:
            conn.close()
        for task in list(self._tasks.values()):
            self._finish(task, error="worker pool closed", lost=True)
        self._procs, self._cmd, self._res, self._reader = [], [], [], None
        self._outstanding = {}
        if not self._restarting:  # closed for good: shared conditioning goes (tensors are sent if started again)
            for req in self._requests.values():
                self._free_shared(req)
        if self._store_dir:
            shutil.rmtree(self._store_dir, ignore_errors=True)
            self._store_dir = None

    async def restart(self) -> None:
        """A fresh world after a failure: new workers, models reloaded, requests resume from checkpoints.

        Requests may be admitted (and their results fetched) while it runs: the models stay
        known; assignments are refused (``DevicesUnavailable``) until it is done. Raises when the
        new world cannot start or a model cannot be reloaded (the pool is then down; call it again).
        """
        self._restarting = True
        try:
            resident = {name: self.residency.ranks_holding(name) for name in self._models} if self.residency else {}
            await self.close()
            for req in self._requests.values():
                req.cond_on.clear()
                req.holders.clear()
                req.task_id = None
            await self.start()
            for name, (source, dtype, info) in list(self._models.items()):
                if resident.get(name):
                    info = await self._load_on(name, source, dtype, resident[name]) or info
                self._models[name] = (source, dtype, info)
            self.num_restarts += 1
        except BaseException:
            if self._procs:
                await self.close()
            raise
        finally:
            self._restarting = False
            self._notify(WorkerFault())

    # ------------------------------------------------------------ messages
    def _send(self, rank: int, *msg) -> None:
        self._cmd[rank].send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    def _read_loop(self) -> None:
        """Reader thread: worker messages and worker deaths, handed to the event loop."""
        conns = {conn: rank for rank, conn in enumerate(self._res)}
        sentinels = {proc.sentinel: rank for rank, proc in enumerate(self._procs)}
        loop = self._loop
        res = list(self._res)

        def read(conn) -> bool:
            try:
                msg = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                del conns[conn]
                return False
            loop.call_soon_threadsafe(self._on_message, conns[conn], msg)
            return True

        while (conns or sentinels) and not (self._closing and not conns):
            ready = mpc.wait(list(conns) + list(sentinels), timeout=0.5)
            for obj in sorted(ready, key=lambda o: o not in conns):  # messages before deaths
                if obj in conns:
                    read(obj)
                elif obj in sentinels:
                    rank = sentinels.pop(obj)
                    conn = res[rank]
                    while conn in conns and conn.poll(0) and read(conn):  # its last words first
                        pass
                    loop.call_soon_threadsafe(self._on_death, rank)

    def _on_message(self, rank: int, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            if not self._ready[rank].done():
                self._ready[rank].set_result(msg[2])
        elif kind == "loaded":
            self._on_loaded(rank, *msg[1:2], *msg[3:])
        elif kind == "unloaded":
            self._on_unloaded(rank, msg[1], msg[4])
        elif kind == "step":
            _, task_id, rid, step_index, seconds = msg
            task = self._tasks.get(task_id)
            if task is not None and task.on_step is not None:
                try:
                    task.on_step(rid, step_index, seconds)
                except Exception:  # noqa: BLE001 - a progress callback must not break execution
                    log.exception("on_step callback failed")
        elif kind == "ckpt":
            task = self._tasks.get(msg[1])
            if task is not None:
                task.partial = msg[2]
                if self.on_checkpoint is not None:
                    try:
                        self.on_checkpoint(msg[2])
                    except Exception:  # noqa: BLE001 - a listener must not break the pool
                        log.exception("on_checkpoint listener failed")
        elif kind == "done":
            try:
                self._on_done(rank, msg[1], *msg[3:])
            except Exception as exc:  # never leave execute() waiting on a bookkeeping bug
                log.exception("bad done message from worker %d", rank)
                task = self._tasks.get(msg[1])
                if task is not None:
                    self._finish(task, error=f"pool bookkeeping failed: {exc!r}")
        elif kind == "fault":
            log.error("worker %d fault during %s:\n%s", msg[1], msg[2], msg[3])
            if msg[2] == "start" and not self._ready[rank].done():
                self._ready[rank].set_exception(WorkerError(f"worker {rank} failed to start:\n{msg[3]}"))
        elif kind == "exiting":  # a fatal error: the worker leaves; its death follows
            self._last_words[rank] = msg[2]

    def _on_death(self, rank: int) -> None:
        if self._closing or rank in self.dead:
            return
        reason = f"worker {rank} ({self.devices[rank]}) died ({_exit_description(self._procs[rank])})"
        if rank in self._last_words:
            reason += f" after {self._last_words[rank]}"
        log.error(reason)
        self.dead[rank] = reason
        self._warm.forget_device(rank)
        self.broken = self.broken or reason
        if rank < len(self._ready) and not self._ready[rank].done():
            self._ready[rank].set_exception(WorkerError(reason))
        self._fail_memory_waiters(reason)
        hit: list[str] = []
        for task in list(self._tasks.values()):
            if rank in task.assignment.gpu_ids:
                hit.extend(task.assignment.request_ids)
                self._finish(task, error=reason, lost=True)
        # it still owed a report on an assignment that a peer's fault had ended: its death follows from that
        collateral = not hit and any(t not in self._tasks for t in self._outstanding.get(rank, ()))
        self._notify(WorkerFault(gpu_ids=(rank,), reason=reason, request_ids=tuple(hit), collateral=collateral))

    def _on_done(self, rank: int, task_id: int, steps_done: int, times: tuple, checkpoints, error, stats) -> None:
        outstanding = self._outstanding.get(rank)
        if outstanding is not None:
            outstanding.discard(task_id)
        if stats.get("warm_keys") is not None and rank not in self.dead:  # it captured since its last report
            self._warm.set_device(rank, stats["warm_keys"])
        task = self._tasks.get(task_id)
        if task is None:  # a survivor of an assignment a dead peer broke: it may take work again
            if rank not in self.dead and outstanding is not None and not outstanding:
                self._notify(WorkerFault())
            return
        task.pending.discard(rank)
        if error:
            task.errors.append(error)
            task.retryable = task.retryable or bool(stats.get("retryable"))
        if rank == task.leader:
            task.steps_done, task.step_times_s, task.checkpoints = steps_done, times, checkpoints
            kinds = stats.get("handoff_kinds") or []
            if "handoff_s" in stats and len(kinds) == 1:
                self.stats[f"handoff_{kinds[0]}_s"].append(stats["handoff_s"])
        elif task.steps_done is not None and steps_done != task.steps_done and not error:
            task.errors.append(f"ranks disagree on steps done ({steps_done} vs {task.steps_done})")
        if not task.pending:
            self._finish(task)

    def _finish(self, task: _Task, error: str | None = None, lost: bool = False) -> None:
        """Close a task: update the requests' checkpoints and holders, resolve execute()."""
        if self._tasks.pop(task.task_id, None) is None:
            return
        a = task.assignment
        errors = task.errors + ([error] if error else [])
        if task.retryable and not lost:  # out of memory: the worker lives, the requests resume
            self._notify(WorkerFault(reason="; ".join(errors), request_ids=a.request_ids, fatal=False))
        lost = lost or task.retryable
        steps = task.steps_done or 0
        checkpoints = task.checkpoints
        if not checkpoints and task.partial:  # the leader never ended it: resume from its latest checkpoint
            checkpoints = task.partial
            first = self._requests.get(a.request_ids[0])
            if first is not None and a.request_ids[0] in checkpoints:
                steps = checkpoints[a.request_ids[0]].step_index - first.checkpoint.step_index
        for rid in a.request_ids:
            req = self._requests.get(rid)
            if req is None:
                continue
            req.task_id = None
            if checkpoints and rid in checkpoints:
                req.checkpoint = checkpoints[rid]
            if errors:  # members may hold anything now: trust only the pool's checkpoint
                req.holders.clear()
            else:
                for g in a.gpu_ids:
                    req.holders[g] = req.checkpoint.step_index
        if not checkpoints:
            steps = 0  # nothing came back: nothing was checkpointed
        first_req = self._requests.get(a.request_ids[0])
        if self.residency is not None and first_req is not None:
            for g in a.gpu_ids:
                self.residency.touch(g, first_req.job.model, self.clock())
        result = AssignmentResult(assignment=a, started_at=task.started_at, finished_at=self.clock(),
                                  steps_done=steps, step_times_s=tuple(task.step_times_s[:steps]),
                                  error="; ".join(errors) if errors else None, lost=lost and bool(errors))
        if not task.future.done():
            task.future.set_result(result)

    # ------------------------------------------------------------ models
    async def load_model(self, name: str, path: str, dtype: str = "bf16",
                         on_progress: LoadProgress | None = None, *, pinned: bool = False,
                         ranks: Sequence[int] | None = None) -> ModelInfo:
        """Load weights on ``ranks`` (default: every worker), evicting least recently used models
        there if the budget needs it (pool_memory.py); the same name and file again loads it only
        where it is missing. ``pinned``: never evicted.

        ``on_progress(workers_loaded, num_workers)`` is called (on the event loop) each time a
        worker has the weights.
        """
        if name in self._models:
            source, loaded_dtype, info = self._models[name]
            if source != path or loaded_dtype != dtype:
                raise Conflict(f"model {name!r} is already loaded from {source} ({loaded_dtype})")
        self._require_up()
        if self.dead or self._restarting:
            raise WorkerError(f"the worker pool is recovering from a worker failure ({self.broken or 'restarting'}); "
                              "load the model again once it is back")
        from .models import model_info

        targets = tuple(self._gpu_ids) if ranks is None else tuple(sorted(set(ranks)))
        if not targets or not set(targets) <= set(self._gpu_ids):
            raise InvalidRequest(f"ranks {ranks} are not worker ids 0..{len(self._gpu_ids) - 1}")
        if name not in self._models:
            try:  # fails fast on a bad file, before any worker reads it
                await asyncio.to_thread(model_info, path, name=name, dtype=dtype)
            except InvalidRequest as exc:
                raise InvalidRequest(f"model {name!r} ({path}): {exc}") from None
            except Exception as exc:  # noqa: BLE001 - a corrupt file: name it and the reason
                raise InvalidRequest(f"model {name!r} ({path}): cannot read the checkpoint "
                                     f"({type(exc).__name__}: {exc})") from None
        if pinned:
            self.set_pinned(name, True)
        info = await self._load_on(name, path, dtype, targets, on_progress)
        if name not in self._models:
            self._models[name] = (path, dtype, info)
        return self._models[name][2]

    def models(self) -> dict[str, ModelInfo]:
        return {name: info for name, (_, _, info) in self._models.items()}

    # ------------------------------------------------------------ requests
    async def admit(self, job: SamplingJob, checkpoint: Trajectory | None = None) -> None:
        """Take a request; with ``checkpoint`` (a CPU trajectory of this job, e.g. from another box)
        it resumes from there instead of its first step."""
        if job.request_id in self._requests:
            raise Conflict(f"request {job.request_id} is admitted already")
        if job.model not in self._models:
            raise NotFound(f"model {job.model!r} is not loaded")
        info = self._models[job.model][2]
        self._check_job(job, info)
        from .experts import check_experts, parse_expert
        expert = parse_expert(job.extra)
        if expert is not None:  # a two-expert job: the low-noise model must be loaded and compatible
            if expert[0] not in self._models:
                raise NotFound(f"expert model {expert[0]!r} is not loaded")
            check_experts(info, self._models[expert[0]][2])
        if job.loras:
            from .lora_check import check_stack

            check_stack(self._models[job.model][0], job.loras)
        # Sampler settings beyond the name travel in ``extra`` ("sampler_options", "noise_device").
        kwargs = {arg: job.extra[key] for key, arg in (("sampler_options", "options"), ("noise_device", "noise_device"))
                  if key in job.extra}
        traj = start_trajectory(job.latent.float(), job.noise.float(), job.sigmas.float(), job.sampler, job.seed,
                                **kwargs)
        if checkpoint is not None:
            if checkpoint.num_steps != traj.num_steps or tuple(checkpoint.x.shape) != tuple(traj.x.shape):
                raise InvalidRequest(f"checkpoint of {job.request_id} does not fit the job "
                                     f"({checkpoint.num_steps} steps, shape {list(checkpoint.x.shape)})")
            traj = checkpoint
        # The conditioning is copied once, off the event loop, into shared memory; workers get a handle.
        try:
            shared, block = await asyncio.to_thread(share_conditioning, job)
        except OSError as exc:  # no shared memory to be had (/dev/shm full): the tensors travel in the messages
            log.warning("request %s: conditioning not in shared memory (%s); sending the tensors", job.request_id, exc)
            shared = block = None
        if job.request_id in self._requests:  # admitted meanwhile by a concurrent call
            if block is not None:
                free_block(block)
            raise Conflict(f"request {job.request_id} is admitted already")
        self._requests[job.request_id] = _Request(job=job, family=info.family, checkpoint=traj, shared=shared,
                                                  block=block)

    @staticmethod
    def _check_job(job: SamplingJob, info: ModelInfo) -> None:
        lat = job.latent
        if info.family in ("qwen_image", "wan"):  # 5-D latents (families.py)
            from .families import check_latent_shape
            check_latent_shape(info, tuple(lat.shape))
        elif lat.ndim != 4 or lat.shape[1] != info.in_channels:
            raise InvalidRequest(f"latent must be [B, {info.in_channels}, H, W], got {list(lat.shape)}")
        if lat.shape[-2] % 2 or lat.shape[-1] % 2:
            raise InvalidRequest(f"latent size {lat.shape[2]}x{lat.shape[3]} must be even (pixel size a multiple of 16)")
        if job.noise.shape != lat.shape:
            raise InvalidRequest("noise and latent differ in shape")
        if job.sigmas.ndim != 1 or job.sigmas.numel() < 2:
            raise InvalidRequest("sigmas must be a 1-d tensor of num_steps + 1 values")
        for name, ctx, pooled in (("context", job.context, job.pooled), ("neg_context", job.neg_context, job.neg_pooled)):
            if ctx is None:
                continue
            if ctx.ndim != 3 or ctx.shape[2] != info.context_dim:
                raise InvalidRequest(f"{name} must be [B, tokens, {info.context_dim}], got {list(ctx.shape)}")
            if pooled is None or pooled.ndim != 2 or pooled.shape[1] != info.pooled_dim:
                raise InvalidRequest(f"pooled output for {name} must be [B, {info.pooled_dim}]")
            if lat.shape[0] % ctx.shape[0] or lat.shape[0] % pooled.shape[0]:
                raise InvalidRequest(f"{name} batch does not divide the latent batch {lat.shape[0]}")
        check_image_conditioning(job, info)

    def checkpoint(self, request_id: str) -> Trajectory:
        """The latest checkpointed trajectory of a request (CPU)."""
        return self._request(request_id).checkpoint

    def _request(self, request_id: str) -> _Request:
        try:
            return self._requests[request_id]
        except KeyError:
            raise NotFound(f"unknown request {request_id}") from None

    async def fetch_result(self, request_id: str) -> torch.Tensor:
        traj = self._request(request_id).checkpoint
        if not traj.done:
            raise Conflict(f"request {request_id} has {traj.num_steps - traj.step_index} steps left")
        return finish_latent(traj)

    async def release(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        self._free_shared(req)
        if self._procs and not self._restarting:
            for rank in sorted((req.cond_on | set(req.holders)) - set(self.dead)):
                try:
                    self._send(rank, "release", request_id)
                except OSError:  # a dead worker forgets everything anyway
                    pass

    @staticmethod
    def _free_shared(req: _Request) -> None:
        if req.block is not None:
            free_block(req.block)
        req.shared = req.block = None

    # ------------------------------------------------------------ execution
    def _require_up(self) -> None:
        if not self._procs:
            raise WorkerError("the worker pool is not started")

    async def execute(self, assignment: Assignment, on_step: StepCallback | None = None) -> AssignmentResult:
        a = assignment
        if a.gpu_ids not in self._groups:
            raise InvalidRequest(f"placement {a.gpu_ids} is not one of the pool's groups")
        reqs = [self._request(rid) for rid in a.request_ids]
        for req in reqs:
            if req.task_id is not None:
                raise Conflict(f"request {req.job.request_id} is already running")
        down = self.unavailable_gpu_ids.intersection(a.gpu_ids)
        if down:
            raise DevicesUnavailable(f"devices {sorted(down)} cannot take work: {self._why_down(down)}")
        model = reqs[0].job.model
        if self.residency is not None and not all(self.residency.holds(g, model) for g in a.gpu_ids):
            started = self.clock()
            try:  # an evicted (or never placed) model: load it on these workers first
                await self.ensure_resident(model, a.gpu_ids)
            except Exception as exc:  # noqa: BLE001 - the load's failure is the assignment's
                detail = str(exc) if isinstance(exc, (InvalidRequest, WorkerError, Conflict)) else repr(exc)
                return AssignmentResult(a, started, self.clock(), 0, error=detail)
            for req in reqs:
                if req.task_id is not None:
                    raise Conflict(f"request {req.job.request_id} is already running")
            down = self.unavailable_gpu_ids.intersection(a.gpu_ids)
            if down:
                raise DevicesUnavailable(f"devices {sorted(down)} cannot take work: {self._why_down(down)}")
        now = self.clock()
        if self.residency is not None:
            for g in a.gpu_ids:
                self.residency.touch(g, model, now)
        fail = self._precheck(a, reqs)
        if fail:
            return AssignmentResult(a, now, now, 0, error=fail)
        task_id = next(self._ids)
        task = _Task(task_id=task_id, assignment=a, future=self._loop.create_future(), on_step=on_step,
                     started_at=now, pending=set(a.gpu_ids), leader=a.gpu_ids[0])
        self._tasks[task_id] = task
        sources = {req.job.request_id: self._sources(req, a.gpu_ids) for req in reqs}
        for req in reqs:
            req.task_id = task_id
        for rank in a.gpu_ids:
            conds = {}
            for req in reqs:
                if rank not in req.cond_on:  # the shared-memory handle (tensors only without one)
                    conds[req.job.request_id] = req.shared or _conditioning(req.job)
                    req.cond_on.add(rank)
            msg = {"task_id": task_id, "gpu_ids": a.gpu_ids, "leader": rank == task.leader,
                   "request_ids": a.request_ids, "num_steps": a.num_steps, "model": reqs[0].job.model,
                   "conds": conds, "sources": {rid: src[rank] for rid, src in sources.items()},
                   "checkpoint_every_s": self.checkpoint_every_s,
                   "lora_cache_bytes": self.lora_cache_limits.get(rank)}
            try:
                self._send(rank, "run", msg)
            except OSError as exc:  # the worker is gone and its sentinel not seen yet: that will follow
                self._finish(task, error=f"worker {rank} ({self.devices[rank]}) unreachable: {exc}", lost=True)
                break
            self._outstanding.setdefault(rank, set()).add(task_id)
        return await task.future

    def _why_down(self, ranks) -> str:
        if self._restarting:
            return "the worker pool is restarting"
        if not self._procs:
            return "the worker pool is not running"
        return "; ".join(self.dead.get(g, f"worker {g} is held back (a peer died during its last assignment)")
                         for g in sorted(ranks))

    def _precheck(self, a: Assignment, reqs: list[_Request]) -> str | None:
        """Why the assignment cannot run (a work failure, reported as a result), or None."""
        model = reqs[0].job.model
        shape = tuple(reqs[0].job.latent.shape)
        info = self._models[model][2]
        if info.num_heads % a.sp_degree:
            return f"degree {a.sp_degree} does not divide the {info.num_heads} heads of {model}"
        for req in reqs:
            if req.job.model != model or tuple(req.job.latent.shape) != shape:
                return "batched requests must share model and latent shape"
            left = req.checkpoint.num_steps - req.checkpoint.step_index
            if a.num_steps > left:
                return f"request {req.job.request_id}: {a.num_steps} steps asked, {left} left"
        return None

    def _sources(self, req: _Request, group: Group) -> dict[int, tuple]:
        """Per member: where its copy of the request's latest trajectory comes from."""
        latest = req.checkpoint.step_index
        holders = [g for g in group if req.holders.get(g) == latest]
        if len(holders) == len(group):
            return {g: ("local", latest) for g in group}
        if holders:
            skeleton = req.checkpoint.to("meta")
            src = group.index(holders[0])
            return {g: ("bcast", src, skeleton) for g in group}
        if len(group) == 1 or not self.seed_broadcast or _nbytes(req.checkpoint) < self.seed_min_bytes:
            return {g: ("pool", req.checkpoint) for g in group}
        # one member gets the checkpoint in its message and broadcasts it to the others: the event
        # loop pickles one copy per group, not one per member
        skeleton = req.checkpoint.to("meta")
        return {g: ("seed", 0, req.checkpoint) if i == 0 else ("bcast", 0, skeleton) for i, g in enumerate(group)}

    async def stop(self, request_ids: tuple[str, ...]) -> None:
        wanted = set(request_ids)
        for task in list(self._tasks.values()):
            if wanted & set(task.assignment.request_ids):
                for rank in task.assignment.gpu_ids:
                    try:
                        self._send(rank, "stop", task.task_id)
                    except OSError:  # a dead worker's assignment ends with an error anyway
                        pass

    def kill_workers(self, ranks, reason: str) -> None:
        """Kill these workers (SIGKILL) because of ``reason`` (e.g. they hang); their deaths follow as usual."""
        for rank in ranks:
            if rank < len(self._procs) and self._procs[rank].is_alive() and rank not in self.dead:
                self._last_words[rank] = reason
                try:
                    os.kill(self._procs[rank].pid, signal.SIGKILL)
                except ProcessLookupError:  # gone meanwhile: its sentinel reports it
                    pass

    async def inject_fault(self, rank: int, kind: str) -> None:
        """Fault drills: worker ``rank`` fails its next step with ``kind`` "oom" (out of memory) or
        "cuda" (an unrecoverable device error, after which it exits)."""
        if kind not in ("oom", "cuda"):
            raise InvalidRequest(f"unknown fault kind {kind!r} (oom, cuda)")
        self._send(rank, "inject", kind)


def _nbytes(traj: Trajectory) -> int:
    return sum(t.numel() * t.element_size() for t in traj_tensors(traj))


def _exit_description(proc) -> str:
    """"killed by SIGKILL", "exit code 1": how a worker process ended (its sentinel fired)."""
    proc.join(0.2)  # the sentinel can fire a moment before the exit status is there to read
    code = proc.exitcode
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _conditioning(job: SamplingJob) -> Conditioning:
    from .experts import parse_expert

    return Conditioning(request_id=job.request_id, model=job.model, context=job.context, pooled=job.pooled,
                        cfg=float(job.cfg), guidance=job.guidance, expert=parse_expert(job.extra),
                        neg_context=job.neg_context,
                        neg_pooled=job.neg_pooled, concat=job.concat, refs=tuple(job.ref_latents),
                        ref_method=job.ref_method, loras=tuple(job.loras))


