"""``ClusterExecutor``: the Executor over several boxes, one Ray actor (``NodeAgent``) per node.

The service uses it like the worker pool: one planner, one aiohttp process, global GPU ids
numbered node by node (``Topology``), groups that never cross a node. Each node runs the same
worker code as a single box (one process per device, one torch.distributed world per node).

What the executor keeps per request (in the service's process, so a node's loss loses nothing):
the job (put once into Ray's object store, fetched by each node that runs it), the latest
checkpoint (a CPU trajectory returned after every assignment and streamed inside long ones) and
the node that holds the request now. An assignment on another node *moves* the job there at the
step boundary: the new node admits the job with the checkpoint (the same hand-off path as a
worker pool restart), the old node forgets it. Moves are counted and priced by ``MoveCost``
(checkpoint bytes over the inter-node bandwidth) in ``moves()``.

Faults: a node whose agent dies (the node left, its raylet died) takes its devices out at once
(``unavailable_gpu_ids``); assignments on it end ``lost`` with the steps checkpointed so far, and
the jobs resume on other nodes from their checkpoints; ``on_fault`` reports the node's devices (the
service's quarantine rules apply). A worker death inside a node is the node's worker pool's fault
handling; ``needs_restart`` then names the node and ``restart()`` rebuilds that node's pool. A node
that joins later takes the place of a lost node with as many devices, or a spare slot
(``spare_nodes``: GPU ids reserved at start for boxes that join later); its devices join the plan
once the models have loaded there.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import Conflict, InvalidRequest, NotFound, WorkerError
from ..types import Assignment, AssignmentResult
from ..core.executor import DevicesUnavailable, ModelInfo, SamplingJob, StepCallback, WorkerFault
from . import require_ray
from .topology import SPARE_PREFIX, MoveCost, NodeSpec, Topology, node_devices, parse_devices_per_node, with_spares

log = logging.getLogger(__name__)

Group = tuple[int, ...]
MOVES_KEPT = 1000


@dataclass
class _Request:
    job: SamplingJob
    job_ref: Any  # ray.ObjectRef of the job, owned by this process
    checkpoint: Any  # CPU Trajectory, the latest completed step
    node: int | None = None  # node index that has the request admitted
    running: bool = False


@dataclass
class _Slot:
    """One node of the topology: its agent while alive."""

    spec: NodeSpec
    agent: Any = None
    alive: bool = False
    reason: str | None = None  # why it is down
    num_faults_seen: int = 0
    info: dict = field(default_factory=dict)
    unavailable: frozenset[int] = frozenset()  # local ids its pool cannot use now
    needs_restart: str | None = None


@dataclass(frozen=True)
class Move:
    request_id: str
    from_node: int
    to_node: int
    num_bytes: int
    priced_s: float  # MoveCost.time_s(num_bytes)
    took_s: float  # measured: admission with the checkpoint on the new node


def trajectory_bytes(traj) -> int:
    from ..worker.runner import traj_tensors

    return sum(t.numel() * t.element_size() for t in traj_tensors(traj))


def discover(ray, devices_per_node: str) -> Topology:
    """Alive nodes that take part, head node first, then by node id."""
    kind, count = parse_devices_per_node(devices_per_node)
    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        devices = node_devices(kind, count, int(res.get("GPU", 0)))
        if devices:
            head = "node:__internal_head__" in res
            nodes.append((not head, n["NodeID"], NodeSpec(n["NodeID"], n.get("NodeManagerAddress", ""), devices)))
    if not nodes:
        raise InvalidRequest("no Ray node has a GPU (use --devices-per-node cpu:N for CPU workers)"
                             if kind == "gpu" else "the Ray cluster has no alive node")
    return Topology(tuple(spec for _, _, spec in sorted(nodes, key=lambda t: (t[0], t[1]))))


class ClusterExecutor:
    """Executor over a Ray cluster (see the module docstring)."""

    def __init__(self, address: str | None = "auto", *, devices_per_node: str = "gpu",
                 checkpoint_every_s: float | None = 1.0, move_cost: MoveCost = MoveCost(),
                 collective_timeout_s: float = 300.0, num_threads: int | None = None,
                 monitor_s: float = 0.5, ray_init: dict[str, Any] | None = None,
                 clock: Callable[[], float] = time.monotonic, spare_nodes: int = 0) -> None:
        ray = require_ray()
        self._ray = ray
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, **(ray_init or {})}
            ray.init(address=address or "auto", **kwargs)
        self.devices_per_node = devices_per_node
        self.topology = with_spares(discover(ray, devices_per_node), spare_nodes)
        self._slots = [_Slot(spec, reason=None if not spec.node_id.startswith(SPARE_PREFIX)
                             else "spare: waiting for a box to join") for spec in self.topology.nodes]
        self._node_ids = self.topology.node_gpu_ids()
        self._gpu_ids = self.topology.gpu_ids
        self._groups = self.topology.groups
        self.checkpoint_every_s = checkpoint_every_s
        self.move_cost = move_cost
        self.collective_timeout_s = collective_timeout_s
        self.num_threads = num_threads
        self.monitor_s = monitor_s
        self.clock = clock
        self._models: dict[str, tuple[str, str, ModelInfo]] = {}
        self._requests: dict[str, _Request] = {}
        self._moves: list[Move] = []
        self.num_moves = 0
        self._monitor: asyncio.Task | None = None
        self._restarting = False
        self.on_fault: Callable[[WorkerFault], None] | None = None

    # ------------------------------------------------------------ protocol properties
    @property
    def gpu_ids(self) -> tuple[int, ...]:
        return self._gpu_ids

    @property
    def groups(self) -> tuple[Group, ...]:
        return self._groups

    @property
    def unavailable_gpu_ids(self) -> frozenset[int]:
        out: set[int] = set()
        for i, slot in enumerate(self._slots):
            ids = self._node_ids[i]
            if not slot.alive or self._restarting:
                out.update(ids)
            else:
                out.update(ids[k] for k in slot.unavailable)
        return frozenset(out)

    @property
    def needs_restart(self) -> str | None:
        """A node whose worker pool lost a worker needs its pool rebuilt; a lost node does not (it is
        replaced when a node joins)."""
        if self._restarting:
            return None
        for i, slot in enumerate(self._slots):
            if slot.alive and slot.needs_restart:
                return f"node {i}: {slot.needs_restart}"
        return None

    def nodes(self) -> list[dict]:
        """One entry per node: index, Ray node id, address, GPU ids, alive, why not, its workers."""
        return [{"node": i, "node_id": s.spec.node_id, "address": s.spec.address, "gpu_ids": list(self._node_ids[i]),
                 "devices": list(s.spec.devices), "alive": s.alive, "error": s.reason,
                 "backend": s.info.get("backend"), "world_size": s.info.get("world_size")}
                for i, s in enumerate(self._slots)]

    def workers(self) -> list[dict]:
        out = []
        for i, s in enumerate(self._slots):
            for w in s.info.get("workers", []):
                out.append({**w, "gpu_id": self._node_ids[i][w["gpu_id"]], "node": i,
                            "alive": bool(w.get("alive")) and s.alive})
        return out

    def moves(self) -> dict[str, Any]:
        kept = self._moves
        return {"num_moves": self.num_moves, "bytes_per_s": self.move_cost.bytes_per_s,
                "priced_s_total": sum(m.priced_s for m in kept), "took_s_total": sum(m.took_s for m in kept),
                "recent": [dataclasses.asdict(m) for m in kept[-20:]]}

    def _notify(self, fault: WorkerFault) -> None:
        if self.on_fault is None:
            return
        try:
            self.on_fault(fault)
        except Exception:  # noqa: BLE001 - a listener must not break the executor
            log.exception("on_fault listener failed")

    # ------------------------------------------------------------ life cycle
    def _new_agent(self, spec: NodeSpec):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from .agent import NodeAgent

        num_gpus = sum(d.startswith("cuda") for d in spec.devices)
        remote = self._ray.remote(NodeAgent).options(
            num_cpus=0, num_gpus=num_gpus, max_restarts=0, max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(spec.node_id, soft=False))
        return remote.remote(spec.devices, self.checkpoint_every_s, self.collective_timeout_s, self.num_threads)

    async def _start_slot(self, i: int) -> None:
        slot = self._slots[i]
        slot.agent = self._new_agent(slot.spec)
        slot.info = await slot.agent.start.remote()
        for name, (path, dtype, _) in list(self._models.items()):  # a new node loads the known models first
            await slot.agent.load_model.remote(name, path, dtype)
        slot.alive, slot.reason, slot.num_faults_seen = True, None, 0
        slot.unavailable, slot.needs_restart = frozenset(), None

    async def start(self) -> None:
        if any(s.alive for s in self._slots):
            return
        await asyncio.gather(*(self._start_slot(i) for i, s in enumerate(self._slots)
                               if not s.spec.node_id.startswith(SPARE_PREFIX)))
        self._monitor = asyncio.ensure_future(self._watch())
        log.info("cluster up: %d nodes, %d devices, %d groups", len(self._slots), len(self._gpu_ids),
                 len(self._groups))

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            self._monitor = None
        for slot in self._slots:
            if slot.alive and slot.agent is not None:
                try:
                    await asyncio.wait_for(slot.agent.close.remote(), 30.0)
                except Exception:  # noqa: BLE001 - closing
                    pass
            if slot.agent is not None:
                self._ray.kill(slot.agent)
            slot.agent, slot.alive = None, False

    async def restart(self) -> None:
        """Rebuild the pools of nodes that lost a worker, and start agents on lost nodes' replacements."""
        self._restarting = True
        try:
            for i, slot in enumerate(self._slots):
                if slot.alive and slot.needs_restart:
                    slot.info = await slot.agent.restart.remote()
                    slot.needs_restart, slot.unavailable = None, frozenset()
                    slot.num_faults_seen = len(await slot.agent.faults_since.remote(0))
                    for req in self._requests.values():
                        if req.node == i:
                            req.node = None  # the new world holds nothing: re-admit from the checkpoint
            await self._adopt_new_nodes()
        finally:
            self._restarting = False
            self._notify(WorkerFault())

    # ------------------------------------------------------------ watching nodes
    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.monitor_s)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - keep watching
                log.exception("cluster monitor failed")

    async def poll(self) -> None:
        """Check every node once: deaths, worker faults inside nodes, and nodes that joined."""
        for i, slot in enumerate(self._slots):
            if not slot.alive:
                continue
            try:
                health = await asyncio.wait_for(slot.agent.ping.remote(), 30.0)
                if health["num_faults"] > slot.num_faults_seen:
                    for fault in await slot.agent.faults_since.remote(slot.num_faults_seen):
                        ids = self._node_ids[i]
                        self._notify(dataclasses.replace(fault, gpu_ids=tuple(ids[k] for k in fault.gpu_ids)))
                    slot.num_faults_seen = health["num_faults"]
                slot.unavailable = frozenset(health["unavailable"])
                slot.needs_restart = health["needs_restart"]
            except self._ray.exceptions.RayActorError as exc:
                self._node_died(i, f"node {i} ({slot.spec.address}) lost: {type(exc).__name__}", ())
        if not self._restarting and any(not s.alive for s in self._slots):
            await self._adopt_new_nodes()

    def _node_died(self, i: int, reason: str, request_ids: tuple[str, ...]) -> None:
        slot = self._slots[i]
        if not slot.alive:
            return
        slot.alive, slot.reason = False, reason
        log.error(reason)
        # the monitor may see the death before the running assignment's stream does: name its jobs either way
        running = tuple(rid for rid, req in self._requests.items() if req.node == i and req.running)
        request_ids = tuple(dict.fromkeys(request_ids + running))
        for req in self._requests.values():
            if req.node == i:
                req.node = None
        self._notify(WorkerFault(gpu_ids=self._node_ids[i], reason=reason, request_ids=request_ids))

    async def _adopt_new_nodes(self) -> None:
        """A node that joined with as many devices as a lost one (or a spare slot) takes its place (its GPU ids)."""
        used = {s.spec.node_id for s in self._slots if s.alive}
        try:
            candidates = discover(self._ray, self.devices_per_node).nodes
        except InvalidRequest:
            return
        for spec in candidates:
            if spec.node_id in used or any(s.spec.node_id == spec.node_id for s in self._slots if not s.alive):
                continue
            for i, slot in enumerate(self._slots):
                if not slot.alive and slot.spec.num_devices == len(spec.devices):
                    slot.spec = spec
                    try:
                        await self._start_slot(i)
                    except Exception as exc:  # noqa: BLE001 - try again at the next poll
                        slot.reason = f"joining node {spec.node_id} failed: {exc}"
                        log.error(slot.reason)
                        break
                    used.add(spec.node_id)
                    log.warning("node %s joined as node %d (GPU ids %s)", spec.node_id, i, list(self._node_ids[i]))
                    self._notify(WorkerFault())
                    break

    # ------------------------------------------------------------ models
    async def load_model(self, name: str, path: str, dtype: str = "bf16",
                         on_progress: Callable[[int, int], None] | None = None) -> ModelInfo:
        if name in self._models:
            source, loaded_dtype, info = self._models[name]
            if source == path and loaded_dtype == dtype:
                return info
            raise Conflict(f"model {name!r} is already loaded from {source} ({loaded_dtype})")
        live = [s for s in self._slots if s.alive]
        if not live:
            raise WorkerError("no node of the cluster is up")
        total, done = len(self._gpu_ids), 0

        async def load(slot: _Slot) -> ModelInfo:  # every node at once, each from its own disk
            nonlocal done
            info = await slot.agent.load_model.remote(name, path, dtype)
            done += slot.spec.num_devices
            if on_progress is not None:
                on_progress(done, total)
            return info

        infos = await asyncio.gather(*(load(s) for s in live))
        self._models[name] = (path, dtype, infos[0])
        return infos[0]

    def models(self) -> dict[str, ModelInfo]:
        return {name: info for name, (_, _, info) in self._models.items()}

    # ------------------------------------------------------------ requests
    async def admit(self, job: SamplingJob) -> None:
        from ..worker.pool import WorkerPool
        from ..worker.samplers import start_trajectory

        if job.request_id in self._requests:
            raise Conflict(f"request {job.request_id} is admitted already")
        if job.model not in self._models:
            raise NotFound(f"model {job.model!r} is not loaded")
        WorkerPool._check_job(job, self._models[job.model][2])  # noqa: SLF001 - the same checks as one box
        kwargs = {arg: job.extra[key] for key, arg in (("sampler_options", "options"), ("noise_device", "noise_device"))
                  if key in job.extra}
        traj = start_trajectory(job.latent.float(), job.noise.float(), job.sigmas.float(), job.sampler, job.seed,
                                **kwargs)
        self._requests[job.request_id] = _Request(job=job, job_ref=self._ray.put(job), checkpoint=traj)

    def checkpoint(self, request_id: str):
        return self._request(request_id).checkpoint

    def node_of_request(self, request_id: str) -> int | None:
        return self._request(request_id).node

    def _request(self, request_id: str) -> _Request:
        try:
            return self._requests[request_id]
        except KeyError:
            raise NotFound(f"unknown request {request_id}") from None

    async def fetch_result(self, request_id: str):
        from ..worker.samplers import finish_latent

        traj = self._request(request_id).checkpoint
        if not traj.done:
            raise Conflict(f"request {request_id} has {traj.num_steps - traj.step_index} steps left")
        return finish_latent(traj)

    async def release(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is not None and req.node is not None:
            self._forget_on(req.node, request_id)

    def _forget_on(self, node: int, request_id: str) -> None:
        slot = self._slots[node]
        if slot.alive and slot.agent is not None:
            slot.agent.release.remote(request_id)  # fire and forget: a lost node forgets anyway

    # ------------------------------------------------------------ execution
    def _moves_to(self, req: _Request, node: int) -> bool:
        """Running on ``node`` moves the request (what ``_place`` counts as a move)."""
        return req.node != node and (req.node is not None or req.checkpoint.step_index > 0)

    def move_s(self, assignment: Assignment) -> float:
        """The priced time (``MoveCost``) of moving ``assignment``'s requests to its node: their
        checkpoints' bytes over the inter-node link, one transfer per moved request; 0 if none moves."""
        node = self.topology.node_of(assignment.gpu_ids)
        total = 0.0
        for rid in assignment.request_ids:
            req = self._requests.get(rid)
            if req is not None and self._moves_to(req, node):
                total += self.move_cost.time_s(trajectory_bytes(req.checkpoint))
        return total

    async def _place(self, req: _Request, node: int) -> None:
        """Admit the request on ``node`` with its latest checkpoint (a move when it was elsewhere)."""
        if req.node == node:
            return
        slot = self._slots[node]
        moved = self._moves_to(req, node)
        t0 = time.perf_counter()
        await slot.agent.admit.remote(req.job_ref, req.checkpoint)
        took = time.perf_counter() - t0
        rid = req.job.request_id
        if moved:
            nbytes = trajectory_bytes(req.checkpoint)
            self.num_moves += 1
            self._moves.append(Move(rid, -1 if req.node is None else req.node, node, nbytes,
                                    self.move_cost.time_s(nbytes), took))
            del self._moves[:-MOVES_KEPT]
        if req.node is not None:
            self._forget_on(req.node, rid)
        req.node = node

    async def execute(self, assignment: Assignment, on_step: StepCallback | None = None) -> AssignmentResult:
        a = assignment
        if a.gpu_ids not in self._groups:
            raise InvalidRequest(f"placement {a.gpu_ids} is not one of the cluster's groups")
        node = self.topology.node_of(a.gpu_ids)
        reqs = [self._request(rid) for rid in a.request_ids]
        for req in reqs:
            if req.running:
                raise Conflict(f"request {req.job.request_id} is already running")
        down = self.unavailable_gpu_ids.intersection(a.gpu_ids)
        if down:
            slot = self._slots[node]
            raise DevicesUnavailable(f"devices {sorted(down)} cannot take work: "
                                     f"{slot.reason or slot.needs_restart or 'node restarting'}")
        started = self.clock()
        first = reqs[0].checkpoint.step_index
        slot = self._slots[node]
        for req in reqs:
            req.running = True
        try:
            try:
                for req in reqs:
                    await self._place(req, node)
                local = Assignment(a.request_ids, self.topology.local_ids(a.gpu_ids), a.num_steps)
                result = None
                gen = slot.agent.execute.options(num_returns="streaming").remote(local)
                async for ref in gen:
                    ev = await ref
                    if ev[0] == "step":
                        if on_step is not None:
                            try:
                                on_step(ev[1], ev[2], ev[3])
                            except Exception:  # noqa: BLE001 - a progress callback must not break execution
                                log.exception("on_step callback failed")
                    elif ev[0] == "ckpt":
                        self._requests[ev[1]].checkpoint = ev[2]
                    elif ev[0] == "done":
                        result = ev[1]
                        for rid, traj in ev[2].items():
                            if rid in self._requests:
                                self._requests[rid].checkpoint = traj
            except self._ray.exceptions.RayActorError as exc:
                reason = f"node {node} ({slot.spec.address}) lost during the assignment: {type(exc).__name__}"
                self._node_died(node, reason, a.request_ids)
                steps = reqs[0].checkpoint.step_index - first
                return AssignmentResult(a, started, self.clock(), steps, error=reason, lost=True)
            if result is None:
                raise WorkerError(f"node {node} ended the assignment without a result")
            if result.error:  # members may hold anything now: the next assignment starts from the checkpoint
                for req in reqs:
                    if req.node == node:
                        self._forget_on(node, req.job.request_id)
                        req.node = None
            return dataclasses.replace(result, assignment=a, started_at=started, finished_at=self.clock())
        finally:
            for req in reqs:
                req.running = False

    async def stop(self, request_ids: tuple[str, ...]) -> None:
        nodes = {self._requests[rid].node for rid in request_ids if rid in self._requests}
        for i in nodes:
            if i is not None and self._slots[i].alive:
                try:
                    await self._slots[i].agent.stop.remote(request_ids)
                except self._ray.exceptions.RayActorError:
                    pass  # its assignment ends lost anyway

    def kill_workers(self, gpu_ids, reason: str) -> None:
        """Kill the workers of these devices (the service's stall watchdog); their deaths follow as usual."""
        by_node: dict[int, list[int]] = {}
        for g in gpu_ids:
            i = self.topology.node_index(g)
            by_node.setdefault(i, []).append(g - self._node_ids[i][0])
        for i, ranks in by_node.items():
            if self._slots[i].alive:
                self._slots[i].agent.kill_workers.remote(ranks, reason)
