"""The service's parts, held together under one application key."""
from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from ..core.engine import Engine
from ..core.executor import Executor
from .catalog import ModelCatalog, ModelCost
from .events import EventLog
from .jobs import Clock, JobStore
from .loop import EngineLoop
from .metrics import ServiceMetrics
from .settings import ServiceConfig


@dataclass
class Service:
    config: ServiceConfig
    clock: Clock
    store: JobStore
    hub: EventLog
    metrics: ServiceMetrics
    cost: ModelCost
    executor: Executor
    engine: Engine
    catalog: ModelCatalog
    loop: EngineLoop
    policy_name: str
    open_streams: int = 0  # event streams being served now

    async def start(self, configured_models: dict[str, str]) -> None:
        lost = self.store.history.open()
        if lost:
            self.metrics.jobs_lost_in_restart_total += len(lost)
            self.hub.append({"type": "jobs_lost_in_restart", "num_jobs": len(lost),
                             "boot_ids": sorted({p.boot_id for p in lost}),
                             "job_ids": [p.job_id for p in lost[-100:]]})
        await self.loop.start()
        for name in configured_models:
            self.catalog.start_load(name, self.config.dtype, pinned=not self.config.evictable)

    async def close(self) -> None:
        await self.catalog.close()
        await self.loop.close()

    def render_metrics(self) -> str:
        jobs = self.store.open_jobs()
        running = sum(1 for j in jobs if j.status.value == "running")
        return self.metrics.render(
            policy=self.policy_name, executor=type(self.executor).__name__,
            gpu_ids=self.engine.healthy_gpu_ids, busy_gpu_ids=self.engine.busy_gpu_ids,
            queue_depth=len(jobs) - running, running_jobs=running, open_leases=len(self.store.leases),
            cost_drift=self.cost.drift(), jobs_held=len(self.store.jobs),
            recovery=self.loop.recovery.to_json() if self.loop.recovery.supported else None,
        )

    def nodes_json(self) -> list[dict] | None:
        """Cluster mode: the executor's nodes (None on one box)."""
        nodes = getattr(self.executor, "nodes", None)
        return nodes() if callable(nodes) else None

    def executor_json(self) -> dict:
        """The executor's health: recovery state, faults, restarts and, for worker pools, each worker."""
        out = {"executor": type(self.executor).__name__, **self.loop.recovery.to_json(),
               "error": self.loop.executor_fault(), "gpu_ids": list(self.engine.all_gpu_ids),
               "healthy_gpu_ids": list(self.engine.healthy_gpu_ids), "busy_gpu_ids": sorted(self.engine.busy_gpu_ids)}
        workers = getattr(self.executor, "workers", None)
        if callable(workers):
            out["workers"] = workers()
        nodes = getattr(self.executor, "nodes", None)  # cluster mode: one entry per node
        if callable(nodes):
            out["nodes"] = nodes()
            out["moves"] = self.executor.moves()
        return out


SERVICE = web.AppKey("tetriserve_service", Service)
