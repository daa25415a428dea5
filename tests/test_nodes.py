"""The nodes' ComfyUI-free parts: conditioning, job progress, and one job's life against a real
service (simulated executor): progress, interrupt, cancelled callers, a model to reload, errors."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from comfy_tetriserve.client import TetriServeClient, encode_job
from comfy_tetriserve.errors import NotFound, ServiceUnavailable
from nodes_helpers import load_nodes_package
from service_helpers import FifoPolicy, free_port, make_service_app, running_service

nodes = load_nodes_package()
from tetriserve_nodes.conditioning import DEFAULT_FLUX_GUIDANCE, ConditioningError, job_conditioning  # noqa: E402
from tetriserve_nodes.jobs import JobProgress, deadline_setting, sample_remote  # noqa: E402
from tetriserve_nodes.service import (ClientPool, ModelHandle, autostart_args, load_on_service,  # noqa: E402
                                      model_name, reach_service)


def cond(tokens=7, dim=4096, pooled=768, **extras):
    g = torch.Generator().manual_seed(tokens * 1000 + dim)
    return [[torch.randn(1, tokens, dim, generator=g), {"pooled_output": torch.randn(1, pooled, generator=g), **extras}]]


# ----------------------------------------------------------------------------- conditioning
def test_flux_conditioning_takes_context_pooled_and_guidance():
    pos = cond(guidance=2.5)
    out = job_conditioning("flux", pos, None, 1.0, context_dim=4096, pooled_dim=768)
    assert out.guidance == 2.5 and set(out.tensors) == {"context", "pooled"}
    assert torch.equal(out.tensors["context"], pos[0][0])
    assert job_conditioning("flux", cond(), None, 1.0).guidance == DEFAULT_FLUX_GUIDANCE  # ComfyUI's default
    assert job_conditioning("flux", cond(), None, 1.0, guidance_embeds=False).guidance is None  # schnell


def test_sd3_cfg_takes_the_negative_and_never_aliases_it():
    pos = cond(dim=4096, pooled=2048)
    out = job_conditioning("sd3", pos, pos, 4.5)  # the same CONDITIONING on both inputs
    assert set(out.tensors) == {"context", "pooled", "neg_context", "neg_pooled"}
    assert torch.equal(out.tensors["neg_context"], out.tensors["context"])
    encode_job({"latent": torch.zeros(1, 16, 4, 4), **out.tensors}, {"model": "m"})  # no shared storage
    assert "neg_context" not in job_conditioning("sd3", pos, None, 1.0).tensors  # cfg 1 skips the negative


@pytest.mark.parametrize("positive,negative,cfg,message", [
    (cond() + cond(), None, 1.0, "2 entries"),
    (cond(area=(8, 8, 0, 0)), None, 1.0, "area"),
    (cond(control=object()), None, 1.0, "ControlNet"),
    (cond(start_percent=0.0, end_percent=0.1), None, 1.0, "timestep range"),
    (cond(strength=0.5), None, 1.0, "strength"),
    ([[torch.zeros(1, 3, 4096), {}]], None, 1.0, "no pooled_output"),
    (cond(dim=2048), None, 1.0, "width 2048"),
    (cond(), None, 3.0, "needs a negative"),
    (cond(guidance=3.5), cond(guidance=2.0), 2.0, "guidance differ"),
    ("not a conditioning", None, 1.0, "not a CONDITIONING"),
])
def test_conditioning_the_service_cannot_reproduce_is_refused(positive, negative, cfg, message):
    with pytest.raises(ConditioningError, match=message):
        job_conditioning("flux", positive, negative, cfg, context_dim=4096, pooled_dim=768)


# ----------------------------------------------------------------------------- progress
def test_progress_follows_events_and_never_goes_back():
    p = JobProgress(job_id="j", phase="queued", num_steps=8, submitted_at=100.0, deadline_at=110.0,
                    predicted_finish_at=104.0, feasible=True)
    assert p.text(now=101.0) == "queued · step 0/8 · finish in 3.0 s · deadline in 9.0 s"
    p = p.with_event({"type": "placed", "gpu_ids": [2, 3], "steps_done": 0})
    p = p.with_event({"type": "step", "step": 6, "num_steps": 8})
    assert p.with_event({"type": "placed", "gpu_ids": [2, 3], "steps_done": 4}).steps_done == 6  # stream lag
    assert p.text(now=102.0) == "on 2 GPUs (2,3) · step 6/8 · finish in 2.0 s · deadline in 8.0 s"
    w = p.with_event({"type": "waiting", "steps_done": 6})
    assert w.text(now=102.0).startswith("waiting for GPUs · step 6/8") and w.gpu_ids == ()
    late = JobProgress("j", "queued", feasible=False, deadline_at=105.0, predicted_finish_at=107.0)
    assert "deadline in 4.0 s (predicted late)" in late.text(now=101.0)
    done = p.with_event({"type": "finished", "ended_at": 112.5, "steps_done": 8, "met_deadline": False})
    assert done.text() == "done in 12.5 s · 2.5 s late"
    assert JobProgress("j", "cancelled", simulated=True).text() == "cancelled (simulated)"
    assert deadline_setting(0.0) is None and deadline_setting(12.5) == 12.5


# ----------------------------------------------------------------------------- service helpers
def test_model_names_handles_and_autostart_arguments():
    assert model_name("flux/flux1-dev.safetensors") == "flux/flux1-dev.safetensors"
    entry = {"name": "m.safetensors", "family": "flux", "guidance_embeds": False, "num_heads": 24,
             "in_channels": 64, "context_dim": 4096, "pooled_dim": 768}
    assert ModelHandle.from_entry("u", entry, None, None).effective_shift == 1.0  # FLUX-schnell
    assert ModelHandle.from_entry("u", dict(entry, guidance_embeds=True), None, None).effective_shift == 1.15
    assert ModelHandle.from_entry("u", dict(entry, family="sd3"), "fp16", 2.0).effective_shift == 2.0
    assert autostart_args(["/m"], 8, False) == ["--devices", "cuda:0-7", "--model-dir", "/m"]
    assert autostart_args([], 0, False) == ["--devices", "cpu:1"]
    assert autostart_args(["/m"], 1, True) is None  # serve.json decides
    # an auto-started service also gets ComfyUI's loras folders
    assert autostart_args(["/m"], 0, False, lora_dirs=["/l1", "/l2"]) == [
        "--devices", "cpu:1", "--model-dir", "/m", "--lora-dir", "/l1", "/l2"]
    # the TetriServe LoRA node's stack: appended in order, strength 0 adds nothing, sent as the loras setting
    handle = ModelHandle.from_entry("u", entry, None, None)
    stacked = handle.with_lora("a.safetensors", 0.8).with_lora("sub/b.safetensors", -0.4).with_lora("c", 0.0)
    assert handle.loras == () and stacked.loras == (("a.safetensors", 0.8), ("sub/b.safetensors", -0.4))
    assert stacked.lora_setting() == [{"name": "a.safetensors", "strength": 0.8},
                                      {"name": "sub/b.safetensors", "strength": -0.4}]


def test_client_pool_gives_one_client_per_loop():
    pool = ClientPool(retries=0)

    async def get():
        return pool.get("http://x"), pool.get("http://x")

    a1, a2 = asyncio.run(get())
    b1, _ = asyncio.run(get())
    assert a1 is a2 and a1 is not b1 and a1.retries == 0


def test_a_service_that_is_down_gives_a_clear_error(monkeypatch):
    monkeypatch.delenv("TETRISERVE_AUTOSTART", raising=False)
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnavailable, match="no scheduler service answers at .*TETRISERVE_AUTOSTART=1"):
        asyncio.run(reach_service(url))


# ----------------------------------------------------------------------------- one job at the service
def job_tensors(steps: int = 12, res: int = 128):
    g = torch.Generator().manual_seed(1)
    return {"latent": torch.randn(1, 16, res // 8, res // 8, generator=g), "noise": torch.randn(1, 16, res // 8, res // 8),
            "sigmas": torch.linspace(1.0, 0.0, steps + 1), "context": torch.randn(1, 8, 4096),
            "pooled": torch.randn(1, 768)}


SETTINGS = {"model": "flux-sim", "steps": 12, "latent_space": "model", "result_space": "model", "deadline_s": 30.0}


async def ended_jobs(client, tenant: str, timeout_s: float = 10.0) -> list[dict]:
    """The tenant's jobs once all ended (a running job ends at its next step boundary)."""
    for _ in range(int(timeout_s / 0.05)):
        jobs = await client.jobs(tenant=tenant)
        if all(j["status"] in ("finished", "failed", "cancelled") for j in jobs):
            return jobs
        await asyncio.sleep(0.05)
    return jobs


def run_service(body, *, time_scale=1.0, **config):
    async def main():
        app, _ = make_service_app(num_gpus=2, policy=FifoPolicy(sp_degree=2, round_steps=3), time_scale=time_scale,
                                  **config)
        async with running_service(app) as url, TetriServeClient(url) as client:
            return await body(url, client)

    return asyncio.run(main())


def test_a_job_reports_progress_and_returns_its_latent():
    tensors = job_tensors()

    async def body(url, client):
        seen = []
        result = await sample_remote(client, tensors, SETTINGS, tenant="artist", on_progress=seen.append)
        return seen, result, await client.status(result.progress.job_id)

    seen, result, status = run_service(body)
    assert torch.equal(result.latent, tensors["latent"])  # the simulated executor returns its input
    phases = [p.phase for p in seen]
    assert phases[0] == "queued" and phases[-1] == "finished" and "running" in phases
    assert [p.steps_done for p in seen] == sorted(p.steps_done for p in seen) and seen[-1].steps_done == 12
    assert any(p.gpu_ids == (0, 1) for p in seen)
    assert status["status"] == "finished" and status["tenant"] == "artist" and status["lease"]
    assert result.progress.text().startswith("done in")


@pytest.mark.parametrize("how", ["interrupt", "progress_hook", "caller_cancelled"])
def test_a_job_left_early_is_cancelled_at_the_service(how):
    class Interrupted(Exception):
        pass

    async def body(url, client):
        started = asyncio.Event()
        flag = {"on": False}

        def on_progress(p):
            if p.steps_done >= 1:
                started.set()
                if how == "progress_hook":
                    raise Interrupted()  # ComfyUI's ProgressBar raises on an interrupt

        def check_interrupt():
            if flag["on"]:
                raise Interrupted()

        task = asyncio.ensure_future(sample_remote(client, job_tensors(400, res=512), dict(SETTINGS, steps=400), tenant="t",
                                                   on_progress=on_progress, check_interrupt=check_interrupt))
        await asyncio.wait_for(started.wait(), 20)
        if how == "interrupt":
            flag["on"] = True
        elif how == "caller_cancelled":
            task.cancel()  # a failing sibling node: ComfyUI cancels the pending node
        with pytest.raises((Interrupted, asyncio.CancelledError)):
            await task
        return await ended_jobs(client, "t")

    (job,) = run_service(body, time_scale=20.0)
    assert job["status"] == "cancelled" and job["steps_done"] < 400, job


def test_the_job_io_can_run_on_another_loop():
    """As inside ComfyUI: the I/O on the server's loop (another thread), the node on the prompt's."""
    io_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=io_loop.run_forever, daemon=True)
    thread.start()
    try:
        async def body(url, client):
            remote = TetriServeClient(url)  # used only on the I/O loop
            seen = []
            result = await sample_remote(remote, job_tensors(), SETTINGS, tenant="x", on_progress=seen.append,
                                         io_loop=io_loop)
            task = asyncio.ensure_future(sample_remote(remote, job_tensors(400, res=512), dict(SETTINGS, steps=400), tenant="y",
                                                       io_loop=io_loop))
            await asyncio.sleep(1.0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return seen, result, await ended_jobs(client, "y")

        seen, result, (cancelled,) = run_service(body, time_scale=20.0)
        assert seen[-1].phase == "finished" and result.status["status"] == "finished"
        assert cancelled["status"] == "cancelled"
    finally:
        io_loop.call_soon_threadsafe(io_loop.stop)
        thread.join(5)


def test_a_model_the_service_lost_is_loaded_again(tmp_path):
    (tmp_path / "flux-file.safetensors").write_bytes(b"sim")
    tensors = job_tensors()

    async def body(url, client):
        reloads = []

        async def reload_model():
            reloads.append(1)
            await client.load_model("flux-file.safetensors")

        result = await sample_remote(client, tensors, dict(SETTINGS, model="flux-file.safetensors"), tenant="t",
                                     reload_model=reload_model)
        with pytest.raises(NotFound, match="no model file 'nope.safetensors'.*--model-dir"):
            await load_on_service(client, "nope.safetensors", None, comfy_folder="/comfy/models/diffusion_models")
        handle = await load_on_service(client, "flux-file.safetensors", "bf16", shift=0.9)
        return reloads, result, handle

    reloads, result, handle = run_service(body, model=(), model_dir=(str(tmp_path),))
    assert reloads == [1] and result.status["status"] == "finished"
    assert handle.family == "flux" and handle.model == "flux-file.safetensors" and handle.effective_shift == 0.9


def test_a_job_the_service_lost_in_a_restart_is_submitted_again():
    """The service is replaced under a running job (a new run on the same port): the node resubmits once."""
    async def main():
        port = free_port()
        first, _ = make_service_app(num_gpus=2, policy=FifoPolicy(round_steps=4), time_scale=20.0)
        second, _ = make_service_app(num_gpus=2, policy=FifoPolicy(round_steps=4))
        seen = []
        async with TetriServeClient(f"http://127.0.0.1:{port}", backoff_s=0.05, retries=40) as client:
            async with running_service(first, port=port):  # a graceful stop under the job
                task = asyncio.ensure_future(sample_remote(client, job_tensors(400, res=512), dict(SETTINGS, steps=400),
                                                           tenant="t", on_progress=seen.append))
                while not any(p.steps_done >= 1 for p in seen):
                    await asyncio.sleep(0.01)
            assert not task.done()
            async with running_service(second, port=port):
                result = await asyncio.wait_for(task, 30)
                jobs = await client.jobs(tenant="t")
        return seen, result, jobs

    seen, result, jobs = asyncio.run(main())
    assert result.status["status"] == "finished" and result.status["steps_done"] == 400
    assert [j["status"] for j in jobs] == ["finished"]  # the second run knows only the resubmitted job
    assert result.progress.job_id == jobs[0]["job_id"]


def test_only_the_comfy_glue_imports_comfyui():
    """ComfyUI's modules are imported by nodes/comfy_nodes.py alone (and the test-only node pack)."""
    import re

    from nodes_helpers import ROOT

    pattern = re.compile(r"^\s*(import|from)\s+(comfy|comfy_api|comfy_execution|folder_paths|server|nodes)(\.|\s)",
                         re.M)
    offenders = [str(p.relative_to(ROOT)) for folder in ("comfy_tetriserve", "nodes") for p in (ROOT / folder).rglob("*.py")
                 if p.name != "comfy_nodes.py" and pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
    assert pattern.search((ROOT / "nodes" / "comfy_nodes.py").read_text(encoding="utf-8"))


def test_qwen_image_and_wan_conditioning_need_no_pooled_vector_and_refuse_clip_vision():
    from tetriserve_nodes.service import FAMILY_DEFAULT_SHIFT

    pos, neg = cond(tokens=9, dim=4096, pooled=1), cond(tokens=5, dim=4096, pooled=1)
    for family in ("qwen_image", "wan"):
        pos[0][1].pop("pooled_output", None)
        job = job_conditioning(family, pos, neg, 5.0, context_dim=4096, pooled_dim=0)
        assert job.guidance is None
        assert job.tensors["pooled"].shape == (1, 0) and job.tensors["neg_pooled"].shape == (1, 0)
        assert job.tensors["context"].shape == (1, 9, 4096) and job.tensors["neg_context"].shape == (1, 5, 4096)
    with pytest.raises(ConditioningError, match="CLIP-vision"):
        job_conditioning("wan", cond(clip_vision_output=object()), neg, 5.0)
    with pytest.raises(ConditioningError, match="image-to-video"):
        job_conditioning("wan", cond(concat_latent_image=torch.zeros(1, 16, 2, 4, 4),
                                     concat_mask=torch.ones(1, 1, 2, 4, 4)), neg, 5.0)
    assert FAMILY_DEFAULT_SHIFT["wan"] == 8.0 and FAMILY_DEFAULT_SHIFT["qwen_image"] == 1.15
