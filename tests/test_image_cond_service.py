"""FLUX Fill and Kontext end to end: CONDITIONING as the stock nodes set it -> the nodes' job tensors ->
the service (two real gloo CPU workers, every step at degree 2) -> the latent, against the same job
sampled on one device in this process; plus the errors that name what is missing."""
from __future__ import annotations

import asyncio

import pytest
import torch

from comfy_tetriserve.client import TetriServeClient, decode_result, encode_job
from comfy_tetriserve.errors import InvalidRequest
from comfy_tetriserve.service.app import create_app
from comfy_tetriserve.cost import priced_size
from comfy_tetriserve.service.schemas import parse_settings, resolve_job
from comfy_tetriserve.worker import samplers
from comfy_tetriserve.worker.models import load_transformer
from comfy_tetriserve.worker.tiny import write_tiny_checkpoint
from factories import PowerLawCost
from nodes_helpers import load_nodes_package
from service_helpers import FifoPolicy, job_body, make_config, make_service_app, running_service

load_nodes_package()
from tetriserve_nodes.conditioning import ConditioningError, job_conditioning  # noqa: E402

FILL, DEV = "tiny-flux-fill.safetensors", "tiny-flux-dev.safetensors"


def conditioning(seed: int, **extras) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 7, 32, generator=g), {"pooled_output": torch.randn(1, 16, generator=g), **extras}]]


def inpaint_extras(seed: int = 11) -> dict:
    """What InpaintModelConditioning puts in the CONDITIONING: the masked image's latent and the mask."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 1, 112, 144)
    mask[..., 20:100, 30:120] = 1.0
    return {"concat_latent_image": torch.randn(1, 16, 14, 18, generator=g), "concat_mask": mask}


def reference_extras(seed: int = 12, method: str | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    refs = [torch.randn(1, 16, 10, 12, generator=g), torch.randn(1, 16, 7, 9, generator=g)]
    return {"reference_latents": refs, **({"reference_latents_method": method} if method else {})}


# ----------------------------------------------------------------- the nodes' side (no service)
def test_nodes_send_the_image_conditioning_the_stock_nodes_set():
    fill = job_conditioning("flux", conditioning(1, **inpaint_extras()), None, 1.0, context_dim=32, pooled_dim=16)
    assert set(fill.tensors) == {"context", "pooled", "concat_latent_image", "concat_mask"} and not fill.settings
    kontext = job_conditioning("flux", conditioning(1, **reference_extras(method="index")), None, 1.0)
    assert set(kontext.tensors) == {"context", "pooled", "ref_latent_0", "ref_latent_1"}
    assert kontext.settings == {"reference_latents_method": "index"}
    # CFG with the same image conditioning on both branches (InpaintModelConditioning sets both)
    extras = inpaint_extras()
    both = job_conditioning("flux", conditioning(1, **extras), conditioning(2, **extras), 2.0, guidance_embeds=False)
    assert {"neg_context", "concat_mask"} <= set(both.tensors)
    encode_job({"latent": torch.zeros(1, 16, 14, 18), **both.tensors}, {"model": "m"})  # no shared storage
    with pytest.raises(ConditioningError, match="other image conditioning"):
        job_conditioning("flux", conditioning(1, **extras), conditioning(2), 2.0, guidance_embeds=False)
    with pytest.raises(ConditioningError, match="no concat_mask"):
        job_conditioning("flux", conditioning(1, concat_latent_image=extras["concat_latent_image"]), None, 1.0)


def test_kontext_jobs_are_priced_with_their_reference_tokens():
    assert priced_size(224, 288, 0) == (224, 288)
    # 14 x 18 = 252 image tokens + 50 reference tokens: 4 more columns of 14 tokens (56 >= 50)
    h, w = priced_size(224, 288, 50)
    assert (h, w) == (224, 288 + 4 * 16) and (h // 16) * (w // 16) >= 252 + 50


def test_bad_image_conditioning_is_refused_by_name():
    """On the simulated service (FLUX-dev-like flux-sim, SD3-like sd3-sim): 400s that say what is wrong."""
    import aiohttp

    ref = torch.zeros(1, 16, 8, 8)
    cases = [
        ("mask without image", {"concat_mask": torch.ones(1, 128, 128)}, {}, "go together"),
        ("fill inputs for a non-fill model", {"concat_latent_image": torch.zeros(1, 16, 16, 16),
                                              "concat_mask": torch.ones(1, 128, 128)}, {}, "not a FLUX Fill"),
        ("gap in references", {"ref_latent_1": ref}, {}, "without gaps"),
        ("reference of wrong channels", {"ref_latent_0": torch.zeros(1, 4, 8, 8)}, {}, "ref_latent_0 must be"),
        ("reference on sd3", {"ref_latent_0": ref}, {"model": "sd3-sim"}, "does not take reference latents"),
        ("unknown method", {"ref_latent_0": ref}, {"reference_latents_method": "stack"}, "reference_latents_method"),
        ("too many reference tokens", {"ref_latent_0": torch.zeros(1, 16, 130, 130)}, {}, "more than the limit"),
    ]

    async def body():
        app, _ = make_service_app(max_image_tokens=4096)
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            for name, tensors, settings, word in cases:
                data = job_body(settings, tensors=tensors, pooled_dim=2048 if settings.get("model") == "sd3-sim" else 768)
                async with s.post(url + "/v1/jobs", data=data) as resp:
                    text = await resp.text()
                    assert resp.status == 400 and word in text, (name, resp.status, text)
            # a Kontext job is accepted and planned with its reference tokens: 8 x 8 latent -> 16 tokens
            async with s.post(url + "/v1/jobs", data=job_body(tensors={"ref_latent_0": ref})) as resp:
                job = await resp.json()
                assert resp.status == 202 and (job["height"], job["width"]) == priced_size(128, 128, 16), job

    asyncio.run(body())


# ----------------------------------------------------------------- through the service
class Harness:
    def __init__(self, tmp) -> None:
        self.loop = asyncio.new_event_loop()
        models = tmp / "models"
        self.paths = {FILL: write_tiny_checkpoint("flux", "comfy", models / FILL, seed=3, variant="fill"),
                      DEV: write_tiny_checkpoint("flux", "bfl", models / DEV, seed=3)}
        self.config = make_config(devices="cpu:2", model=(), model_dir=(str(models),), dtype="fp32",
                                  shutdown_grace_s=5.0)
        self.app = create_app(self.config, policy=FifoPolicy(sp_degree=2), cost=PowerLawCost(base_s=0.05,
                                                                                              degrees=(1, 2)))
        self.refs = {name: load_transformer(str(p), dtype="fp32") for name, p in self.paths.items()}

    def __call__(self, coro):
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    harness = Harness(tmp_path_factory.mktemp("svc-fk"))
    yield harness
    harness.loop.close()


def direct_run(h: Harness, name: str, tensors: dict, settings: dict) -> torch.Tensor:
    """The job on one device in this process (the resolved SamplingJob's concat / references)."""
    model = h.refs[name]
    job = resolve_job("ref", parse_settings(settings, h.config), tensors, model.info())

    def denoise(x, sigma):
        b = x.shape[0]
        sigma = sigma.reshape(-1).expand(b)
        out, _ = model.forward(x, sigma, job.context, job.pooled, torch.full((b,), job.guidance), concat=job.concat,
                               refs=job.ref_latents, ref_method=job.ref_method)
        return x - out * sigma.view(-1, 1, 1, 1)

    traj = samplers.start_trajectory(job.latent, job.noise, job.sigmas, job.sampler, job.seed)
    while not traj.done:
        traj = samplers.step(traj, denoise)
    return samplers.finish_latent(traj)


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
def test_fill_and_kontext_jobs_on_two_workers_equal_one_device(h):
    settings = {"steps": 4, "sampler": "euler", "seed": 5, "latent_space": "model"}
    fill = job_conditioning("flux", conditioning(1, **inpaint_extras()), None, 1.0)
    kontext = job_conditioning("flux", conditioning(1, **reference_extras(method="offset")), None, 1.0)
    jobs = {
        "fill": (FILL, fill.tensors, fill.settings),
        "kontext": (DEV, kontext.tensors, kontext.settings),
        "plain": (DEV, {k: kontext.tensors[k] for k in ("context", "pooled")}, {}),
    }

    async def body():
        out, errors = {}, {}
        async with running_service(h.app) as url, TetriServeClient(url) as client:
            for name in (FILL, DEV):
                await client.load_model(name, "fp32", timeout_s=300)
            for key, (model, tensors, extra) in jobs.items():
                s = {**settings, **extra, "model": model}
                job = await client.submit(encode_job({"latent": torch.zeros(1, 16, 14, 18), **tensors}, s))
                if key == "kontext":  # planned with its 50 reference tokens (2 x 2 patches of 10x12 and 7x9)
                    assert (job["height"], job["width"]) == priced_size(112, 144, 30 + 20)
                await client.wait(job["job_id"])
                out[key] = decode_result(await client.result(job["job_id"]))[0]["latent"]
            for key, (model, tensors) in {"fill-without-mask": (FILL, {k: fill.tensors[k] for k in ("context", "pooled")}),
                                          "refs-on-fill": (FILL, {**fill.tensors, "ref_latent_0": torch.zeros(1, 16, 4, 4)}),
                                          "mask-on-dev": (DEV, fill.tensors)}.items():
                with pytest.raises(InvalidRequest) as info:
                    await client.submit(encode_job({"latent": torch.zeros(1, 16, 14, 18), **tensors},
                                                   {**settings, "model": model}))
                errors[key] = str(info.value)
        return out, errors

    out, errors = h(body())
    for key, (model, tensors, extra) in jobs.items():
        ref = direct_run(h, model, {"latent": torch.zeros(1, 16, 14, 18), **tensors},
                         {**settings, **extra, "model": model})
        err = rel(out[key], ref)
        print(f"{key}: degree 2 on the service vs one device: rel err {err:.2e}")
        assert err <= 1e-5, (key, err)
    # the references change the result far beyond the tolerance (they are not dropped on the way)
    assert rel(out["kontext"], out["plain"]) > 1e-2
    assert "FLUX Fill" in errors["fill-without-mask"] and "concat_mask" in errors["fill-without-mask"]
    assert "does not take reference latents" in errors["refs-on-fill"]
    assert "not a FLUX Fill model" in errors["mask-on-dev"]
