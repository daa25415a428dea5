"""The worker process: one per device, one ordered queue of work, every group created up front.

A worker joins the pool's torch.distributed world (rank = its position in the device list),
creates the process group of every placement the planner may use (the same groups, in the same
order, on every rank), warms each with one collective of every kind, and reports ready. Then it
executes the pool's messages strictly in order (load a model, run an assignment, forget a
request), so two ranks that share groups always meet in their collectives in the same order.

Running an assignment (``run``):

1. Conditioning that this worker has not seen yet arrives with the message (a handle to the
   pool's shared-memory copy, condshare.py) and is kept on the device until the request is released.
2. The request's latest trajectory comes from where the pool says: this worker already holds it
   (it ran the previous assignment), a member of the new group broadcasts it within the group,
   or the pool sends its checkpoint.
3. Each step is one sampler step (``samplers.step``) whose model evaluations are Ulysses-parallel
   forwards over the group; every rank holds the full latent and runs the same sampler
   arithmetic on the same gathered output, so all ranks stay bit-identical. Several requests of
   one assignment, and CFG's cond and uncond, run as one batched forward per model evaluation
   (text of different lengths padded, the padding masked out of attention).
4. Stop requests are honoured after the current step, by agreement: each rank's stop flag rides
   along in the gather that ends the step's last forward, so all ranks see the same flags and
   stop at the same step without an extra collective.
5. The group leader reports each step (request, step index, seconds) and, at the end, the
   latest trajectory of every request, which becomes the pool's checkpoint.

Failures (``classify_failure``): an error of the request itself on one device is reported and the
worker goes on. Out of memory on one device loses the assignment (the requests resume from the
pool's checkpoint) and the worker goes on. A CUDA error (the context is unusable), any error
inside a multi-device assignment (peers may wait in a collective this rank will never join) and,
under NCCL, a failed collective are fatal: the worker reports them and exits, which the pool
sees as a death (and the peers' collectives fail instead of hanging). Under gloo a collective
that fails because a peer died only loses the assignment.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import pickle
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from .experts import step_with_experts
from .graphs import ModelForwards
from .parallel import GroupComm
from .samplers import Trajectory, cfg_combine, step
from .steptime import DeferredVote, StepTimer

log = logging.getLogger(__name__)

Group = tuple[int, ...]


@dataclass(frozen=True)
class WorkerConfig:
    rank: int
    world_size: int
    device: str
    backend: str  # "nccl" | "gloo"
    store_path: str  # torch.distributed FileStore
    groups: tuple[Group, ...]
    collective_timeout_s: float = 300.0
    num_threads: int = 0  # CPU intra-op threads (0: torch's default)
    cuda_graphs: bool = False  # capture each step shape's model evaluation as a CUDA graph (graphs.py)
    log_level: int = logging.WARNING


@dataclass(frozen=True)
class Conditioning:
    """A request's model inputs other than the latent; sent to a worker once."""

    request_id: str
    model: str
    context: torch.Tensor
    pooled: torch.Tensor
    cfg: float = 1.0
    guidance: float | None = None
    neg_context: torch.Tensor | None = None
    neg_pooled: torch.Tensor | None = None
    concat: torch.Tensor | None = None  # FLUX Fill's extra input channels (both CFG branches)
    refs: tuple = ()  # FLUX Kontext reference latents (both CFG branches)
    ref_method: str = "offset"
    expert: tuple[str, float] | None = None  # (low-noise model, boundary sigma): experts.py
    loras: tuple[tuple[str, float], ...] = ()  # LoRA stack: (file path, strength), applied per forward

    @property
    def uses_cfg(self) -> bool:
        return self.cfg != 1.0 and self.neg_context is not None

    def to(self, device: torch.device, dtype: torch.dtype) -> "Conditioning":
        def mv(t):
            return None if t is None else t.to(device=device, dtype=dtype)
        return dataclasses.replace(self, context=mv(self.context), pooled=mv(self.pooled),
                                   neg_context=mv(self.neg_context), neg_pooled=mv(self.neg_pooled),
                                   concat=mv(self.concat), refs=tuple(mv(r) for r in self.refs))


# ----------------------------------------------------------------- trajectories as tensors
def traj_tensors(traj: Trajectory) -> list[torch.Tensor]:
    """The tensors of a trajectory in a fixed order (fields, then dict entries by key)."""
    out = []
    for f in dataclasses.fields(traj):
        value = getattr(traj, f.name)
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, dict):
            out.extend(value[k] for k in sorted(value) if isinstance(value[k], torch.Tensor))
    return out


def traj_rebuild(skeleton: Trajectory, tensors: list[torch.Tensor]) -> Trajectory:
    """``skeleton`` (any device, e.g. meta) with its tensors replaced, in ``traj_tensors`` order."""
    it = iter(tensors)
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(skeleton):
        value = getattr(skeleton, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = next(it)
        elif isinstance(value, dict):
            changes[f.name] = {k: (next(it) if isinstance(value[k], torch.Tensor) else value[k]) for k in sorted(value)}
    return dataclasses.replace(skeleton, **changes)


def broadcast_trajectory(comm: GroupComm, src_index: int, mine: Trajectory | None, skeleton: Trajectory,
                         device: torch.device) -> Trajectory:
    """The source rank's trajectory on every rank of ``comm`` (one broadcast per tensor).

    Receivers lay out their buffers as ``Trajectory.to(device)`` places a trajectory (a sampler
    may keep some memory, e.g. its generator state, on the CPU), so they match the sender's.
    """
    if comm.index == src_index:
        tensors = traj_tensors(mine)
    else:
        blank = [torch.empty(t.shape, dtype=t.dtype) for t in traj_tensors(skeleton)]
        tensors = traj_tensors(traj_rebuild(skeleton, blank).to(device))
    for t in tensors:
        comm.broadcast(t, src_index)
    return mine if comm.index == src_index else traj_rebuild(skeleton, tensors)


# ----------------------------------------------------------------- batched sampler steps
Row = tuple  # (x [b,C,H,W], sigma [b], context [b,T,D], pooled [b,P], guidance [b] | None,
#               concat [b,C',H,W] | None, refs (tuple of [b,C,h,w]), ref_method, LoRA stack)


class _Rendezvous:
    """Runs several sampler steps at once: their model evaluations meet in one batched forward.

    Each trajectory's ``step`` runs in its own thread; its denoise function hands its rows to the
    rendezvous and waits. When every unfinished step waits, the calling thread runs one forward
    for all rows and hands the outputs back. Works for samplers that evaluate the model any
    number of times per step.
    """

    def __init__(self, num: int) -> None:
        self.cv = threading.Condition()
        self.active = num
        self.pending: dict[int, list[Row]] = {}
        self.results: dict[int, Any] = {}

    def call(self, idx: int, rows: list[Row]) -> list[torch.Tensor]:
        with self.cv:
            self.pending[idx] = rows
            self.cv.notify_all()
            self.cv.wait_for(lambda: idx in self.results)
            out = self.results.pop(idx)
        if isinstance(out, BaseException):
            raise out
        return out

    def finish(self) -> None:
        with self.cv:
            self.active -= 1
            self.cv.notify_all()

    def serve(self, forward_rows) -> None:
        while True:
            with self.cv:
                self.cv.wait_for(lambda: len(self.pending) >= self.active)
                if self.active == 0:
                    return
                batch, self.pending = dict(sorted(self.pending.items())), {}
            flat = [row for rows in batch.values() for row in rows]
            try:
                outs = forward_rows(flat)
                pos, results = 0, {}
                for idx, rows in batch.items():
                    results[idx], pos = outs[pos:pos + len(rows)], pos + len(rows)
            except BaseException as exc:  # hand the failure to every waiting step
                results = {idx: exc for idx in batch}
            with self.cv:
                self.results.update(results)
                self.cv.notify_all()


def _expand(t: torch.Tensor | None, b: int) -> torch.Tensor | None:
    """A conditioning batch of 1 (or a divisor) repeated to the latent batch, as ComfyUI does."""
    if t is None or t.shape[0] == b:
        return t
    if b % t.shape[0]:
        raise ValueError(f"conditioning batch {t.shape[0]} does not divide latent batch {b}")
    return t.repeat(b // t.shape[0], *([1] * (t.ndim - 1)))


#: per device type, the padding (fraction of the rows' tokens) a shared forward may add. GPUs: any (a
#: batch of two costs far less than two forwards while launches dominate, and halves the captured
#: graphs). CPUs: none, rows of one text length share a forward: there every padded token costs full
#: price and the masked attention is slower (measured, tiny models at 512 px, cond and uncond of
#: different lengths: one padded, masked forward took 1.09-1.45x two separate ones; docs/engine.md).
PAD_FRACTION = {"cuda": float("inf"), "cpu": 0.0}


def _eager(model, *args, **kwargs):
    return model.forward(*args, **kwargs)


def _pad_text(context: torch.Tensor, num_text: int) -> torch.Tensor:
    """[b, T, D] -> [b, num_text, D], zeros after the T real tokens (masked out in attention)."""
    short = num_text - context.shape[1]
    return context if short == 0 else torch.nn.functional.pad(context, (0, 0, 0, short))


class StepRunner:
    """One sampler step for a list of trajectories on one group (see the module docstring)."""

    def __init__(self, model, comm: GroupComm | None, forwards=None, max_pad_fraction: float | None = None,
                 loras=None) -> None:
        self.model = model
        self.comm = comm
        self.loras = loras  # lora.LoraCache: files read once per worker
        #: rows of different text lengths share a padded, masked forward while the padding adds at most
        #: this fraction of their tokens (default: always on GPUs, never on CPUs: ``PAD_FRACTION``)
        self.max_pad_fraction = (max_pad_fraction if max_pad_fraction is not None
                                 else PAD_FRACTION.get(model.device.type, PAD_FRACTION["cpu"]))
        #: the model evaluation (graphs.ModelForwards: eager, or captured on CUDA); None: eager
        self.forwards = forwards
        self.votes: torch.Tensor | None = None
        self.vote = 0.0

    def forward_rows(self, rows: list[Row]) -> list[torch.Tensor]:
        """Model outputs for rows, batched (row order kept).

        Rows whose text lengths differ (CFG's cond and uncond, requests with different prompts)
        share one forward, padded to the longest with the padding masked out of attention (each
        row's output equals its own forward), when the padding adds at most ``max_pad_fraction``
        of the rows' tokens; otherwise rows of equal length share a forward. Rows that differ in
        guidance, Fill channels, reference latent sizes or LoRA stack run apart."""
        outs: list[torch.Tensor | None] = [None] * len(rows)
        for idxs in self._forward_groups(rows):
            lengths = [int(rows[i][2].shape[1]) for i in idxs for _ in range(rows[i][0].shape[0])]
            longest = max(lengths)
            first = rows[idxs[0]]
            if len(idxs) == 1:
                x, sigma, context, pooled, guidance, concat, refs = first[:7]
            else:
                x, sigma, pooled = (torch.cat([rows[i][j] for i in idxs]) for j in (0, 1, 3))
                context = torch.cat([_pad_text(rows[i][2], longest) for i in idxs])
                guidance = None if first[4] is None else torch.cat([rows[i][4] for i in idxs])
                concat = None if first[5] is None else torch.cat([rows[i][5] for i in idxs])
                refs = tuple(torch.cat([rows[i][6][k] for i in idxs]) for k in range(len(first[6])))
            fwd = self.forwards or _eager
            with self._lora(first[8]):
                out, self.votes = fwd(self.model, x, sigma, context, pooled, guidance, comm=self.comm,
                                      vote=self.vote, concat=concat, refs=refs, ref_method=first[7],
                                      text_lengths=lengths if min(lengths) < longest else None)
            pos = 0
            for i in idxs:
                n = rows[i][0].shape[0]
                outs[i], pos = out[pos:pos + n], pos + n
        return outs

    def _lora(self, stack: tuple[tuple[str, float], ...]):
        from contextlib import nullcontext

        if not stack:
            return nullcontext()
        from .lora import applied

        return applied(self.model.module, self.loras.combined(self.model, stack))

    def _forward_groups(self, rows: list[Row]) -> list[list[int]]:
        by_kind: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            refs_key = tuple(tuple(t.shape[1:]) for t in r[6])
            by_kind.setdefault((r[4] is None, r[5] is None, refs_key, r[7], r[8]), []).append(i)
        groups = []
        for idxs in by_kind.values():
            lens = {i: int(rows[i][2].shape[1]) for i in idxs}
            longest = max(lens.values())
            x = rows[idxs[0]][0]
            image = self.model.num_image_tokens(x.shape[2], x.shape[3])
            real = sum((lens[i] + image) * rows[i][0].shape[0] for i in idxs)
            pad = sum((longest - lens[i]) * rows[i][0].shape[0] for i in idxs)
            if pad <= self.max_pad_fraction * real:
                groups.append(idxs)
                continue
            by_len: dict[int, list[int]] = {}
            for i in idxs:
                by_len.setdefault(lens[i], []).append(i)
            groups.extend(by_len.values())
        return groups

    def denoiser(self, cond: Conditioning, submit):
        """ComfyUI's flow-model denoiser with CFG: ``x - out * sigma``, cond and uncond as one batch."""
        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            sigma = sigma.reshape(-1).to(x.device)
            if sigma.numel() == 1:
                sigma = sigma.expand(b)
            g = None
            if self.model.config.get("guidance_embeds"):  # FLUX-dev; ComfyUI's default guidance is 3.5
                g = torch.full((b,), 3.5 if cond.guidance is None else cond.guidance, device=x.device)
            image = (_expand(cond.concat, b), tuple(_expand(r, b) for r in cond.refs), cond.ref_method)
            rows = [(x, sigma, _expand(cond.context, b), _expand(cond.pooled, b), g, *image, cond.loras)]
            if cond.uses_cfg:
                rows.append((x, sigma, _expand(cond.neg_context, b), _expand(cond.neg_pooled, b), g, *image, cond.loras))
            outs = submit(rows)
            s = sigma.view(-1, *([1] * (x.dim() - 1)))
            den = [x - o * s for o in outs]
            return cfg_combine(den[0], den[1], cond.cfg) if cond.uses_cfg else den[0]
        return denoise

    def step(self, trajs: list[Trajectory], conds: list[Conditioning],
             vote: float) -> tuple[list[Trajectory], bool | torch.Tensor]:
        """One sampler step of every trajectory; returns them and the stop signal: this rank's vote
        alone, or the group's gathered votes (stop if any is > 0; ``steptime.DeferredVote``)."""
        self.vote, self.votes = vote, None
        if len(trajs) == 1:
            new = [step(trajs[0], self.denoiser(conds[0], self.forward_rows))]
        else:
            rv = _Rendezvous(len(trajs))
            new: list = [None] * len(trajs)
            errors: list[BaseException] = []

            def run(i: int) -> None:
                try:
                    with torch.inference_mode():
                        new[i] = step(trajs[i], self.denoiser(conds[i], lambda rows, i=i: rv.call(i, rows)))
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    errors.append(exc)
                finally:
                    rv.finish()

            threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(trajs))]
            for t in threads:
                t.start()
            rv.serve(self.forward_rows)
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
        if self.comm is None or self.votes is None:
            return new, vote > 0
        return new, self.votes  # the group's gathered votes (read by DeferredVote: a sync on CUDA)


# ----------------------------------------------------------------- failures
_COMM_MARKERS = ("connection reset", "connection closed", "broken pipe", "timed out", "timeout", "gloo", "nccl",
                 "processgroup", "peer")
_CUDA_MARKERS = ("cuda error", "cuda-capable", "device-side assert", "illegal memory access", "cublas", "cudnn")


def classify_failure(exc: BaseException, backend: str, group_size: int) -> str:
    """What a failed assignment means for the worker (see the module docstring):

    ``"error"``: the request's own failure, the worker goes on; ``"lost"``: the assignment is lost
    to a fault, the requests may resume from their checkpoints and the worker goes on;
    ``"fatal"``: the worker must exit (its device or its collectives cannot be trusted).
    """
    text = f"{type(exc).__name__}: {exc}".lower()
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text:
        return "lost" if group_size == 1 else "fatal"
    dist_error = getattr(torch.distributed, "DistError", ())
    if isinstance(exc, dist_error) or any(m in text for m in _COMM_MARKERS):
        return "lost" if backend == "gloo" else "fatal"
    if type(exc).__name__ == "AcceleratorError" or any(m in text for m in _CUDA_MARKERS):
        return "fatal"
    return "error" if group_size == 1 else "fatal"


class InjectedFault(RuntimeError):
    """A drill's fault (``WorkerPool.inject_fault``)."""


# ----------------------------------------------------------------- the process
class Worker:
    def __init__(self, cfg: WorkerConfig, res_conn) -> None:
        self.cfg = cfg
        self.res = res_conn
        self.device = torch.device(cfg.device)
        self.models: dict[str, Any] = {}
        self.loras = None  # lora.LoraCache, made on first use
        self.conds: dict[str, Conditioning] = {}
        self.trajs: dict[str, Trajectory] = {}
        self.comms: dict[Group, GroupComm | None] = {}
        self.stop_task_ids: set[int] = set()
        self.inbox: queue.Queue = queue.Queue()
        self.injected: str | None = None  # a drill's fault for the next step
        self.forwards = ModelForwards(cfg.cuda_graphs, self.device)
        self.warm_version = 0  # forwards.version at the last report of warm keys to the pool

    def send(self, *msg) -> None:
        self.res.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    # -- start-up
    def join_world(self) -> None:
        import torch.distributed as dist

        cfg = self.cfg
        kwargs: dict[str, Any] = {}
        if cfg.backend == "nccl":
            torch.cuda.set_device(self.device)
            kwargs["device_id"] = self.device
        elif self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        timeout = timedelta(seconds=cfg.collective_timeout_s)
        dist.init_process_group(cfg.backend, init_method=f"file://{cfg.store_path}", rank=cfg.rank,
                                world_size=cfg.world_size, timeout=timeout, **kwargs)
        wire = self.device if cfg.backend == "nccl" else torch.device("cpu")
        for g in cfg.groups:  # every rank, same order: new_group is collective over the world
            if len(g) == 1:
                if cfg.rank in g:
                    self.comms[g] = None
                continue
            pg = dist.new_group(list(g), timeout=timeout)
            if cfg.rank in g:
                self.comms[g] = GroupComm(pg, g, g.index(cfg.rank), wire=wire)
        for g in cfg.groups:  # warm: the first collective of a group is slow (lazy connection set-up)
            comm = self.comms.get(g)
            if comm is not None:
                t = torch.zeros(comm.degree, device=self.device)
                comm.all_to_all(torch.empty_like(t), t, [1] * comm.degree, [1] * comm.degree)
                comm.all_gather_flat(t[:1])
                comm.broadcast(t, 0)
                comm.all_reduce_max(t)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- the ordered queue
    def receive(self, cmd_conn) -> None:
        """Receiver thread: stops act at once, everything else queues in arrival order."""
        while True:
            try:
                msg = pickle.loads(cmd_conn.recv_bytes())
            except (EOFError, OSError):
                self.inbox.put(("exit",))
                return
            if msg[0] == "stop":
                self.stop_task_ids.add(msg[1])
            elif msg[0] == "inject":
                self.injected = msg[1]
            else:
                self.inbox.put(msg)

    def serve(self) -> None:
        while True:
            msg = self.inbox.get()
            op = msg[0]
            if op == "exit":
                return
            try:
                if op == "load":
                    self.load(*msg[1:])
                elif op == "unload":
                    self.unload(*msg[1:])
                elif op == "run":
                    self.run(msg[1])
                elif op == "release":
                    self.conds.pop(msg[1], None)
                    self.trajs.pop(msg[1], None)
                else:
                    raise ValueError(f"unknown message {op!r}")
            except Exception:  # a bug in message handling: report, keep serving
                log.exception("worker %d: %s failed", self.cfg.rank, op)
                self.send("fault", self.cfg.rank, op, traceback.format_exc())

    def load(self, request_key: int, name: str, source: str, dtype: str) -> None:
        from .memory import module_bytes
        from .models import load_transformer

        try:
            if name not in self.models:
                self.models[name] = load_transformer(source, dtype=dtype, device=self.device, name=name)
            info = dataclasses.replace(self.models[name].info(), num_bytes=module_bytes(self.models[name].module))
            self.send("loaded", request_key, self.cfg.rank, info, None, self.resident_bytes())
        except Exception as exc:  # noqa: BLE001 - reported to the pool
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.send("loaded", request_key, self.cfg.rank, None, f"{type(exc).__name__}: {exc}",
                      self.resident_bytes())

    def unload(self, request_key: int, name: str) -> None:
        """Drop a model's weights (the pool evicts it); replies with the bytes still resident."""
        import gc

        self.models.pop(name, None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.send("unloaded", request_key, self.cfg.rank, name, self.resident_bytes())

    def resident_bytes(self) -> int:
        """Measured bytes of every model this worker holds."""
        from .memory import module_bytes

        return sum(module_bytes(m.module) for m in self.models.values())

    def obtain(self, rid: str, source: tuple, comm: GroupComm | None) -> Trajectory:
        kind = source[0]
        if kind == "local":
            traj = self.trajs.get(rid)
            if traj is None or traj.step_index != source[1]:
                have = None if traj is None else traj.step_index
                raise RuntimeError(f"{rid}: expected the trajectory at step {source[1]} here, have {have}")
            return traj
        if kind == "pool":
            return source[1].to(self.device)
        if kind == "seed":  # the pool's checkpoint came to this member: it broadcasts it to the group
            _, src_index, payload = source
            mine = payload.to(self.device)
            return broadcast_trajectory(comm, src_index, mine, mine, self.device)
        if kind == "bcast":
            _, src_index, skeleton = source
            mine = self.trajs.get(rid) if comm.index == src_index else None
            if comm.index == src_index and (mine is None or mine.step_index != skeleton.step_index):
                raise RuntimeError(f"{rid}: asked to broadcast step {skeleton.step_index}, not held here")
            return broadcast_trajectory(comm, src_index, mine, skeleton, self.device)
        raise ValueError(f"unknown trajectory source {kind!r}")

    def run(self, task: dict) -> None:
        task_id, group, leader = task["task_id"], tuple(task["gpu_ids"]), task["leader"]
        rids = task["request_ids"]
        steps_done, error, stats = 0, None, {}
        timer = StepTimer(self.device)
        trajs: list[Trajectory] = []
        try:
            for rid, cond in task["conds"].items():  # a shared-memory handle, or the tensors themselves
                model = self.models[cond.model]
                load = getattr(cond, "load", None) or cond.to
                self.conds[rid] = load(self.device, model.dtype)
            comm = self.comms[group]
            model = self.models[task["model"]]
            t0 = time.perf_counter()
            trajs = [self.obtain(rid, task["sources"][rid], comm) for rid in rids]
            stats["handoff_s"] = time.perf_counter() - t0
            stats["handoff_kinds"] = sorted({task["sources"][rid][0] for rid in rids})
            if self.loras is None:
                from .lora import LoraCache

                self.loras = LoraCache()
            if task.get("lora_cache_bytes") is not None:  # the pool's limit for this worker (memory.py)
                self.loras.set_limit(int(task["lora_cache_bytes"]))
            runners = {task["model"]: StepRunner(model, comm, self.forwards, loras=self.loras)}

            def runner_for(name: str) -> StepRunner:  # two-expert jobs step on either model (experts.py)
                if name not in runners:
                    runners[name] = StepRunner(self.models[name], comm, self.forwards, loras=self.loras)
                return runners[name]

            conds = [self.conds[rid] for rid in rids]
            every = task.get("checkpoint_every_s")
            last_ckpt = time.perf_counter()
            votes = DeferredVote(self.device)
            indices: list[list[int]] = []  # per step: each request's step index after it

            def report() -> None:
                for j, seconds in timer.ready():
                    for rid, index in zip(rids, indices[j]):
                        self.send("step", task_id, rid, index, seconds)

            for i in range(task["num_steps"]):
                timer.start()
                self._raise_injected()
                vote = 1.0 if task_id in self.stop_task_ids else 0.0
                trajs, signal = step_with_experts(runner_for, trajs, conds, vote, task["model"])
                timer.stop()  # no host sync: CUDA events, read when done
                indices.append([traj.step_index for traj in trajs])
                steps_done += 1
                if leader:
                    report()
                if votes.agreed(signal):
                    break
                if (leader and every is not None and i + 1 < task["num_steps"]
                        and time.perf_counter() - last_ckpt >= every):
                    # a checkpoint inside a long assignment: a death now loses at most `every` seconds
                    self.send("ckpt", task_id, {rid: traj.to("cpu") for rid, traj in zip(rids, trajs)})
                    last_ckpt = time.perf_counter()
            timer.finish()  # the assignment's one sync
            if leader:
                report()
        except Exception as exc:  # noqa: BLE001 - the assignment fails; the worker lives on unless it is fatal
            kind = classify_failure(exc, self.cfg.backend, len(group))
            log.log(logging.WARNING if kind == "lost" else logging.ERROR, "worker %d: task %d failed (%s)",
                    self.cfg.rank, task_id, kind, exc_info=kind != "lost")
            detail = f"{type(exc).__name__}: {_first_line(exc)}"
            error = f"worker {self.cfg.rank} ({self.cfg.device}): {detail}"
            if kind == "lost":
                stats["retryable"] = True
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            elif kind == "fatal":
                self.exit_fatally(detail)
        # Tasks reach a worker in increasing id order: flags of this task or earlier ones are spent.
        for spent in [i for i in list(self.stop_task_ids) if i <= task_id]:
            self.stop_task_ids.discard(spent)
        for rid, traj in zip(rids, trajs):
            self.trajs[rid] = traj
        checkpoints = {rid: traj.to("cpu") for rid, traj in zip(rids, trajs)} if leader and trajs else None
        if error is not None and self.device.type != "cuda":
            timer.ready()  # the steps before the failure (on CUDA only those already read: no sync now)
        if self.forwards.active and self.forwards.version != self.warm_version:  # captures: tell the pool
            self.warm_version = self.forwards.version
            stats["warm_keys"] = self.forwards.warm_keys(self.cfg.rank)
        self.send("done", task_id, self.cfg.rank, steps_done, tuple(timer.times), checkpoints, error, stats)

    def _raise_injected(self) -> None:
        kind, self.injected = self.injected, None
        if kind == "oom":
            raise torch.OutOfMemoryError("injected: out of memory (drill)")
        if kind == "cuda":
            raise InjectedFault("injected: CUDA error: an illegal memory access was encountered (drill)")

    def exit_fatally(self, error: str) -> None:
        """Tell the pool why, then leave at once (no clean-up that could block on a broken device)."""
        try:
            self.send("exiting", self.cfg.rank, error)
        finally:
            logging.shutdown()
            sys.stderr.flush()
            os._exit(70)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else ""


def worker_main(cfg: WorkerConfig, cmd_conn, res_conn) -> None:
    """Entry point of a worker process (started with the spawn method)."""
    logging.basicConfig(level=cfg.log_level, format=f"%(asctime)s worker{cfg.rank} %(levelname)s %(name)s: %(message)s")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    worker = Worker(cfg, res_conn)
    try:
        with torch.inference_mode():
            worker.join_world()
            from .memory import device_memory_bytes

            worker.send("ready", cfg.rank, {"device": cfg.device, "backend": cfg.backend, "pid": os.getpid(),
                                            "torch": torch.__version__, "cuda_graphs": worker.forwards.active,
                                            "total_memory_bytes": device_memory_bytes(worker.device)})
            threading.Thread(target=worker.receive, args=(cmd_conn,), daemon=True).start()
            worker.serve()
    except Exception:
        worker.send("fault", cfg.rank, "start", traceback.format_exc())
        raise
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
