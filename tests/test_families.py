"""Qwen-Image and Wan 2.x on the engine: layouts, forward parity with diffusers, sharded forwards,
latent formats and model sampling (tiny models, CPU)."""
from __future__ import annotations

import io
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as tmp

from comfy_tetriserve.errors import InvalidRequest


def _inputs(family: str, seed: int = 5, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 16, 3, 14, 18) if family == "wan" else (batch, 16, 1, 14, 18)  # 189 / 63 tokens: odd
    return {"x": torch.randn(shape, generator=g), "sigma": torch.tensor([0.9, 0.4][:batch]),
            "context": torch.randn(batch, 7, 4096 if family == "wan" else 32, generator=g),
            "pooled": torch.zeros(batch, 0)}


# ----------------------------------------------------------------- layouts and diffusers parity
@pytest.mark.parametrize("family,layouts", [("wan", ("diffusers", "wan", "comfy")),
                                            ("qwen_image", ("diffusers", "qwen_single", "comfy"))])
def test_every_layout_loads_the_same_model(tmp_path, family, layouts):
    from comfy_tetriserve.worker.models import load_transformer, model_info
    from comfy_tetriserve.worker.tiny import write_tiny_checkpoint

    inp = _inputs(family, batch=1)
    outs = []
    for layout in layouts:
        path = write_tiny_checkpoint(family, layout, tmp_path / f"{family}-{layout}", seed=3)
        model = load_transformer(str(path), dtype="fp32")
        assert model.family == family
        info = model_info(str(path))
        assert (info.family, info.num_heads, info.in_channels, info.context_dim, info.pooled_dim) == \
            (family, 4, 16, 4096 if family == "wan" else 32, 0)
        outs.append(model.forward(inp["x"], inp["sigma"], inp["context"], inp["pooled"])[0])
    assert outs[0].shape == inp["x"].shape
    for out in outs[1:]:
        assert torch.allclose(out, outs[0], rtol=0, atol=1e-5)


def test_wan_forward_equals_diffusers_own_forward(tmp_path):
    """Our sharding-ready loop (own rotary angles, own processors) against diffusers' forward."""
    from diffusers import WanTransformer3DModel

    from comfy_tetriserve.worker import families
    from comfy_tetriserve.worker.models import load_transformer
    from comfy_tetriserve.worker.tiny import write_tiny_checkpoint

    for family in ("wan", "wan22"):
        model = load_transformer(str(write_tiny_checkpoint(family, "comfy", tmp_path / family)), dtype="fp32")
        ref_model = WanTransformer3DModel(**families.model_kwargs(model.config)).eval()
        ref_model.load_state_dict(model.module.state_dict())
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, model.config["in_channels"], 3, 6, 10, generator=g)
        ctx, sigma = torch.randn(1, 9, 4096, generator=g), torch.tensor([0.7])
        out, _ = model.forward(x, sigma, ctx, torch.zeros(1, 0))
        with torch.no_grad():
            ref = ref_model(x, sigma * 1000, ctx, return_dict=False)[0]
        err = float((out - ref).norm() / ref.norm())
        assert err <= 1e-5, (family, err)
        # the text reaches the output: other text moves it by far more than the tolerance
        other, _ = model.forward(x, sigma, ctx.flip(1) * 0.5, torch.zeros(1, 0))
        assert float((other - out).norm() / out.norm()) > 1e-2


def test_qwen_forward_equals_diffusers_on_even_grids(tmp_path):
    """On even token grids ComfyUI's and diffusers' positions agree; ours must match diffusers."""
    from diffusers import QwenImageTransformer2DModel

    from comfy_tetriserve.worker import families
    from comfy_tetriserve.worker.models import load_transformer
    from comfy_tetriserve.worker.tiny import write_tiny_checkpoint

    model = load_transformer(str(write_tiny_checkpoint("qwen_image", "comfy", tmp_path / "q")), dtype="fp32")
    ref_model = QwenImageTransformer2DModel(**families.model_kwargs(model.config)).eval()
    ref_model.load_state_dict(model.module.state_dict())
    g = torch.Generator().manual_seed(2)
    b, c, h, w = 1, 16, 12, 16
    x, ctx, sigma = torch.randn(b, c, h, w, generator=g), torch.randn(b, 9, 32, generator=g), torch.tensor([0.6])
    out, _ = model.forward(x, sigma, ctx, torch.zeros(1, 0))
    packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
    with torch.no_grad():
        r = ref_model(packed, ctx, None, sigma, img_shapes=[[(1, h // 2, w // 2)]], return_dict=False)[0]
    ref = r.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    err = float((out - ref).norm() / ref.norm())
    assert err <= 1e-5, err
    # 4-D and ComfyUI's 5-D one-frame latents give the same numbers, in the input's shape
    out5, _ = model.forward(x.unsqueeze(2), sigma, ctx, torch.zeros(1, 0))
    assert out5.shape == (b, c, 1, h, w) and torch.equal(out5[:, :, 0], out)


def test_bad_inputs_are_refused_with_messages(tmp_path):
    from comfy_tetriserve.worker.families import read_single_file
    from comfy_tetriserve.worker.models import load_transformer
    from comfy_tetriserve.worker.tiny import write_tiny_checkpoint

    wan = load_transformer(str(write_tiny_checkpoint("wan", "wan", tmp_path / "w")), dtype="fp32")
    with pytest.raises(InvalidRequest, match=r"\[B, C, F, H, W\]"):
        wan.forward(torch.zeros(1, 16, 6, 10), torch.tensor([0.5]), torch.zeros(1, 3, 4096), torch.zeros(1, 0))
    with pytest.raises(InvalidRequest, match="48-channel|16-channel"):
        wan.forward(torch.zeros(1, 48, 1, 6, 10), torch.tensor([0.5]), torch.zeros(1, 3, 4096), torch.zeros(1, 0))
    # an image-to-video Wan (CLIP image projection) is refused with a message
    i2v = {"head.modulation": torch.zeros(1, 2, 128), "blocks.0.self_attn.q.weight": torch.zeros(128, 128),
           "img_emb.proj.0.weight": torch.zeros(1280)}
    with pytest.raises(InvalidRequest, match="image-to-video"):
        read_single_file(i2v)


# ----------------------------------------------------------------- sharded forwards
def _group_main(rank: int, world: int, store: str, cases: dict, out_dir: str) -> None:
    import torch.distributed as dist

    from comfy_tetriserve.worker.models import load_transformer
    from comfy_tetriserve.worker.parallel import GroupComm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        groups = {k: dist.new_group(list(range(k))) for k in (2, 4)}
        results = {}
        for family, (ckpt, inputs) in cases.items():
            model = load_transformer(ckpt, dtype="fp32")
            for degree, group in groups.items():
                if rank < degree:
                    comm = GroupComm(group, list(range(degree)), rank)
                    out, votes = model.forward(inputs["x"], inputs["sigma"], inputs["context"], inputs["pooled"],
                                               comm=comm, vote=float(rank == 1))
                    results[f"{family}/{degree}"] = (out, votes)
        buf = io.BytesIO()
        torch.save(results, buf)
        with open(os.path.join(out_dir, f"{rank}.pt"), "wb") as fh:
            fh.write(buf.getvalue())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_forward_equals_single_device(tmp_path):
    """Degrees 2 and 4 over odd token counts (Qwen-Image 7 text + 63 image; Wan 3 x 7 x 9 = 189
    video tokens with the text whole on every rank), batch of 2 at different sigmas."""
    from comfy_tetriserve.worker.models import load_transformer
    from comfy_tetriserve.worker.tiny import write_tiny_checkpoint

    cases = {"wan": (str(write_tiny_checkpoint("wan", "wan", tmp_path / "wan")), _inputs("wan")),
             "qwen_image": (str(write_tiny_checkpoint("qwen_image", "comfy", tmp_path / "q")), _inputs("qwen_image"))}
    ctx = tmp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_group_main, args=(r, 4, os.path.join(d, "store"), cases, d)) for r in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=300)
            assert p.exitcode == 0
        results = [torch.load(os.path.join(d, f"{r}.pt")) for r in range(4)]
    for family, (ckpt, inputs) in cases.items():
        model = load_transformer(ckpt, dtype="fp32")
        ref, votes = model.forward(inputs["x"], inputs["sigma"], inputs["context"], inputs["pooled"])
        assert votes is None and ref.shape == inputs["x"].shape
        for degree in (2, 4):
            outs = [results[r][f"{family}/{degree}"][0] for r in range(degree)]
            assert all(torch.equal(o, outs[0]) for o in outs[1:])
            err = float((outs[0] - ref).norm() / ref.norm())
            assert err <= 1e-6, (family, degree, err)
            assert results[0][f"{family}/{degree}"][1].tolist() == [0.0, 1.0] + [0.0] * (degree - 2)
        # what is compared matters: a forward that sees only a shard's tokens is far off
        half = inputs["x"][:, :, :, :8] if family == "wan" else inputs["x"][..., :8, :]
        local, _ = model.forward(half, inputs["sigma"], inputs["context"], inputs["pooled"])
        full_part = ref[:, :, :, :8] if family == "wan" else ref[..., :8, :]
        assert float((local - full_part).norm() / full_part.norm()) > 1e-2


# ----------------------------------------------------------------- latents and model sampling
def test_wan_latent_formats_and_model_sampling():
    from comfy_tetriserve.sampling import latents
    from comfy_tetriserve.sampling.names import family_spec, sampling_family
    from comfy_tetriserve.sampling.schedules import compute_sigmas, model_sampling

    x = torch.randn(1, 16, 3, 4, 4)
    y = latents.process_latent_in("wan", x)
    # channel 0: (x - (-0.7571)) / 2.8184 (the Wan 2.1 VAE statistics)
    assert torch.allclose(y[:, 0], (x[:, 0] + 0.7571) / 2.8184)
    assert torch.allclose(latents.process_latent_out("wan", y), x, atol=1e-6)
    x48 = torch.randn(1, 48, 2, 4, 4)
    assert torch.allclose(latents.process_latent_out("wan22", latents.process_latent_in("wan22", x48)), x48, atol=1e-6)
    with pytest.raises(InvalidRequest):
        latents.process_latent_in("wan22", x)
    # ComfyUI: an empty 4-D latent of a 3-D latent family gains a frame axis (EmptySD3LatentImage -> Qwen-Image)
    assert latents.prepare_latent("qwen_image", torch.zeros(1, 16, 8, 8)).shape == (1, 16, 1, 8, 8)
    assert latents.prepare_latent("wan22", torch.zeros(1, 16, 2, 8, 8)).shape == (1, 48, 2, 8, 8)
    assert sampling_family("wan", latent_channels=48) == "wan22" and sampling_family("wan", latent_channels=16) == "wan"
    # model sampling: Wan shift 8 / multiplier 1000; Qwen-Image shift 1.15 / multiplier 1
    assert (family_spec("wan").shift, family_spec("wan").multiplier) == (8.0, 1000.0)
    assert (family_spec("qwen_image").shift, family_spec("qwen_image").multiplier) == (1.15, 1.0)
    t = torch.tensor(0.5)
    assert float(model_sampling("wan").sigma(model_sampling("wan").timestep(t))) == pytest.approx(
        8 * 0.5 / (1 + 7 * 0.5), rel=1e-6)
    s_wan = compute_sigmas("wan", "simple", 4)
    s_q = compute_sigmas("qwen_image", "simple", 4)
    assert float(s_wan[1]) == pytest.approx(8 * 0.75 / (1 + 7 * 0.75), rel=1e-3)
    assert float(s_q[1]) == pytest.approx(1.15 * 0.75 / (1 + 0.15 * 0.75), rel=1e-3)
    # the shift override (Load DiT's "shift") changes the schedule
    assert float(compute_sigmas("wan", "simple", 4, shift=3.0)[1]) < float(s_wan[1])


@pytest.mark.slow
def test_profile_measures_both_families(tmp_path):
    """``comfy-tetriserve profile`` on tiny Qwen-Image and Wan files; a clip's latent frames fold into the row height."""
    import json
    import subprocess
    import sys

    from comfy_tetriserve.worker.tiny import write_tiny_checkpoint

    wan = write_tiny_checkpoint("wan", "comfy", tmp_path / "tw")
    qwen = write_tiny_checkpoint("qwen_image", "comfy", tmp_path / "tq")
    out = tmp_path / "p.json"
    proc = subprocess.run([sys.executable, "-m", "comfy_tetriserve", "profile", "--devices", "cpu:2", "--model",
                           f"tw={wan}", "--model", f"tq={qwen}", "--res", "64", "--frames", "9", "--steps", "1",
                           "--warmup", "0", "--dtype", "fp32", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(out.read_text())
    assert table["models"]["tw"]["num_text_tokens"] == 512 and table["models"]["tq"]["num_text_tokens"] == 256
    rows = {(r["model"], r["sp_degree"]): r for r in table["rows"]}
    assert set(rows) == {("tw", 1), ("tw", 2), ("tq", 1), ("tq", 2)}
    assert rows["tw", 1]["height"] == 64 * 3 and rows["tq", 1]["height"] == 64  # 9 frames -> 3 latent frames
    assert all(r["compute_s"] > 0 for r in rows.values())


@pytest.mark.slow
def test_two_expert_job_switches_models_at_the_boundary(tmp_path):
    """A Wan 2.2-style job: high-noise expert while sigma >= boundary, low-noise expert after; on one
    device and on a group of two (the switch falls inside one assignment), against a hand-written
    Euler loop over the two models' forwards."""
    import asyncio

    from comfy_tetriserve.core.executor import SamplingJob
    from comfy_tetriserve.types import Assignment
    from comfy_tetriserve.worker.models import load_transformer
    from comfy_tetriserve.worker.pool import WorkerPool
    from comfy_tetriserve.worker.samplers import compute_sigmas, prepare_noise
    from comfy_tetriserve.worker.tiny import write_tiny_checkpoint

    high = write_tiny_checkpoint("wan", "comfy", tmp_path / "high", seed=1)
    low = write_tiny_checkpoint("wan", "comfy", tmp_path / "low", seed=2)
    latent = torch.zeros(1, 16, 2, 6, 10)
    noise = prepare_noise(latent, 3)
    sigmas = compute_sigmas("wan", "simple", 6)
    boundary = 0.9  # with shift 8 the first steps stay above 0.9 (high-noise expert), the last fall below
    ctx = torch.randn(1, 5, 4096, generator=torch.Generator().manual_seed(4))

    def job(rid, expert=None):
        return SamplingJob(request_id=rid, model="high", latent=latent, noise=noise, sigmas=sigmas, context=ctx,
                           pooled=torch.zeros(1, 0), sampler="euler",
                           extra={"expert": {"model": expert, "boundary": boundary}} if expert else {})

    async def run() -> dict:
        pool = WorkerPool("cpu:2")
        await pool.start()
        try:
            await pool.load_model("high", str(high), "fp32")
            await pool.load_model("low", str(low), "fp32")
            out = {}
            for rid, group, expert in (("e1", (0,), "low"), ("e2", (0, 1), "low"), ("plain", (0,), None)):
                await pool.admit(job(rid, expert))
                res = await pool.execute(Assignment((rid,), group, 6))
                assert res.error is None and res.steps_done == 6, res.error
                out[rid] = await pool.fetch_result(rid)
                await pool.release(rid)
            with pytest.raises(Exception, match="not loaded"):
                await pool.admit(job("bad", "missing"))
            return out
        finally:
            await pool.close()

    out = asyncio.run(run())
    models = {"high": load_transformer(str(high), dtype="fp32"), "low": load_transformer(str(low), dtype="fp32")}
    x = sigmas[0] * noise
    switched = []
    for i in range(6):
        name = "high" if float(sigmas[i]) >= boundary else "low"
        switched.append(name)
        v, _ = models[name].forward(x, sigmas[i:i + 1], ctx, torch.zeros(1, 0))
        denoised = x - v * sigmas[i]
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    n_high = switched.count("high")
    assert 1 <= n_high <= 5 and switched == ["high"] * n_high + ["low"] * (6 - n_high)
    for rid in ("e1", "e2"):
        err = float((out[rid] - x).norm() / x.norm())
        assert err <= 1e-5, (rid, err)
    # the switch matters: the high-noise model alone ends elsewhere
    assert float((out["plain"] - x).norm() / x.norm()) > 1e-2


def test_service_settings_name_both_experts_and_the_boundary():
    from comfy_tetriserve.core.executor import ModelInfo
    from comfy_tetriserve.core.experts import check_experts
    from comfy_tetriserve.service.schemas import parse_settings, resolve_job
    from comfy_tetriserve.service.settings import ServiceConfig

    limits = ServiceConfig()
    with pytest.raises(InvalidRequest, match="go together"):
        parse_settings({"model": "high.safetensors", "expert_model": "low.safetensors"}, limits)
    with pytest.raises(InvalidRequest, match="expert_boundary"):
        parse_settings({"model": "h", "expert_model": "l", "expert_boundary": 1.5}, limits)
    s = parse_settings({"model": "h", "steps": 4, "expert_model": "l", "expert_boundary": 0.875}, limits)
    info = ModelInfo(name="h", family="wan", num_heads=4, in_channels=16, context_dim=4096, pooled_dim=0)
    tensors = {"latent": torch.zeros(1, 16, 2, 4, 4), "context": torch.zeros(1, 3, 4096), "pooled": torch.zeros(1, 0)}
    job = resolve_job("j1", s, tensors, info)
    assert job.extra["expert"] == {"model": "l", "boundary": 0.875}
    assert float(job.sigmas[1]) == pytest.approx(8 * 0.75 / (1 + 7 * 0.75), rel=1e-3)  # Wan's shift 8 schedule
    other = ModelInfo(name="l", family="wan", num_heads=4, in_channels=48, context_dim=4096, pooled_dim=0)
    with pytest.raises(InvalidRequest, match="in_channels"):
        check_experts(info, other)
