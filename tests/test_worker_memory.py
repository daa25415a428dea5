"""Model memory of the worker pool on CPU workers: budgets, LRU eviction, reloads, loads beside work.

Two pools: four workers with a budget of three tiny models (eviction), and four workers with the
default budget where a 142 MB checkpoint loads (cast to bf16, 1-3 s) on workers 0-1 while jobs of
another model run on 2-3.
"""
from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch
from safetensors.torch import save_file

from comfy_tetriserve.errors import InsufficientMemory, InvalidRequest
from comfy_tetriserve.types import Assignment
from comfy_tetriserve.worker.pool import WorkerPool
from comfy_tetriserve.worker.tiny import TINY_FLUX_CONFIG, flux_rope_axes, model_class, model_kwargs, \
    write_tiny_checkpoint

from test_workers import make_job

pytestmark = pytest.mark.slow

TINY_BYTES = 1_356_032  # the tiny FLUX model in fp32, as the workers measure it
BUDGET = int(3.2 * TINY_BYTES)  # three fit, a fourth does not


class Harness:
    def __init__(self, pool: WorkerPool) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool = pool

    def __call__(self, coro):
        return self.loop.run_until_complete(coro)

    def run_job(self, rid: str, model: str, group: tuple[int, ...], seed: int = 0, steps: int = 3):
        pool = self.pool
        self(pool.admit(make_job(rid, model, steps=steps, seed=seed)))
        result = self(pool.execute(Assignment((rid,), group, steps)))
        assert result.error is None, result.error
        latent = self(pool.fetch_result(rid))
        self(pool.release(rid))
        return latent


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mem")
    h = Harness(WorkerPool("cpu:4", memory_budget=BUDGET, groups=[(0, 1, 2, 3), (0, 1), (2, 3), (0,)]))
    h.paths = {f"m{i}": str(write_tiny_checkpoint("flux", "comfy", tmp / f"m{i}", seed=i)) for i in range(5)}
    h.tmp = tmp
    h(h.pool.start())
    yield h
    h(h.pool.close())
    h.loop.close()


def check_budget(pool: WorkerPool) -> None:
    """No worker holds more than its budget, by the workers' own measurement and by the books."""
    for row in pool.memory():
        assert row["measured_bytes"] <= row["budget_bytes"] == BUDGET
        assert row["measured_bytes"] == row["used_bytes"]  # what the worker measured is what is booked


def test_lru_eviction_pinned_stays_and_an_evicted_model_reloads_with_the_same_result(tight):
    h, pool = tight, tight.pool
    h(pool.load_model("m0", h.paths["m0"], "fp32", pinned=True))
    h(pool.load_model("m1", h.paths["m1"], "fp32"))
    h(pool.load_model("m2", h.paths["m2"], "fp32"))
    check_budget(pool)
    assert pool.residency_of("m0")["pinned"] and not pool.residency_of("m1")["pinned"]
    assert pool.residency_of("m2")["bytes_per_worker"] == TINY_BYTES
    # loads are timed: the bandwidth estimate moved off its first guess, and a load has a prediction
    assert pool.load_time.num_observed == 3 and pool.load_time.bytes_per_s != 2e9
    assert pool.residency_of("m2")["load_s_predicted"] == pytest.approx(TINY_BYTES / pool.load_time.bytes_per_s,
                                                                        abs=1e-3)
    reference = h.run_job("ref", "m2", (0, 1), seed=3)  # m2 used on 0-1 ...
    h.run_job("warm", "m1", (0, 1, 2, 3))  # ... then m1 everywhere: m2 is the least recently used
    h(pool.load_model("m3", h.paths["m3"], "fp32"))  # the fourth model
    check_budget(pool)
    assert pool.residency_of("m2")["resident_on"] == []
    for name in ("m0", "m1", "m3"):
        assert pool.residency_of(name)["resident_on"] == [0, 1, 2, 3], name
    # a job for the evicted model loads it again where it runs (evicting m1 there, now the LRU one)
    again = h.run_job("again", "m2", (2, 3), seed=3)
    assert torch.equal(again, reference)
    assert float(reference.abs().mean()) > 0.1  # a real latent, not zeros
    assert pool.residency_of("m2")["resident_on"] == [2, 3]
    assert pool.residency_of("m1")["resident_on"] == [0, 1]
    check_budget(pool)
    # more loads: the pinned model never goes
    h(pool.load_model("m4", h.paths["m4"], "fp32"))
    h.run_job("m2-on-0", "m2", (0,), seed=1)
    assert pool.residency_of("m0")["resident_on"] == [0, 1, 2, 3]
    check_budget(pool)


def test_a_model_that_cannot_fit_fails_with_file_and_reason_and_others_keep_running(tight):
    h, pool = tight, tight.pool
    big = write_tiny_checkpoint("sd3", "diffusers", h.tmp / "big")  # 1.42 MB, fits alone ...
    pool.set_pinned("m3", True)  # ... but with m0 and m3 pinned and m4 pinned too, nothing can go
    pool.set_pinned("m4", True)
    try:
        before = {name: pool.residency_of(name)["resident_on"] for name in ("m0", "m3", "m4")}
        with pytest.raises(InsufficientMemory, match=r"big.*needs 1\.4 MiB on worker \d; budget .*pinned"):
            h(pool.load_model("big", str(big), "fp32", ranks=(0, 1, 2, 3)))
        assert {name: pool.residency_of(name)["resident_on"] for name in before} == before
        assert "big" not in pool.models()
        check_budget(pool)
        # a job of a resident model runs on as before
        h.run_job("still", "m0", (0, 1))
    finally:
        pool.set_pinned("m3", False)
        pool.set_pinned("m4", False)


def test_a_corrupt_file_fails_its_load_naming_file_and_reason(tight):
    h, pool = tight, tight.pool
    bad = h.tmp / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(InvalidRequest, match=r"corrupt\.safetensors.*(header|deserializ)"):
        h(pool.load_model("corrupt", str(bad), "fp32"))
    assert "corrupt" not in pool.models()
    h.run_job("fine", "m0", (2, 3))


def test_unload_frees_workers_and_the_model_comes_back_on_use(tight):
    h, pool = tight, tight.pool
    freed = h(pool.unload_model("m0"))
    assert freed == (0, 1, 2, 3) and pool.residency_of("m0")["resident_on"] == []
    check_budget(pool)
    h.run_job("back", "m0", (0, 1))
    assert pool.residency_of("m0")["resident_on"] == [0, 1]


def test_service_pins_configured_models_lists_residency_unloads_and_reports_failed_loads(tight):
    """Last on this pool: the service (CPU workers) closes it when it stops."""
    import aiohttp

    from comfy_tetriserve.client import TetriServeClient
    from comfy_tetriserve.service.app import create_app
    from factories import PowerLawCost
    from comfy_tetriserve.service.state import SERVICE
    from service_helpers import follow_events, job_body, make_config, running_service, submit_json

    h, pool = tight, tight.pool
    models = h.tmp / "models"
    write_tiny_checkpoint("flux", "comfy", models / "a.safetensors", seed=7)
    (models / "broken.safetensors").write_bytes(b"\xff" * 64)
    config = make_config(devices="cpu:4", model=(f"cfg={h.paths['m1']}",), model_dir=(str(models),), dtype="fp32")
    from comfy_tetriserve.core.live_placement import ExecutorPlacementEngine
    from comfy_tetriserve.policy import make_policy

    app = create_app(config, executor=pool, policy=make_policy("tetriserve"),
                     cost=PowerLawCost(base_s=0.01, degrees=(1, 2, 4)))
    engine = app[SERVICE].engine
    assert isinstance(engine, ExecutorPlacementEngine) and engine.places_models

    async def body():
        async with running_service(app) as url, TetriServeClient(url) as client, aiohttp.ClientSession() as s:
            listed = {m["name"]: m for m in await client.models()}
            assert listed["cfg"]["pinned"] is True  # given at start: pinned (no --evictable)
            assert listed["cfg"]["resident_on"] == [0, 1, 2, 3]
            assert listed["cfg"]["bytes_per_worker"] == TINY_BYTES and listed["cfg"]["loading_on"] == []
            await client.load_model("a.safetensors", "fp32")
            entry = await client.model("a.safetensors")
            assert entry["resident_on"] == [0, 1, 2, 3] and entry["pinned"] is False
            assert entry["last_used_at"] is not None
            board = await client.board()
            loads = [ld for ld in board["loads"] if ld["model"] == "a.safetensors"]
            assert loads and loads[-1]["gpu_ids"] == [0, 1, 2, 3] and loads[-1]["error"] is None
            assert loads[-1]["started_at"] <= loads[-1]["finished_at"] <= board["now_at"]
            out = await client.unload_model("a.safetensors")
            assert out["unloaded_from"] == [0, 1, 2, 3] and out["resident_on"] == [] and out["status"] == "loaded"
            check_budget(pool)
            # a job for the unloaded model: the planner plans a load (its devices busy meanwhile), then the job
            settings = {"model": "a.safetensors", "steps": 3}
            status, job = await submit_json(s, url, job_body(settings, ctx_dim=32, pooled_dim=16))
            assert status == 202, job
            events = await follow_events(s, url, job["job_id"])
            assert events[-1]["type"] == "finished", events[-1]
            planned = [r for r in engine.load_records if r.model == "a.safetensors"]
            assert planned and planned[0].finished_at is not None and planned[0].error is None
            placed = next(e for e in events if e["type"] == "placed")
            assert set(placed["gpu_ids"]) <= set(planned[0].gpu_ids)
            assert placed["at"] >= app[SERVICE].clock.to_wall(planned[0].finished_at) - 1e-6
            assert set((await client.model("a.safetensors"))["resident_on"]) >= set(placed["gpu_ids"])
            check_budget(pool)
            # a corrupt file: the load fails naming the file and the reason; only its jobs are refused
            with pytest.raises(Exception, match=r"broken\.safetensors.*(header|deserializ)"):
                await client.load_model("broken.safetensors", "fp32")
            status, err = await submit_json(s, url, job_body({"model": "broken.safetensors", "steps": 3},
                                                             ctx_dim=32, pooled_dim=16))
            assert status == 409 and "broken.safetensors" in err["error"]["message"], err
            status, job = await submit_json(s, url, job_body({"model": "cfg", "steps": 3}, ctx_dim=32, pooled_dim=16))
            assert status == 202, job
            assert (await follow_events(s, url, job["job_id"]))[-1]["type"] == "finished"
            # unload of a model that is not loaded: 409; of an unknown one: 404
            async with s.post(url + "/v1/models/unload", json={"model": "broken.safetensors"}) as resp:
                assert resp.status == 409
            async with s.post(url + "/v1/models/unload", json={"model": "nope.safetensors"}) as resp:
                assert resp.status == 404

    h(body())


def write_mid_checkpoint(path) -> str:
    """A 36M-parameter FLUX-shaped model (142 MB fp32) with constant weights: cheap to write, and
    loading it as bf16 makes each worker read and cast every tensor (about 1-3 s on this machine)."""
    cfg = dict(TINY_FLUX_CONFIG, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=8,
               axes_dims_rope=list(flux_rope_axes(64)))
    with torch.device("meta"):
        module = model_class(cfg)(**model_kwargs(cfg))
    sd = {k: torch.full(v.shape, 0.01) for k, v in module.state_dict().items()}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    save_file(sd, str(path / "diffusion_pytorch_model.safetensors"))
    return str(path)


def test_a_load_on_workers_0_1_adds_no_wait_to_jobs_on_2_3(tmp_path):
    h = Harness(WorkerPool("cpu:4", groups=[(0, 1), (2, 3)]))
    try:
        h(h.pool.start())
        pool = h.pool
        small = str(write_tiny_checkpoint("flux", "comfy", tmp_path / "small"))
        mid = write_mid_checkpoint(tmp_path / "mid")
        h(pool.load_model("small", small, "fp32", ranks=(2, 3)))

        async def job(rid: str) -> float:
            """Seconds from asking for 3 steps on workers 2-3 until they are done."""
            await pool.admit(make_job(rid, "small", steps=3))
            t0 = time.perf_counter()
            result = await pool.execute(Assignment((rid,), (2, 3), 3))
            assert result.error is None, result.error
            await pool.release(rid)
            return time.perf_counter() - t0

        alone = [h(job(f"alone{i}")) for i in range(3)]

        async def beside() -> tuple[float, list[float], float]:
            t0 = time.perf_counter()
            load = asyncio.ensure_future(pool.load_model("mid", mid, "bf16", ranks=(0, 1)))
            await asyncio.sleep(0.05)  # the load messages are on workers 0-1
            times = [await job(f"beside{i}") for i in range(3)]
            jobs_done = time.perf_counter() - t0
            await load
            return time.perf_counter() - t0, times, jobs_done

        load_s, times, jobs_done_s = h(beside())
        assert load_s > 0.8, load_s  # the load is long enough to matter
        assert jobs_done_s < 0.5 * load_s  # the jobs were done long before the load
        assert max(times) < max(alone) + 0.25 * load_s  # no queueing behind the load (CPU sharing aside)
        assert pool.residency_of("mid")["resident_on"] == [0, 1]
        assert pool.residency_of("small")["resident_on"] == [2, 3]
        print(f"load on 0-1 {load_s:.2f} s; jobs on 2-3 alone {[round(t, 3) for t in alone]} s, "
              f"beside the load {[round(t, 3) for t in times]} s")
    finally:
        h(h.pool.close())
        h.loop.close()
