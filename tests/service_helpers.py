"""Helpers for the service tests: a small policy, job bodies, a running service on a real port."""
from __future__ import annotations

import contextlib
import json
import socket
from dataclasses import dataclass

import torch
from aiohttp import web
from safetensors.torch import save

from comfy_tetriserve.core.sim_executor import SimulatedExecutor
from comfy_tetriserve.service.app import create_app
from comfy_tetriserve.service.settings import ServiceConfig
from comfy_tetriserve.service.state import SERVICE
from comfy_tetriserve.types import Assignment, RoundPlan

from factories import PowerLawCost


@dataclass(frozen=True)
class FifoPolicy:
    """First come, first served: each plannable request in arrival order gets a free group of
    ``sp_degree`` devices for at most ``round_steps`` steps (all remaining steps if None)."""

    sp_degree: int = 1
    round_steps: int | None = None
    name: str = "test-fifo"

    def plan_round(self, view, cost):
        free = list(view.free_groups(self.sp_degree))
        used: set[int] = set()
        out = []
        for snap in view.plannable:
            group = next((g for g in free if used.isdisjoint(g)), None)
            if group is None:
                break
            used.update(group)
            steps = snap.steps_left if self.round_steps is None else min(self.round_steps, snap.steps_left)
            out.append(Assignment((snap.request_id,), group, steps))
        return RoundPlan(view.round_index, 0.0, tuple(out))


def fifo_policy_factory() -> FifoPolicy:
    """For ``serve --policy service_helpers:fifo_policy_factory``."""
    return FifoPolicy(round_steps=4)


#: ~2 ms per 512 px step at degree 1 with the default scale
FAST_COST = PowerLawCost(base_s=0.008)


def job_body(settings: dict | None = None, *, batch: int = 1, res: int = 128, channels: int = 16,
             tokens: int = 8, ctx_dim: int = 4096, pooled_dim: int = 768, seed: int = 0, tensors: dict | None = None,
             drop: tuple[str, ...] = (), metadata: dict | None = None) -> bytes:
    """A valid (by default) submit body for a sim FLUX model; overrides make it invalid on purpose."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "latent": torch.zeros(batch, channels, res // 8, res // 8),
        "context": torch.randn(batch, tokens, ctx_dim, generator=g),
        "pooled": torch.randn(batch, pooled_dim, generator=g),
    }
    base.update(tensors or {})
    for name in drop:
        base.pop(name, None)
    s = {"model": "flux-sim", "steps": 8}
    s.update(settings or {})
    meta = {"tetriserve": json.dumps(s)} if metadata is None else metadata
    return save(base, metadata=meta)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(**overrides) -> ServiceConfig:
    values = dict(model=("flux-sim=sim:flux", "sd3-sim=sim:sd3"), devices="sim:4", lease_s=5.0,
                  housekeeping_s=0.05, events_ping_s=0.5, shutdown_grace_s=2.0, profile_as=(), journal="off")
    values.update(overrides)
    return ServiceConfig(**values)


def make_service_app(*, num_gpus: int = 4, policy=None, cost=None, time_scale: float = 1.0, **config):
    cost = cost or FAST_COST
    executor = SimulatedExecutor(num_gpus, cost, time_scale=time_scale)
    app = create_app(make_config(devices=f"sim:{num_gpus}", **config), executor=executor,
                     policy=policy or FifoPolicy(), cost=cost)
    return app, executor


@contextlib.asynccontextmanager
async def running_service(app: web.Application, port: int | None = None, host: str = "127.0.0.1"):
    """Serve ``app`` on a real TCP port; yields the base URL. Models configured are loaded first."""
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port or 0)  # 0: the kernel picks a free port as it binds (no race)
    await site.start()
    port = runner.addresses[0][1]
    svc = app[SERVICE]
    for name in list(svc.catalog.configured):
        await svc.catalog.wait_loaded(name)
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def submit_json(session, url: str, body: bytes, headers: dict | None = None):
    async with session.post(url + "/v1/jobs", data=body, headers=headers or {}) as resp:
        return resp.status, await resp.json()


async def follow_events(session, url: str, job_id: str, after: int = 0) -> list[dict]:
    out = []
    async with session.get(f"{url}/v1/jobs/{job_id}/events?after={after}") as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        async for line in resp.content:
            if line.strip():
                out.append(json.loads(line))
    return out


def fast_cost_factory():
    """For ``serve --cost service_helpers:fast_cost_factory``: 10 ms per 512 px step at degree 1."""
    return PowerLawCost(base_s=0.04)


def serve_command(port: int, *extra: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "comfy_tetriserve", "serve", "--port", str(port), "--devices", "sim:2",
            "--model", "flux-sim=sim:flux", "--policy", "service_helpers:fifo_policy_factory",
            "--cost", "service_helpers:fast_cost_factory", "--profile-as", "flux=flux-sim", *extra]
