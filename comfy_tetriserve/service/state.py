"""The service's parts, held together under one application key."""
from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from ..engine.engine import Engine
from ..engine.executor import Executor
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

    async def start(self, configured_models: dict[str, str]) -> None:
        await self.loop.start()
        for name in configured_models:
            self.catalog.start_load(name, self.config.dtype)

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
            cost_drift=self.cost.drift(),
        )


SERVICE = web.AppKey("tetriserve_service", Service)
