"""The service on real CPU workers: the API, the round loop and the worker pool joined.

One service (four gloo CPU workers, tiny FLUX and SD3 checkpoints loaded by file name from a
model folder) serves the whole module: starting the pool costs ~20 s on 2 busy cores. Each
result is compared with the same job sampled directly on one device in this process (the model
loaded through the same loader, the sampler stepped by hand): fp32, rel err <= 1e-5.

The test that kills a worker runs last (the pool is rebuilt under it).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import aiohttp
import pytest
import torch
from safetensors.torch import save

from comfy_tetriserve.client import JobCancelled, TetriServeClient, decode_result, encode_job
from comfy_tetriserve.worker import samplers
from comfy_tetriserve.worker.models import load_transformer
from comfy_tetriserve.worker.tiny import write_tiny_checkpoint
from comfy_tetriserve.worker.pool import WorkerPool
from comfy_tetriserve.service.app import create_app
from comfy_tetriserve.service.schemas import parse_settings, resolve_job
from comfy_tetriserve.service.state import SERVICE
from comfy_tetriserve.types import Assignment, RoundPlan
from factories import PowerLawCost
from service_helpers import free_port, make_config

pytestmark = pytest.mark.slow

FLUX_FILE = "flux/tiny-flux.safetensors"  # BFL layout with ComfyUI's prefix, in a subfolder
SD3_FILE = "tiny-sd3.safetensors"  # SD3 single-file layout
CONFIGURED = "flux-configured"  # the same FLUX file, configured by name (loaded at start)
TOL = 1e-5


@dataclass
class RotatingPolicy:
    """Jobs change devices and degree between rounds, which is what the pool must get exactly right.

    Every third round is wide: it waits until all devices are free and gives the first waiting
    job all of them. Other rounds give each waiting job a free group of 1 or 2 devices
    (alternating by position). ``round_steps`` steps at a time (all remaining steps when None).
    """

    round_steps: int | None = 2
    wide_only: bool = False  # every round wide
    name: str = "test-rotating"

    def plan_round(self, view, cost):
        steps = lambda snap: snap.steps_left if self.round_steps is None else min(self.round_steps, snap.steps_left)  # noqa: E731
        if self.wide_only or view.round_index % 3 == 2:
            if view.busy_gpu_ids:
                return RoundPlan(view.round_index, 0.0, ())
            snap = view.plannable[0]
            return RoundPlan(view.round_index, 0.0, (Assignment((snap.request_id,), tuple(view.gpu_ids), steps(snap)),))
        used: set[int] = set()
        out = []
        for i, snap in enumerate(view.plannable):
            degrees = (1, 2) if (view.round_index + i) % 2 == 0 else (2, 1)
            group = next((g for k in degrees for g in view.free_groups(k) if used.isdisjoint(g)), None)
            if group is None:
                continue
            used.update(group)
            out.append(Assignment((snap.request_id,), group, steps(snap)))
        return RoundPlan(view.round_index, 0.0, tuple(out))


@dataclass(frozen=True)
class RecordingCost(PowerLawCost):
    """PowerLawCost that keeps every measured step time the service hands to ``observe``."""

    observed: list = field(default_factory=list, compare=False, hash=False)

    def observe(self, model, height, width, batch, sp_degree, measured_step_s) -> None:
        self.observed.append((model, height, width, batch, sp_degree, measured_step_s))


class Harness:
    """The service on a private event loop that runs while a test awaits something on it."""

    def __init__(self, tmp) -> None:
        self.loop = asyncio.new_event_loop()
        self.tmp = tmp
        self.policy = RotatingPolicy()
        models = tmp / "models"
        self.paths = {
            "flux": write_tiny_checkpoint("flux", "comfy", models / FLUX_FILE, seed=1),
            "sd3": write_tiny_checkpoint("sd3", "sd3_single", models / SD3_FILE, seed=2),
        }
        self.config = make_config(devices="cpu:4", model=(f"{CONFIGURED}={self.paths['flux']}",),
                                  model_dir=(str(models),), dtype="fp32",
                                  lease_s=10.0, shutdown_grace_s=5.0)
        self.cost = RecordingCost(base_s=0.05, degrees=(1, 2, 4))
        self.app = create_app(self.config, policy=self.policy, cost=self.cost)
        self.svc = self.app[SERVICE]
        self.url = ""
        self.runner = None
        self.refs = {family: load_transformer(str(p), dtype="fp32") for family, p in self.paths.items()}
        self.loop_thread: int | None = None

    def __call__(self, coro):
        return self.loop.run_until_complete(coro)

    async def start(self) -> None:
        from aiohttp import web

        self.loop_thread = threading.get_ident()
        self.runner = web.AppRunner(self.app, shutdown_timeout=5.0)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        async with TetriServeClient(self.url) as client:  # by file name, as a ComfyUI loader lists them
            for name in (FLUX_FILE, SD3_FILE):
                await client.load_model(name, "fp32", timeout_s=300)
            await self.svc.catalog.wait_loaded(CONFIGURED)  # configured: loading began with the service

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("svc-workers"))
    harness(harness.start())
    yield harness
    harness(harness.stop())
    harness.loop.close()


# ------------------------------------------------------------------ reference
def job_tensors(family: str, seed: int, res: int = 128, tokens: int = 7, cfg: bool = False) -> dict:
    g = torch.Generator().manual_seed(1000 + seed)
    out = {"latent": torch.zeros(1, 16, res // 8, res // 8), "context": torch.randn(1, tokens, 32, generator=g),
           "pooled": torch.randn(1, 16, generator=g)}
    if cfg:
        out["neg_context"] = torch.randn(1, tokens - 2, 32, generator=g)
        out["neg_pooled"] = torch.randn(1, 16, generator=g)
    return out


def direct_run(h: Harness, family: str, tensors: dict, settings: dict) -> torch.Tensor:
    """The job sampled on one device in this process; the latent in the space the service returns."""
    model = h.refs[family]
    info = model.info()
    job = resolve_job("ref", parse_settings(settings, h.config), tensors, info)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        sigma = sigma.reshape(-1).expand(b) if sigma.numel() == 1 else sigma.reshape(-1)
        g = torch.full((b,), job.guidance) if info.guidance_embeds else None
        den = []
        for ctx, pooled in ((job.context, job.pooled), (job.neg_context, job.neg_pooled))[:2 if job.uses_cfg else 1]:
            out, _ = model.forward(x, sigma, ctx.expand(b, -1, -1), pooled.expand(b, -1), g)
            den.append(x - out * sigma.view(-1, 1, 1, 1))
        return samplers.cfg_combine(den[0], den[1], job.cfg) if job.uses_cfg else den[0]

    traj = samplers.start_trajectory(job.latent, job.noise, job.sigmas, job.sampler, job.seed)
    while not traj.done:
        traj = samplers.step(traj, denoise)
    latent = samplers.finish_latent(traj)
    space = settings.get("result_space") or settings.get("latent_space", "vae")
    return samplers.process_latent_out(family, latent) if space == "vae" else latent


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def model_name(family: str) -> str:
    return FLUX_FILE if family == "flux" else SD3_FILE


# ---------------------------------------------------------------------- tests
def test_models_load_by_name_on_every_worker_with_progress(h):
    async def body():
        async with TetriServeClient(h.url) as client:
            listed = {m["name"]: m for m in await client.models()}
            assert {FLUX_FILE, SD3_FILE} <= set(listed)
            for family in ("flux", "sd3"):
                entry = listed[model_name(family)]
                assert entry["status"] == "loaded" and entry["family"] == family
                # the model's own numbers, which drive validation
                dims = (entry["context_dim"], entry["pooled_dim"], entry["in_channels"], entry["num_heads"])
                assert dims == (32, 16, 16, 4)
                assert entry["guidance_embeds"] is (family == "flux")

    h(body())
    assert isinstance(h.svc.executor, WorkerPool) and h.svc.executor.devices == ["cpu"] * 4
    events = h.svc.hub.after(0)
    for name in (FLUX_FILE, SD3_FILE):
        progress = [(e["workers_loaded"], e["num_workers"]) for e in events
                    if e["type"] == "model_loading" and e["model"] == name]
        assert progress[0] == (0, 4) and sorted(progress[1:]) == [(1, 4), (2, 4), (3, 4), (4, 4)], progress
        assert [e["type"] for e in events if e.get("model") == name][-1] == "model_loaded"
    assert set(h.svc.executor.models()) == {FLUX_FILE, SD3_FILE, CONFIGURED}
    assert h.svc.cost.allowed_degrees(FLUX_FILE) == (1, 2, 4)  # 4 heads: 1, 2 and 4 of the cost model's 1, 2, 4


def test_a_model_configured_by_name_is_loaded_at_start_and_serves(h):
    async def body():
        async with TetriServeClient(h.url) as client:
            entry = await client.model(CONFIGURED)
            assert entry["status"] == "loaded" and entry["origin"] == "configured" and entry["family"] == "flux"
            settings = {"model": CONFIGURED, "steps": 4, "seed": 11, "deadline_s": 30}
            tensors = job_tensors("flux", 11)
            out, meta = await client.generate(tensors, settings)
            assert meta["model"] == CONFIGURED
            assert rel(out["latent"], direct_run(h, "flux", tensors, settings)) <= TOL

    h(body())


def test_twenty_jobs_from_three_concurrent_clients_equal_the_direct_run(h):
    """Jobs move between 1, 2 and 4 workers every 2 steps; each result equals the single-device run."""
    h.policy.round_steps = 2
    specs = []
    for i in range(20):
        family = "flux" if i % 2 == 0 else "sd3"
        settings = {"model": model_name(family), "steps": 3 + i % 4, "seed": i,
                    "deadline_s": None if i % 5 == 0 else 60.0}
        cfg = family == "sd3" and i % 3 == 0
        if cfg:
            settings.update(cfg=3.5, sampler="dpmpp_2m")
        if family == "flux" and i % 4 == 2:
            settings.update(sampler="euler_ancestral", guidance=1.5)
        if i % 3 == 1:
            settings["result_space"] = "model"
        specs.append((family, job_tensors(family, i, res=(128, 160, 96)[i % 3], cfg=cfg), settings))

    fetched: list[tuple[torch.device, torch.dtype]] = []
    step_threads: set[int] = set()
    pool = h.svc.executor
    original_fetch, original_execute = pool.fetch_result, pool.execute

    async def spy_fetch(rid):
        out = await original_fetch(rid)
        fetched.append((out.device, out.dtype))
        return out

    async def spy_execute(a, on_step=None):
        def wrapped(rid, index, seconds):
            step_threads.add(threading.get_ident())
            on_step(rid, index, seconds)
        return await original_execute(a, wrapped if on_step else None)

    pool.fetch_result, pool.execute = spy_fetch, spy_execute

    async def client_run(tenant: str, items):
        async with TetriServeClient(h.url) as client, client.lease(tenant=tenant) as lease:
            async def one(spec):
                family, tensors, settings = spec
                seen = []
                out, meta = await client.generate(tensors, {**settings, "lease": lease}, on_event=seen.append)
                return spec, out["latent"], meta, seen
            return await asyncio.gather(*(one(s) for s in items))

    async def all_clients():
        return await asyncio.wait_for(asyncio.gather(
            client_run("alice", specs[0:7]), client_run("bob", specs[7:14]), client_run("carol", specs[14:20])), 240)

    try:
        results = h(all_clients())
    finally:
        pool.fetch_result, pool.execute = original_fetch, original_execute
    flat = [r for group in results for r in group]
    assert len(flat) == 20
    degrees = set()
    for (family, tensors, settings), latent, meta, seen in flat:
        assert meta["simulated"] == "false"
        assert meta["space"] == settings.get("result_space", "vae")
        ref = direct_run(h, family, tensors, settings)
        assert latent.shape == tensors["latent"].shape and latent.dtype == torch.float32
        assert rel(latent, ref) <= TOL, (settings, rel(latent, ref))
        kinds = [e["type"] for e in seen]
        assert kinds[0] == "queued" and kinds[-1] == "finished", kinds
        assert [e["step"] for e in seen if e["type"] == "step"][-1] == settings["steps"]
        degrees |= {e["sp_degree"] for e in seen if e["type"] == "placed"}
    assert degrees == {1, 2, 4}
    # the executor hands back CPU float32 latents; progress arrives on the event loop's thread
    assert len(fetched) == 20 and set(fetched) == {(torch.device("cpu"), torch.float32)}
    assert step_threads == {h.loop_thread}
    svc = h.svc
    assert not svc.engine.busy_gpu_ids and not svc.store.open_jobs()
    # measured step times reached the cost model and the drift metrics, per model and degree
    observed = {(m, k) for m, _, _, _, k, _ in h.cost.observed}
    assert {(FLUX_FILE, 1), (FLUX_FILE, 2), (SD3_FILE, 4)} <= observed, observed
    assert all(0 < t < 5 for *_, t in h.cost.observed)
    assert (SD3_FILE, 2) in svc.metrics.drift and svc.metrics.drift[(SD3_FILE, 2)].count > 0


def test_guidance_reaches_flux_and_is_ignored_by_sd3(h):
    async def body():
        async with TetriServeClient(h.url) as client:
            outs = {}
            for family, guidance in (("flux", None), ("flux", 1.0), ("sd3", None), ("sd3", 7.0)):
                settings = {"model": model_name(family), "steps": 3, "seed": 5, "result_space": "model"}
                if guidance is not None:
                    settings["guidance"] = guidance
                tensors = job_tensors(family, 5)
                out, _ = await client.generate(tensors, settings)
                assert rel(out["latent"], direct_run(h, family, tensors, settings)) <= TOL
                outs[family, guidance] = out["latent"]
        assert rel(outs["flux", 1.0], outs["flux", None]) > 1e-3  # FLUX-dev's guidance embedding
        assert rel(outs["sd3", 7.0], outs["sd3", None]) <= TOL  # SD3 has none: the setting is ignored

    h(body())


def test_bad_input_gets_its_4xx_from_the_model_and_the_next_good_job_succeeds(h):
    flux = model_name("flux")
    good = job_tensors("flux", 1)

    def body_of(tensors: dict, settings: dict | None = None) -> bytes:
        return save(tensors, metadata={"tetriserve": json.dumps({"model": flux, "steps": 3, **(settings or {})})})

    cases = [
        ("context of a full-size FLUX", body_of({**good, "context": torch.randn(1, 7, 4096)}), "32"),
        ("pooled of SD3", body_of({**good, "pooled": torch.randn(1, 2048)}), "16"),
        ("latent with 4 channels", body_of({**good, "latent": torch.zeros(1, 4, 16, 16)}), "channels"),
        ("NaN latent", body_of({**good, "latent": torch.full((1, 16, 16, 16), math.nan)}), "NaN"),
        ("unknown model", body_of(good, {"model": "tiny-sdxl.safetensors"}), "unknown model"),
        ("traversal", body_of(good, {"model": "../models/" + SD3_FILE}), ".."),
        ("cfg without negative", body_of(good, {"cfg": 4.0}), "neg_context"),
        ("zero steps", body_of(good, {"steps": 0}), "steps"),
        ("absurd deadline", body_of(good, {"deadline_s": 1e9}), "deadline"),
    ]

    async def body():
        async with aiohttp.ClientSession() as s:
            for name, data, word in cases:
                async with s.post(h.url + "/v1/jobs", data=data) as resp:
                    err = (await resp.json())["error"]
                    assert 400 <= resp.status < 500 and word.lower() in err["message"].lower(), (name, err)
        async with TetriServeClient(h.url) as client:
            settings = {"model": flux, "steps": 3, "seed": 1}
            out, _ = await client.generate(good, settings)
            assert rel(out["latent"], direct_run(h, "flux", good, settings)) <= TOL

    h(body())


def _busy_free_within(h: Harness, job_id: str, timeout_s: float):
    async def wait():
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if not h.svc.engine.busy_gpu_ids and h.svc.store.jobs[job_id].status.is_terminal:
                return time.monotonic() - t0
            await asyncio.sleep(0.005)
        return None
    return wait()


def test_cancel_mid_job_frees_the_devices_at_the_next_step(h):
    """A job holding 2 workers for all its 400 steps is cancelled; the workers are free a step later."""
    h.policy.round_steps = None
    try:
        async def body():
            async with TetriServeClient(h.url) as client:
                tensors = job_tensors("sd3", 9, res=256)
                job = await client.submit(encode_job(tensors, {"model": model_name("sd3"), "steps": 400}))
                steps: list[dict] = []
                waiter = asyncio.ensure_future(client.wait(job["job_id"], on_event=steps.append))
                while sum(e["type"] == "step" for e in steps) < 3:
                    await asyncio.sleep(0.005)
                step_s = max(e["step_s"] for e in steps if e["type"] == "step")
                t0 = time.monotonic()
                await client.cancel(job["job_id"])
                freed_s = await _busy_free_within(h, job["job_id"], 30.0)
                with pytest.raises(JobCancelled, match="cancelled by client"):
                    await waiter
                status = await client.status(job["job_id"])
                return freed_s, step_s, status, time.monotonic() - t0

        freed_s, step_s, status, _ = h(body())
        assert freed_s is not None, "devices not freed"
        assert freed_s < 10 * step_s + 0.5, (freed_s, step_s)
        assert status["status"] == "cancelled" and 3 <= status["steps_done"] < 400
    finally:
        h.policy.round_steps = 2


def test_lease_expiry_cancels_and_frees_the_devices(h):
    h.policy.round_steps = None
    try:
        async def body():
            async with TetriServeClient(h.url) as client:
                lease = await client.create_lease(tenant="ghost", ttl_s=0.5)  # never renewed
                job = await client.submit(encode_job(job_tensors("flux", 3, res=256),
                                                     {"model": model_name("flux"), "steps": 400,
                                                      "lease": lease["lease"]}))
                with pytest.raises(JobCancelled, match="lease expired"):
                    await client.wait(job["job_id"], timeout_s=60)
                freed = await _busy_free_within(h, job["job_id"], 10.0)
                return (await client.status(job["job_id"])), freed

        status, freed = h(body())
        assert freed is not None and status["cancel_reason"] == "lease expired" and status["steps_done"] < 400
    finally:
        h.policy.round_steps = 2


def test_a_dead_worker_is_replaced_and_its_job_resumes_from_its_last_round_exactly(h):
    """Runs last: kills a worker while a job runs on all four workers (rounds of 4 steps) and another waits.

    The wide-only policy cannot place anything on the three survivors, so the pool is rebuilt at
    once; the killed job resumes from its last completed round and ends equal to the direct run.
    """
    h.policy.round_steps = 4
    h.policy.wide_only = True
    flux, sd3 = model_name("flux"), model_name("sd3")
    settings = {"model": flux, "steps": 40, "seed": 4}
    tensors = job_tensors("flux", 4)
    waiting_settings = {"model": sd3, "steps": 3, "seed": 4}

    async def body():
        async with TetriServeClient(h.url) as client:
            running = await client.submit(encode_job(tensors, settings))
            events: list[dict] = []
            running_wait = asyncio.ensure_future(client.wait(running["job_id"], on_event=events.append))
            while not any(e["type"] == "step" and e["step"] >= 9 for e in events):
                await asyncio.sleep(0.002)
            waiting = await client.submit(encode_job(job_tensors("sd3", 4), waiting_settings))
            before = (await client.executor())["workers"]
            os.kill(before[2]["pid"], signal.SIGKILL)
            t0 = time.monotonic()
            while h.svc.engine.healthy_gpu_ids == (0, 1, 2, 3) and time.monotonic() - t0 < 5:
                await asyncio.sleep(0.001)
            noticed_s = time.monotonic() - t0
            final = await asyncio.wait_for(running_wait, 120)
            await client.wait(waiting["job_id"], timeout_s=60)
            out = [decode_result(await client.result(j["job_id"]))[0]["latent"] for j in (running, waiting)]
            after = await client.executor()
            return events, final, out, before, after, noticed_s

    try:
        events, final, (latent, waiting_latent), before, after, noticed_s = h(body())
    finally:
        h.policy.wide_only = False
        h.policy.round_steps = 2
    assert noticed_s < 1.0, noticed_s  # marked unhealthy within the round, not after it
    requeued = [e for e in events if e["type"] == "requeued"]
    assert len(requeued) == 1 and "worker 2 (cpu) died (killed by SIGKILL)" in requeued[0]["reason"]
    assert requeued[0]["steps_done"] % 4 == 0 and requeued[0]["steps_done"] >= 8  # its last completed round
    assert final["status"] == "finished" and final["num_faults"] == 1
    assert rel(latent, direct_run(h, "flux", tensors, settings)) <= TOL
    assert rel(waiting_latent, direct_run(h, "sd3", job_tensors("sd3", 4), waiting_settings)) <= TOL
    assert after["state"] == "ok" and after["num_restarts"] == 1 and after["healthy_gpu_ids"] == [0, 1, 2, 3]
    assert all(w["alive"] for w in after["workers"]) and after["workers"][2]["pid"] != before[2]["pid"]
    assert not h.svc.store.open_jobs() and not h.svc.engine.busy_gpu_ids
