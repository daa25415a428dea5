"""LoRA stacks and quantised weights through the real service on two CPU workers (degree 2).

Jobs name LoRA files in the service's --lora-dir; each result is compared with the same job
sampled on one device in this process with the stack applied (fp32, rel err <= 1e-5), and the
LoRAs change the result by far more than that.
"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from comfy_tetriserve.client import TetriServeClient, decode_result, encode_job
from comfy_tetriserve.errors import InvalidRequest, NotFound
from comfy_tetriserve.service.app import create_app
from comfy_tetriserve.service.state import SERVICE
from comfy_tetriserve.worker.lora import LoraCache, applied
from comfy_tetriserve.worker.lora_files import write_random_lora
from comfy_tetriserve.worker.models import load_transformer
from comfy_tetriserve.worker.tiny import tiny_state_dict, write_tiny_checkpoint
from factories import PowerLawCost
from service_helpers import free_port, make_config
from test_service_workers import RotatingPolicy, direct_run, job_tensors, rel

pytestmark = pytest.mark.slow

FLUX, SD3 = "tiny-flux.safetensors", "tiny-sd3.safetensors"


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-svc")
    models, loras = tmp / "models", tmp / "loras"
    flux_path = write_tiny_checkpoint("flux", "comfy", models / FLUX, seed=1)
    write_tiny_checkpoint("sd3", "sd3_single", models / SD3, seed=2)
    _, flux_sd = tiny_state_dict("flux", seed=1)
    _, sd3_sd = tiny_state_dict("sd3", seed=2)
    files = {"a": write_random_lora("flux", flux_sd, "kohya", loras / "style-a.safetensors", seed=1),
             "b": write_random_lora("flux", flux_sd, "peft", loras / "sub" / "style-b.safetensors", seed=2, rank=8),
             "c": write_random_lora("flux", flux_sd, "diff", loras / "style-c.safetensors", seed=3),
             "sd3": write_random_lora("sd3", sd3_sd, "bfl", loras / "sd3-style.safetensors", seed=4)}
    config = make_config(devices="cpu:2", model_dir=(str(models),), lora_dir=(str(loras),), dtype="fp32",
                         shutdown_grace_s=5.0)
    loop = asyncio.new_event_loop()
    app = create_app(config, policy=RotatingPolicy(round_steps=None, wide_only=True),
                     cost=PowerLawCost(base_s=0.05, degrees=(1, 2)))
    state = SimpleNamespace(loop=loop, app=app, config=config, files=files, url="",
                            refs={"flux": load_transformer(str(flux_path), dtype="fp32")})

    async def start():
        from aiohttp import web

        state.runner = web.AppRunner(app, shutdown_timeout=5.0)
        await state.runner.setup()
        port = free_port()
        await web.TCPSite(state.runner, "127.0.0.1", port).start()
        state.url = f"http://127.0.0.1:{port}"
        async with TetriServeClient(state.url) as client:
            await client.load_model(FLUX, "fp32", timeout_s=300)
            await client.load_model(SD3, "fp8_e4m3fn", timeout_s=300)

    loop.run_until_complete(start())
    yield state
    loop.run_until_complete(state.runner.cleanup())
    loop.close()


def reference(svc, tensors, settings, stack):
    model = svc.refs["flux"]
    cache = LoraCache()
    with applied(model.module, [(cache.get(model, str(svc.files[k])), s) for k, s in stack]):
        return direct_run(SimpleNamespace(refs=svc.refs, config=svc.config), "flux", tensors, settings)


def test_models_report_storage_and_resident_bytes_per_worker(svc):
    async def body():
        async with TetriServeClient(svc.url) as client:
            return {m["name"]: m for m in await client.models()}

    listed = svc.loop.run_until_complete(body())
    flux, sd3 = listed[FLUX], listed[SD3]
    assert flux["storage"] == "fp32" and sd3["storage"] == "fp8_e4m3fn"
    assert flux["resident_on"] == sd3["resident_on"] == [0, 1]
    params = sum(p.numel() * 4 for p in svc.refs["flux"].module.parameters())
    assert flux["bytes_per_worker"] == params
    # fp8 Linear weights: far fewer bytes than the fp32 model of the same architecture would hold
    assert sd3["bytes_per_worker"] < 0.45 * sum(v.numel() * 4 for v in tiny_state_dict("sd3")[1].values())


def test_three_stacks_back_to_back_on_shared_weights(svc):
    names = {"a": "style-a.safetensors", "b": "sub/style-b.safetensors", "c": "style-c.safetensors"}
    stacks = [[("a", 0.8), ("b", -0.4)], [("c", 1.0)], [("b", 1.5)], []]
    tensors = job_tensors("flux", seed=5)
    base_settings = {"model": FLUX, "steps": 3, "sampler": "euler", "seed": 5, "latent_space": "model"}

    async def body():
        async with TetriServeClient(svc.url) as client:
            jobs = []
            for stack in stacks:  # submitted at once: they run back to back on the same workers
                settings = {**base_settings, "loras": [{"name": names[k], "strength": s} for k, s in stack]}
                jobs.append((stack, settings, await client.submit(encode_job(tensors, settings))))
            outs = []
            for stack, settings, receipt in jobs:
                status = await client.wait(receipt["job_id"])
                assert status["status"] == "finished", status
                assert status["sp_degree"] == 2
                outs.append((stack, settings, decode_result(await client.result(receipt["job_id"]))[0]["latent"]))
            return outs

    outs = svc.loop.run_until_complete(body())
    plain = outs[-1][2]
    for stack, settings, out in outs:
        ref = reference(svc, tensors, settings, stack)
        assert rel(out, ref) <= 1e-5, stack
        if stack:
            assert rel(out, plain) > 1e-2, stack


def test_bad_stacks_are_refused_with_the_reason(svc):
    tensors = job_tensors("flux", seed=1)

    async def submit(loras, model=FLUX):
        async with TetriServeClient(svc.url) as client:
            await client.submit(encode_job(tensors if model == FLUX else {
                **tensors, "latent": torch.zeros(1, 16, 16, 16)}, {"model": model, "steps": 2, "loras": loras}))

    with pytest.raises(NotFound, match=r"unknown LoRA 'missing.safetensors'.*loras"):
        svc.loop.run_until_complete(submit([{"name": "missing.safetensors", "strength": 1.0}]))
    with pytest.raises(InvalidRequest, match=r"is for SD3 models .* the model is FLUX"):
        svc.loop.run_until_complete(submit([{"name": "sd3-style.safetensors", "strength": 1.0}]))
    with pytest.raises(InvalidRequest, match=r"strength"):
        svc.loop.run_until_complete(submit([{"name": "style-a.safetensors", "strength": 1000}]))
