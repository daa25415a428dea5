"""The node agent: one Ray actor per node, running that node's worker pool.

The agent is the only thing Ray places: it starts the node's ``WorkerPool`` (worker/pool.py,
worker/runner.py: one process per device, one torch.distributed world of this node only, NCCL on
CUDA, gloo on CPU, every group created up front), and relays the cluster executor's calls to it.
Its methods take and return node-local worker ids. ``execute`` streams ("step", ...) and
("ckpt", ...) events while the assignment runs and ends with ("done", result, checkpoints), so
the driver holds every checkpoint and a job survives the loss of the whole node.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from ..core.executor import ModelInfo, SamplingJob, WorkerFault
from ..types import Assignment

log = logging.getLogger(__name__)


class NodeAgent:
    """Wrapped by ``ray.remote`` in executor.py (kept a plain class so it can be read and tested)."""

    def __init__(self, devices: list[str], checkpoint_every_s: float | None = 1.0,
                 collective_timeout_s: float = 300.0, num_threads: int | None = None) -> None:
        from ..worker.pool import WorkerPool

        self.devices = list(devices)
        self.pool = WorkerPool(self.devices, checkpoint_every_s=checkpoint_every_s,
                               collective_timeout_s=collective_timeout_s, num_threads=num_threads)
        self.faults: list[WorkerFault] = []
        self._streams: dict[str, asyncio.Queue] = {}  # request id -> the queue of its running assignment
        self.pool.on_fault = self.faults.append
        self.pool.on_checkpoint = self._on_checkpoint

    def _on_checkpoint(self, ckpts: dict) -> None:
        for rid, traj in ckpts.items():
            q = self._streams.get(rid)
            if q is not None:
                q.put_nowait(("ckpt", rid, traj))

    async def start(self) -> dict[str, Any]:
        import ray

        await self.pool.start()
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "address": ray.util.get_node_ip_address(),
                **self.info()}

    def info(self) -> dict[str, Any]:
        """This node's torch.distributed world: its size, backend, groups (local ids) and worker pids."""
        return {"world_size": len(self.devices), "backend": self.pool.backend,
                "groups": [list(g) for g in self.pool.groups], "workers": self.pool.workers()}

    async def ping(self) -> dict[str, Any]:
        return {"unavailable": sorted(self.pool.unavailable_gpu_ids), "needs_restart": self.pool.needs_restart,
                "num_faults": len(self.faults)}

    async def faults_since(self, index: int) -> list[WorkerFault]:
        return self.faults[index:]

    async def load_model(self, name: str, path: str, dtype: str) -> ModelInfo:
        return await self.pool.load_model(name, path, dtype)

    async def admit(self, job: SamplingJob, checkpoint=None) -> None:
        if job.request_id in self.pool._requests:  # noqa: SLF001 - re-admission after a move back
            await self.pool.release(job.request_id)
        await self.pool.admit(job, checkpoint)

    async def execute(self, assignment: Assignment):
        """Stream the assignment's events (see the module docstring); node-local ids."""
        q: asyncio.Queue = asyncio.Queue()
        for rid in assignment.request_ids:
            self._streams[rid] = q

        def on_step(rid: str, step_index: int, seconds: float) -> None:
            q.put_nowait(("step", rid, step_index, seconds))

        task = asyncio.ensure_future(self.pool.execute(assignment, on_step))
        task.add_done_callback(lambda _: q.put_nowait(None))
        try:
            while True:
                ev = await q.get()
                if ev is None:
                    break
                yield ev
            while not q.empty():  # events queued just before the end
                ev = q.get_nowait()
                if ev is not None:
                    yield ev
            result = task.result()
            ckpts = {rid: self.pool.checkpoint(rid) for rid in assignment.request_ids
                     if rid in self.pool._requests}  # noqa: SLF001
            yield ("done", result, ckpts)
        finally:
            for rid in assignment.request_ids:
                if self._streams.get(rid) is q:
                    del self._streams[rid]

    async def kill_workers(self, ranks: list[int], reason: str) -> None:
        self.pool.kill_workers(ranks, reason)

    async def stop(self, request_ids: tuple[str, ...]) -> None:
        await self.pool.stop(request_ids)

    async def release(self, request_id: str) -> None:
        await self.pool.release(request_id)

    async def restart(self) -> dict[str, Any]:
        await self.pool.restart()
        return self.info()

    async def close(self) -> None:
        await self.pool.close()
