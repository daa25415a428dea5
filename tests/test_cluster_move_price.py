"""The live planner sees the price of moving a job between boxes, as the cluster simulation does.

The service asks a ``MovingExecutor`` (the cluster executor) what each assignment's moves cost and
adds it to the engine's expected end (the planner's ``running_until_at``) and the ``placed`` event.
Here the executor is the simulated one split into two boxes of two devices, pricing a move with the
cluster's ``MoveCost`` over a slow link so that the price dwarfs the steps; the cluster executor's own
``move_s`` is checked on Ray's test cluster (tests/test_cluster_ray.py).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
import pytest

from comfy_tetriserve.cluster.topology import MoveCost
from comfy_tetriserve.core.executor import MovingExecutor
from comfy_tetriserve.core.sim_executor import SimulatedExecutor
from comfy_tetriserve.service.app import create_app
from comfy_tetriserve.service.state import SERVICE
from comfy_tetriserve.types import Assignment, RoundPlan

from service_helpers import FAST_COST, follow_events, job_body, make_config, running_service, submit_json

BOXES = ((0, 1), (2, 3))
MOVE = MoveCost(bytes_per_s=8e3, alpha_s=1e-3)  # a 16x16x16 fp32 latent (16 KiB): about 2 s


class TwoBoxes(SimulatedExecutor):
    """The simulated executor as two boxes: a request that ran on one box moves when it runs on the other."""

    def __init__(self) -> None:
        super().__init__(4, FAST_COST)
        self.box_of: dict[str, int] = {}
        self.priced: list[tuple[tuple[str, ...], float]] = []

    def _box(self, gpu_ids) -> int:
        return next(i for i, b in enumerate(BOXES) if set(gpu_ids) <= set(b))

    def move_s(self, a: Assignment) -> float:
        box = self._box(a.gpu_ids)
        moved = [rid for rid in a.request_ids if self.box_of.get(rid, box) != box]
        s = sum(MOVE.time_s(self._latent_bytes(rid)) for rid in moved)
        self.priced.append((a.request_ids, s))
        return s

    def _latent_bytes(self, rid: str) -> int:
        latent = self._requests[rid].job.latent
        return latent.numel() * latent.element_size()

    async def execute(self, assignment, on_step=None):
        result = await super().execute(assignment, on_step)
        for rid in assignment.request_ids:
            self.box_of[rid] = self._box(assignment.gpu_ids)
        return result


@dataclass(frozen=True)
class BoxOneThenTwo:
    """Two steps on box 0's pair, the rest on box 1's pair (one move per job)."""

    name: str = "test-box-one-then-two"

    def plan_round(self, view, cost):
        out = []
        for snap in view.plannable:
            group = (0, 1) if snap.steps_done == 0 else (2, 3)
            if set(group) <= set(view.free_gpu_ids):
                out.append(Assignment((snap.request_id,), group, 2 if snap.steps_done == 0 else snap.steps_left))
                break
        return RoundPlan(view.round_index, 0.0, tuple(out))


def test_the_engine_and_the_placed_event_carry_the_move_price():
    ex = TwoBoxes()
    assert isinstance(ex, MovingExecutor) and not isinstance(SimulatedExecutor(4, FAST_COST), MovingExecutor)
    app = create_app(make_config(devices="sim:4"), executor=ex, policy=BoxOneThenTwo(), cost=FAST_COST)
    svc = app[SERVICE]

    async def body():
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            status, receipt = await submit_json(s, url, job_body({"steps": 6}, res=128))
            assert status == 202, receipt
            job_id = receipt["job_id"]
            events = await follow_events(s, url, job_id)
        placed = [e for e in events if e["type"] == "placed"]
        assert [e["gpu_ids"] for e in placed] == [[0, 1], [2, 3]] and events[-1]["type"] == "finished"
        price = MOVE.time_s(16 * 16 * 16 * 4)
        assert "move_s" not in placed[0] and placed[1]["move_s"] == pytest.approx(price)
        assert [p for _, p in ex.priced] == [0.0, pytest.approx(price)]
        first, second = [r for r in svc.engine.records() if job_id in r.request_ids]
        steps_s = [r.expected_end_at - r.started_at for r in (first, second)]
        # the steps alone take milliseconds; the second assignment's expected end adds the move's 2 s
        assert steps_s[0] < 0.1 and price > 1.5
        assert steps_s[1] - price == pytest.approx(second.num_steps / first.num_steps * steps_s[0], rel=0.5, abs=0.05)

    asyncio.run(body())
