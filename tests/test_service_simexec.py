"""The simulated executor: the Executor protocol on the wall clock, priced by the cost model."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from comfy_tetriserve.core.executor import Executor, SamplingJob
from comfy_tetriserve.core.sim_executor import SimulatedExecutor, sim_family
from comfy_tetriserve.errors import Conflict, InvalidRequest, NotFound
from comfy_tetriserve.types import Assignment
from factories import PowerLawCost

COST = PowerLawCost(base_s=0.08)  # 512 px, degree 1: 20 ms per step


def sampling_job(rid: str, steps: int = 5, res: int = 512, batch: int = 1) -> SamplingJob:
    latent = torch.randn(batch, 16, res // 8, res // 8)
    return SamplingJob(request_id=rid, model="m", latent=latent, noise=torch.zeros_like(latent),
                       sigmas=torch.linspace(1, 0, steps + 1), context=torch.zeros(batch, 4, 4096),
                       pooled=torch.zeros(batch, 768))


def test_protocol_families_and_loading(tmp_path):
    ex = SimulatedExecutor(4, COST)
    assert isinstance(ex, Executor)
    assert ex.gpu_ids == (0, 1, 2, 3) and (0, 1, 2, 3) in ex.groups and (2, 3) in ex.groups
    assert sim_family("sim:sd3") == "sd3" and sim_family("/x/flux1-dev.safetensors") == "flux"
    assert sim_family("/models/sd3.5_medium.safetensors") == "sd3"
    with pytest.raises(InvalidRequest):
        sim_family("sim:unet")

    async def body():
        info = await ex.load_model("m", "sim:sd3", "fp16")
        assert (info.name, info.family, info.pooled_dim, info.dtype) == ("m", "sd3", 2048, "fp16")
        assert await ex.load_model("m", "sim:sd3") == info  # idempotent
        with pytest.raises(Conflict):
            await ex.load_model("m", "sim:flux")
        with pytest.raises(NotFound):
            await ex.load_model("f", str(tmp_path / "missing.safetensors"))
        with pytest.raises(NotFound):
            await ex.admit(sampling_job("r0").__class__(**{**sampling_job("r0").__dict__, "model": "nope"}))

    asyncio.run(body())


def test_steps_take_the_cost_models_time_and_report_each_step():
    async def body():
        ex = SimulatedExecutor(4, COST, time_scale=2.0)
        await ex.load_model("m", "sim:flux")
        await ex.admit(sampling_job("a", steps=10))
        seen = []
        t0 = time.monotonic()
        res = await ex.execute(Assignment(("a",), (0, 1), 6), lambda rid, i, s: seen.append((rid, i)))
        elapsed = time.monotonic() - t0
        expected = 6 * 2.0 * COST.step_time_s("m", 512, 512, 1, 2)  # about 0.14 s
        assert expected - 0.005 <= elapsed <= expected + 0.08
        assert res.steps_done == 6 and len(res.step_times_s) == 6 and res.error is None
        assert seen == [("a", i) for i in range(1, 7)]
        with pytest.raises(Conflict):
            await ex.fetch_result("a")  # 4 steps left
        await ex.execute(Assignment(("a",), (3,), 4))
        latent = await ex.fetch_result("a")
        assert latent.shape == (1, 16, 64, 64)
        await ex.release("a")
        with pytest.raises(NotFound):
            await ex.fetch_result("a")

    asyncio.run(body())


def test_stop_ends_an_assignment_at_the_next_step_boundary():
    async def body():
        ex = SimulatedExecutor(2, COST)
        await ex.load_model("m", "sim:flux")
        await ex.admit(sampling_job("a", steps=100))
        await ex.admit(sampling_job("b", steps=100))
        task = asyncio.ensure_future(ex.execute(Assignment(("a", "b"), (0,), 100)))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        await ex.stop(("b",))
        res = await task
        step_s = ex.step_time_s(Assignment(("a", "b"), (0,), 1))
        assert time.monotonic() - t0 <= step_s + 0.08
        assert 2 <= res.steps_done < 100
        assert step_s == pytest.approx(COST.step_time_s("m", 512, 512, 2, 1))  # batched: both priced

    asyncio.run(body())
