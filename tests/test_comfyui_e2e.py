"""End to end against a real ComfyUI (headless, CPU): this pack loaded through an
extra_model_paths.yaml, the test node pack for conditioning, one scheduler service on two CPU
workers (tiny models, a test policy that runs a job on ``priority`` devices), API-format
workflows posted to /prompt.

Skipped unless TETRISERVE_COMFYUI (a ComfyUI checkout) and TETRISERVE_COMFYUI_PYTHON (the python
of its venv) are set. The numbers (parity, timings) are written to out/comfyui_e2e.json.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from comfyui_helpers import collect_events, load_api_workflow, make_sandbox, runnable_here, start_comfyui
from nodes_helpers import ROOT, get_json, post_json, start_service, stop

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

REPORT: dict = {}
PARITY_TOL = 1e-3


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    box = make_sandbox(tmp_path_factory.mktemp("comfyui"))
    url, service = start_service(box.root, box.models, extra=("--lease-s", "3"))
    comfy = None
    try:
        comfy = start_comfyui(box, url, "a")
        yield {"box": box, "service_url": url, "service": service, "a": comfy, "extra": []}
    finally:
        for proc in ([comfy.proc] if comfy else []):
            stop(proc)
        stop(service)
        out = ROOT / "out"
        out.mkdir(exist_ok=True)
        (out / "comfyui_e2e.json").write_text(json.dumps(REPORT, indent=1) + "\n")


def node(cls: str, **inputs) -> dict:
    return {"class_type": cls, "inputs": inputs}


def service_jobs(url: str, **query) -> list[dict]:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return get_json(f"{url}/v1/jobs" + (f"?{q}" if q else ""))["jobs"]


def wait_job(url: str, job_id: str, statuses: tuple[str, ...], timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = get_json(f"{url}/v1/jobs/{job_id}")
        if status["status"] in statuses or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def latent_of(comfy, history: dict, node_id: str):
    item = history["outputs"][node_id]["latents"][0]
    return load_file(str(comfy.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------ parity
PARITY_CASES = {
    # name: (latent node, sampler, scheduler, cfg, denoise, negative node)
    "t2i_euler_cfg": ("empty", "euler", "simple", 4.0, 1.0, "neg"),
    "img2img_dpmpp_2m_karras": ("image", "dpmpp_2m", "karras", 3.0, 0.6, "neg"),
    "ancestral_sgm_uniform": ("empty", "euler_ancestral", "sgm_uniform", 1.0, 1.0, "neg"),
    # a negative twice as long as the positive (text lengths differ inside one CFG pair)
    "t2i_cfg_negative_longer": ("empty", "euler", "simple", 4.0, 1.0, "neg16"),
}


def test_parity_with_stock_ksampler_at_degree_1_and_2(stack):
    """Same tiny SD3 (loaded by the stock UNETLoader for the KSampler), seed, steps, sampler,
    scheduler and conditioning: the TetriServe Sampler's latent equals the KSampler's."""
    comfy, url = stack["a"], stack["service_url"]
    p = {
        "unet": node("UNETLoader", unet_name="tiny_sd3.safetensors", weight_dtype="default"),
        "dit": node("TetriServeLoadDiT", unet_name="tiny_sd3.safetensors", weight_dtype="fp32", shift=0.0),
        "pos": node("TetriServeTestConditioning", text="a cat", tokens=8, context_dim=32, pooled_dim=16, seed=0),
        "neg": node("TetriServeTestConditioning", text="blurry", tokens=8, context_dim=32, pooled_dim=16, seed=0),
        "neg16": node("TetriServeTestConditioning", text="blurry, dull", tokens=16, context_dim=32, pooled_dim=16,
                      seed=0),
        "empty": node("EmptySD3LatentImage", width=128, height=96, batch_size=1),
        "image": node("TetriServeTestLatent", width=128, height=96, batch_size=1, channels=16, seed=5),
    }
    common = {"seed": 1234, "steps": 10, "positive": ["pos", 0]}
    for name, (latent, sampler, scheduler, cfg, denoise, negative) in PARITY_CASES.items():
        args = dict(common, cfg=cfg, sampler_name=sampler, scheduler=scheduler, denoise=denoise,
                    latent_image=[latent, 0], negative=[negative, 0])
        p[f"ks_{name}"] = node("KSampler", model=["unet", 0], **args)
        p[f"save_ks_{name}"] = node("SaveLatent", samples=[f"ks_{name}", 0], filename_prefix=f"ks_{name}")
        for k in (1, 2):
            p[f"ts{k}_{name}"] = node("TetriServeSampler", model=["dit", 0], deadline_s=0.0, priority=k, **args)
            p[f"save_ts{k}_{name}"] = node("SaveLatent", samples=[f"ts{k}_{name}", 0], filename_prefix=f"ts{k}_{name}")
    prompt_id = comfy.post(p)
    history = comfy.history(prompt_id)
    assert history["status"]["status_str"] == "success", json.dumps(history["status"])[-3000:]

    results = {}
    for name in PARITY_CASES:
        stock = latent_of(comfy, history, f"save_ks_{name}")
        assert stock.abs().max() > 0.1  # a real sample, not an empty latent
        for k in (1, 2):
            results[f"{name}@degree{k}"] = rel_err(latent_of(comfy, history, f"save_ts{k}_{name}"), stock)
    REPORT["parity_rel_err"] = results
    print("parity rel err vs stock KSampler:", json.dumps(results, indent=1))
    assert all(v < PARITY_TOL for v in results.values()), results
    # the service really ran the priority-2 jobs on two devices, the others on one
    jobs = [j for j in service_jobs(url) if j["model"] == "tiny_sd3.safetensors" and j["priority"] in (1, 2)]
    assert len(jobs) >= 2 * len(PARITY_CASES)
    assert {j["sp_degree"] for j in jobs if j["priority"] == 2} == {2}
    assert {j["sp_degree"] for j in jobs if j["priority"] == 1} == {1}


# ----------------------------------------------------------------------- shipped workflows
def run_with_events(comfy, prompt: dict, client_id: str, timeout_s: float = 240.0):
    async def go():
        events_task = asyncio.ensure_future(collect_events(
            comfy.url, client_id, lambda ev: any(e.get("prompt_id") == holder.get("id") for e in
                                                 ev.of("execution_success") + ev.of("execution_error")
                                                 + ev.of("execution_interrupted")), timeout_s))
        await asyncio.sleep(0.5)  # connected before the prompt starts
        holder["id"] = await asyncio.to_thread(comfy.post, prompt, client_id)
        return await events_task

    holder: dict = {}
    events = asyncio.run(go())
    return holder["id"], events


@pytest.mark.parametrize("name,family", [("tetriserve_flux_text_to_image", "flux"), ("tetriserve_sd3_cfg", "sd3")])
def test_shipped_workflow_makes_images_with_progress(stack, name, family):
    comfy, url = stack["a"], stack["service_url"]
    prompt = runnable_here(load_api_workflow(name), family, steps=8)
    sampler_id = next(k for k, v in prompt.items() if v["class_type"] == "TetriServeSampler")
    save_id = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
    t0 = time.monotonic()
    prompt_id, events = run_with_events(comfy, prompt, f"wf-{family}")
    took = time.monotonic() - t0
    assert events.of("execution_success"), events.json[-5:]
    history = comfy.history(prompt_id)
    image = history["outputs"][save_id]["images"][0]
    path = comfy.output_dir / image["subfolder"] / image["filename"]
    from PIL import Image  # pillow comes with matplotlib in the test extras

    with Image.open(path) as img:
        latent = prompt[next(k for k, v in prompt.items() if v["class_type"] == "EmptySD3LatentImage")]["inputs"]
        assert img.size == (latent["width"], latent["height"])
    # per-step progress on the sampler's bar, phase text on the node, pushed job events
    values = [e["value"] for e in events.of("progress") if e["node"] == sampler_id]
    assert values and values[-1] == 8 and values == sorted(values), values
    texts = [t for node_id, t in events.texts if node_id == sampler_id]
    assert any(t.startswith(("queued", "on 1 GPU", "on 2 GPUs")) for t in texts), texts
    assert texts[-1].startswith("done"), texts
    pushed = [e for e in events.of("tetriserve.job") if e["node"] == sampler_id]
    assert pushed and pushed[-1]["phase"] == "finished" and pushed[-1]["steps_done"] == 8
    job = get_json(f"{url}/v1/jobs/{pushed[-1]['job_id']}")
    assert job["status"] == "finished" and job["met_deadline"] is True and job["deadline_at"] is not None
    REPORT.setdefault("workflows", {})[name] = {"seconds": round(took, 2), "progress_events": len(values),
                                               "phase_texts": texts[:1] + texts[-1:], "image": image["filename"]}


def test_several_samplers_in_one_prompt_run_concurrently(stack):
    comfy, url = stack["a"], stack["service_url"]
    prompt = runnable_here(load_api_workflow("tetriserve_flux_multi_resolution_deadlines"), "flux", steps=200)
    prompt_id, events = run_with_events(comfy, prompt, "multi")
    assert events.of("execution_success"), events.json[-5:]
    job_ids = {e["job_id"] for e in events.of("tetriserve.job")}
    assert len(job_ids) == 3
    jobs = [get_json(f"{url}/v1/jobs/{j}") for j in job_ids]
    # all three were at the service before the first one ended: planned together
    assert max(j["submitted_at"] for j in jobs) < min(j["ended_at"] for j in jobs), jobs
    assert {(j["width"], j["height"]) for j in jobs} == {(64, 64), (96, 128), (128, 128)}
    assert all(j["deadline_at"] is not None for j in jobs)
    history = comfy.history(prompt_id)
    assert sum(len(o.get("images", [])) for o in history["outputs"].values()) == 3
    REPORT["one_prompt_three_jobs"] = {"submitted_spread_s": round(max(j["submitted_at"] for j in jobs)
                                                                   - min(j["submitted_at"] for j in jobs), 3),
                                       "first_end_after_last_submit_s": round(min(j["ended_at"] for j in jobs)
                                                                              - max(j["submitted_at"] for j in jobs), 3)}


# --------------------------------------------------------------------------- cancelling
def long_job_prompt(seed: int, *, extra: dict | None = None) -> dict:
    p = {
        "dit": node("TetriServeLoadDiT", unet_name="tiny_sd3.safetensors", weight_dtype="fp32", shift=0.0),
        "pos": node("TetriServeTestConditioning", text="long", tokens=8, context_dim=32, pooled_dim=16, seed=0),
        "empty": node("EmptySD3LatentImage", width=256, height=256, batch_size=1),
        "sampler": node("TetriServeSampler", model=["dit", 0], seed=seed, steps=1000, cfg=2.0, sampler_name="euler",
                        scheduler="simple", positive=["pos", 0], negative=["pos", 0], latent_image=["empty", 0],
                        denoise=1.0, deadline_s=0.0, priority=1),
        "save": node("SaveLatent", samples=["sampler", 0], filename_prefix="long"),
    }
    p.update(extra or {})
    return p


def _first_job_event(comfy, client_id: str, prompt: dict, then) -> tuple[str, object, float]:
    """Post ``prompt``; once its sampler reported a step, call ``then()``; return (job_id, events)."""
    state: dict = {}

    def stop_when(ev) -> bool:
        pushed = [e for e in ev.of("tetriserve.job") if e["steps_done"] >= 1]
        if pushed and "job" not in state:
            state["job"] = pushed[0]["job_id"]
            state["acted_at"] = time.monotonic()
            threading.Thread(target=then, daemon=True).start()
        return bool(ev.of("execution_interrupted") or ev.of("execution_error") or ev.of("execution_success"))

    async def go():
        task = asyncio.ensure_future(collect_events(comfy.url, client_id, stop_when, 120))
        await asyncio.sleep(0.5)
        await asyncio.to_thread(comfy.post, prompt, client_id)
        return await task

    events = asyncio.run(go())
    assert "job" in state, f"the sampler never reported a step: {events.json[-4:]}"
    return state["job"], events, state["acted_at"]


def _write_input_image(folder: Path, name: str = "example.png") -> None:
    """A 128 x 96 RGBA image; LoadImage's MASK is 1 - alpha: a transparent rectangle is the area to repaint."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    rgba = np.concatenate([rng.integers(0, 256, (96, 128, 3)), np.full((96, 128, 1), 255)], axis=2).astype(np.uint8)
    rgba[24:72, 32:96, 3] = 0
    Image.fromarray(rgba, "RGBA").save(folder / name)


def test_fill_and_kontext_workflows_through_the_stock_nodes(stack):
    """The shipped Fill and Kontext workflows (stock LoadImage, InpaintModelConditioning, VAEEncode,
    ReferenceLatent; tiny models, small sizes): the same latent at degree 1 and 2, and the mask /
    reference really reaches the model (without it the latent moves far more than the tolerance)."""
    comfy, url = stack["a"], stack["service_url"]
    _write_input_image(stack["box"].root / "a" / "input")
    results = {}
    for name, unet in (("tetriserve_flux_fill_inpaint", "tiny_flux_fill.safetensors"),
                       ("tetriserve_flux_kontext_edit", "tiny_flux.safetensors")):
        p = runnable_here(load_api_workflow(name), "flux", steps=4)
        ids = {v["class_type"]: k for k, v in p.items()}
        p[ids["TetriServeLoadDiT"]]["inputs"]["unet_name"] = unet
        for cls in ("VAEDecode", "SaveImage"):
            del p[ids[cls]]
        sampler = p.pop(ids["TetriServeSampler"])
        if "FluxKontextImageScale" in ids:  # small sizes here: a plain resize instead of Kontext's ~1 MP sizes
            p[ids["FluxKontextImageScale"]] = node("ImageScale", image=[ids["LoadImage"], 0], upscale_method="bilinear",
                                                   width=96, height=64, crop="center")
            # without the reference: the guidance straight on the text
            p["plain_guidance"] = node("FluxGuidance", guidance=2.5, conditioning=[ids["TetriServeTestConditioning"], 0])
            variants = {"without": {"positive": ["plain_guidance", 0]}}
        else:  # without the mask: an all-zero mask (nothing masked out of the image, nothing to repaint)
            p["zero_mask"] = node("SolidMask", value=0.0, width=128, height=96)
            inpaint = p[ids["InpaintModelConditioning"]]
            p["inpaint_zero"] = node("InpaintModelConditioning", **{**inpaint["inputs"], "mask": ["zero_mask", 0]})
            variants = {"without": {"positive": ["inpaint_zero", 0], "negative": ["inpaint_zero", 1],
                                    "latent_image": ["inpaint_zero", 2]}}
        for key, changes in {"k1": {"priority": 1}, "k2": {"priority": 2},
                             "without": {"priority": 1, **variants["without"]}}.items():
            p[f"ts_{key}"] = node("TetriServeSampler", **{**sampler["inputs"], **changes})
            p[f"save_{key}"] = node("SaveLatent", samples=[f"ts_{key}", 0], filename_prefix=f"{name}_{key}")
        prompt_id = comfy.post(p)
        history = comfy.history(prompt_id)
        assert history["status"]["status_str"] == "success", json.dumps(history["status"])[-3000:]
        out = {key: latent_of(comfy, history, f"save_{key}") for key in ("k1", "k2", "without")}
        results[name] = {"degree2_vs_1": rel_err(out["k2"], out["k1"]), "without_vs_with": rel_err(out["without"],
                                                                                                      out["k1"])}
    REPORT["fill_kontext"] = results
    print("fill / kontext through the stock nodes:", json.dumps(results, indent=1))
    for name, r in results.items():
        assert r["degree2_vs_1"] < 1e-5 and r["without_vs_with"] > 1e-2, (name, r)
    jobs = {j["model"]: j for j in service_jobs(url) if j["model"] in ("tiny_flux_fill.safetensors",)}
    assert jobs, "the Fill jobs ran on the service"


def test_interrupt_cancels_the_job_at_the_service(stack):
    comfy, url = stack["a"], stack["service_url"]
    job_id, events, interrupted_at = _first_job_event(
        comfy, "interrupt", long_job_prompt(11), lambda: post_json(comfy.url + "/interrupt", {}))
    assert events.of("execution_interrupted"), events.json[-5:]
    status = wait_job(url, job_id, ("cancelled", "finished", "failed"))
    assert status["status"] == "cancelled" and status["steps_done"] < 1000, status
    REPORT["interrupt"] = {"steps_done": status["steps_done"],
                           "cancelled_after_interrupt_s": round(time.monotonic() - interrupted_at, 2)}


def test_failing_sibling_cancels_the_job_at_the_service(stack):
    comfy, url = stack["a"], stack["service_url"]
    prompt = long_job_prompt(12, extra={"fail": node("TetriServeTestFailLater", delay_s=1.5),
                                        "save_fail": node("SaveLatent", samples=["fail", 0], filename_prefix="x")})
    job_id, events, _ = _first_job_event(comfy, "sibling", prompt, lambda: None)
    errors = events.of("execution_error")
    assert errors and "failed on purpose" in errors[0]["exception_message"], events.json[-5:]
    status = wait_job(url, job_id, ("cancelled", "finished", "failed"))
    assert status["status"] == "cancelled" and status["steps_done"] < 1000, status


# ------------------------------------------------------------------- two ComfyUI instances
def test_two_comfyui_instances_share_one_service(stack):
    comfy_a, url = stack["a"], stack["service_url"]
    comfy_b = start_comfyui(stack["box"], url, "b")
    stack["extra"].append(comfy_b)
    try:
        prompts = {}
        for name, comfy, seed in (("a", comfy_a, 21), ("b", comfy_b, 22)):
            p = runnable_here(load_api_workflow("tetriserve_sd3_cfg"), "sd3", steps=150)
            next(v for v in p.values() if v["class_type"] == "TetriServeSampler")["inputs"]["seed"] = seed
            prompts[name] = (comfy, comfy.post(p, f"two-{name}"))
        histories = {name: comfy.history(pid) for name, (comfy, pid) in prompts.items()}
        assert all(h["status"]["status_str"] == "success" for h in histories.values())
        tenants = {name: f"comfyui-{comfy.url.rsplit(':', 1)[1]}" for name, (comfy, _) in prompts.items()}
        jobs = {name: max(service_jobs(url, tenant=t), key=lambda j: j["submitted_at"]) for name, t in tenants.items()}
        a, b = jobs["a"], jobs["b"]
        assert a["status"] == b["status"] == "finished"
        overlap = min(a["ended_at"], b["ended_at"]) - max(a["submitted_at"], b["submitted_at"])
        assert overlap > 0, (a, b)  # both were at the service at the same time
        REPORT["two_instances"] = {"tenants": sorted(tenants.values()), "overlap_s": round(overlap, 2),
                                   "gpu_ids": [a["gpu_ids"], b["gpu_ids"]]}

        # a ComfyUI that dies leaves no orphan: its lease expires and the service cancels the job
        comfy_b.post(long_job_prompt(13), "doomed")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            running = [j for j in service_jobs(url, tenant=tenants["b"]) if j["status"] in ("running", "waiting")]
            if running:
                break
            time.sleep(0.1)
        assert running, "the killed instance's job never started"
        os.killpg(comfy_b.proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        status = wait_job(url, running[0]["job_id"], ("cancelled", "finished", "failed"), timeout_s=30)
        assert status["status"] == "cancelled" and status["cancel_reason"] == "lease expired", status
        REPORT["killed_instance"] = {"cancelled_after_kill_s": round(time.monotonic() - killed_at, 2),
                                     "steps_done": status["steps_done"]}
    finally:
        stop(comfy_b.proc)


def test_service_down_gives_a_clear_error(stack):
    """Last in this module: it stops the service."""
    comfy = stack["a"]
    stop(stack["service"])
    prompt = runnable_here(load_api_workflow("tetriserve_flux_text_to_image"), "flux", steps=3)
    next(v for v in prompt.values() if v["class_type"] == "TetriServeSampler")["inputs"]["seed"] = 999
    history = comfy.history(comfy.post(prompt))
    assert history["status"]["status_str"] == "error"
    message = next(m[1] for m in history["status"]["messages"] if m[0] == "execution_error")["exception_message"]
    assert "no scheduler service answers at" in message and "TETRISERVE_AUTOSTART" in message, message
    REPORT["service_down_message"] = message
