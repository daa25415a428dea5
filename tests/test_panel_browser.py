"""The board panel in a real headless Chromium against a real ComfyUI (frontend as shipped).

The service runs the TetriServe planner on four simulated H200s (the shipped h200 cost model,
step times x3), so the board fills with real plans: a ComfyUI prompt with two TetriServe
Samplers and a handful of API jobs of another tenant, one with a deadline it cannot meet. The
test opens the panel through its bottom-panel command, checks what it shows (device labels, the job
table scrolling inside the panel, this instance's samplers with their phase from the board), saves a
screenshot (docs/panel_board.png), checks that the samplers' pushed events reach only the prompt's
own client session (a second websocket client hears none), and converts each UI-format example workflow with ComfyUI's own frontend
(graphToPrompt) to check it equals the API-format file.

Skipped without ComfyUI (TETRISERVE_COMFYUI, TETRISERVE_COMFYUI_PYTHON) or without chromium.
"""
from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch

from browser_helpers import Browser, chromium_path
from comfy_tetriserve.client import TetriServeClient, encode_job
from comfyui_helpers import collect_events, comfyui_paths, make_sandbox, start_comfyui
from nodes_helpers import ROOT, start_service, stop

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

SCREENSHOT = ROOT / "docs" / "panel_board.png"
PANEL = "document.querySelector('[data-testid=tetriserve-panel]')"


def panel_prompt() -> dict:
    def node(cls, **inputs):
        return {"class_type": cls, "inputs": inputs}

    p = {
        "dit": node("TetriServeLoadDiT", unet_name="tiny_flux.safetensors", weight_dtype="default", shift=0.0),
        "text": node("TetriServeTestConditioning", text="a harbour at night", tokens=16, context_dim=4096,
                     pooled_dim=768, seed=0),
    }
    for i, (size, deadline) in enumerate(((1024, 12.0), (768, 6.0))):
        p[f"latent{i}"] = node("EmptySD3LatentImage", width=size, height=size, batch_size=1)
        p[f"sampler{i}"] = node("TetriServeSampler", model=["dit", 0], seed=i, steps=20, cfg=1.0, sampler_name="euler",
                                scheduler="simple", positive=["text", 0], negative=["text", 0],
                                latent_image=[f"latent{i}", 0], denoise=1.0, deadline_s=deadline, priority=0)
        p[f"save{i}"] = node("SaveLatent", samples=[f"sampler{i}", 0], filename_prefix=f"panel{i}")
    return p


async def submit_api_jobs(url: str) -> list[str]:
    """Jobs of another tenant straight to the service API (as a studio's API worker would)."""
    ids = []
    async with TetriServeClient(url) as client:
        await client.load_model("tiny_flux.safetensors")
        for i, (size, steps, deadline) in enumerate(((1024, 28, 15.0), (512, 20, 4.0), (1024, 28, 1.0),
                                                     (768, 24, 10.0), (512, 16, None))):
            body = encode_job({"latent": torch.zeros(1, 16, size // 8, size // 8), "context": torch.randn(1, 16, 4096),
                               "pooled": torch.randn(1, 768)},
                              {"model": "tiny_flux.safetensors", "steps": steps, "deadline_s": deadline,
                               "tenant": "studio-api", "seed": i})
            ids.append((await client.submit(body))["job_id"])
    return ids


def test_board_panel_shows_the_live_board(tmp_path):
    comfyui_paths()  # skips without ComfyUI
    if chromium_path() is None:
        pytest.skip("chromium is not installed (apt-get install chromium): the panel is not checked in a browser")
    box = make_sandbox(tmp_path)
    url, service = start_service(box.root, box.models, devices="sim:4", policy="tetriserve", cost="h200",
                                 extra=("--sim-time-scale", "3"))
    comfy = None
    try:
        comfy = start_comfyui(box, url, "ui")
        result = asyncio.run(drive(comfy, url, tmp_path))
    finally:
        if comfy is not None:
            stop(comfy.proc)
        stop(service)
    shown, converted, bystander = result
    assert bystander.of("status") and not bystander.of("tetriserve.job"), bystander.json[-3:]
    assert shown["labels"] == ["sim 0", "sim 1", "sim 2", "sim 3"], shown
    assert shown["table_scrolls"] and not shown["panel_overflows"], shown
    assert all(" · " in t or t.startswith("done in") or t in ("queued", "failed", "cancelled")
               for t in shown["mine_texts"]), shown  # the phase as the board has it now
    assert shown["status"] == "live" and shown["policy"] == "tetriserve" and shown["busy"].endswith("/4")
    assert shown["rows"] >= 7 and shown["late_rows"] >= 1, shown
    assert shown["mine"] >= 2, shown  # this instance's two samplers, from pushed events
    assert shown["painted"] > 0.02, shown  # the canvas has bars on it, not just the background
    assert shown["sar"] != "–"
    for name, (ours, theirs) in converted.items():
        assert ours == theirs, name


async def drive(comfy, url: str, tmp_path):
    async with Browser.launch(tmp_path) as browser:
        await browser.goto(comfy.url)
        await browser.wait_for("!!(window.app && window.app.graph && window.app.extensionManager)", 90)

        # the UI-format workflows, converted by ComfyUI's own frontend, equal the API-format files
        converted = {}
        for path in sorted((ROOT / "example_workflows").glob("*.json")):
            api = json.loads((ROOT / "workflows" / "api" / path.name).read_text())
            output = await browser.evaluate(
                f"(async () => {{ await app.loadGraphData({path.read_text()}); "
                "return (await app.graphToPrompt()).output; })()")
            strip = lambda p: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}  # noqa: E731
            converted[path.stem] = (strip(output), strip(api))
        await browser.evaluate("app.loadGraphData()")  # back to the default graph
        await browser.evaluate("document.querySelectorAll('.p-dialog-close-button').forEach((b) => b.click())")

        await browser.evaluate("app.extensionManager.command.execute('Workspace.ToggleBottomPanelTab.tetriserve-board')")
        await browser.wait_for(f"{PANEL} && {PANEL}.querySelector('[data-stat=status]').textContent === 'live'", 30)

        # the prompt comes from this page's session, as a user's would; another client listens meanwhile
        client_id = await browser.evaluate("(async () => (await import('/scripts/api.js')).api.clientId)()")
        assert client_id, "the page has no client id"
        done = asyncio.Event()
        bystander = asyncio.ensure_future(collect_events(comfy.url, "bystander", lambda ev: done.is_set(), 300))
        await asyncio.sleep(1.0)
        prompt_id = await asyncio.to_thread(comfy.post, panel_prompt(), client_id)
        await submit_api_jobs(url)
        await browser.wait_for(f"{PANEL}.querySelectorAll('tbody tr').length >= 7", 30)
        await asyncio.sleep(4.0)  # some jobs done, some running, some still queued
        # on a busy machine the first deadline job may take longer: wait (bounded) until one has ended
        await browser.wait_for(f"{PANEL}.querySelector('[data-stat=sar]').textContent !== '–'", 60)
        shown = await browser.evaluate(f"""(() => {{
            const root = {PANEL};
            const canvas = root.querySelector('canvas');
            const ctx = canvas.getContext('2d');
            const img = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
            let painted = 0;
            for (let i = 0; i < img.length; i += 4) if (img[i + 3] > 0 && (img[i] + img[i + 1] + img[i + 2]) > 120) painted++;
            const stat = (k) => root.querySelector(`[data-stat=${{k}}]`).textContent;
            const scroll = root.querySelector('[data-role=jobs-scroll]');
            return {{ status: stat('status'), policy: stat('policy'), busy: stat('busy'), sar: stat('sar'),
                      table_scrolls: getComputedStyle(scroll).overflowY === 'auto',
                      panel_overflows: root.scrollHeight > root.clientHeight + 1,
                      mine_texts: [...root.querySelectorAll('[data-role=mine] > div[data-job]')].map(
                          (d) => d.textContent.replace(/^node #\\S+: /, '')),
                      rows: root.querySelectorAll('tbody tr').length,
                      late_rows: root.querySelectorAll('tbody tr.late').length,
                      mine: root.querySelectorAll('[data-role=mine] > div').length - 1,
                      painted: painted / (img.length / 4) }};
        }})()""")
        shown["labels"] = await browser.evaluate(  # what the panel draws beside each lane, from the proxied board
            "(async () => { const b = await (await fetch('/tetriserve/board')).json(); "
            "return b.gpu_ids.map((g) => globalThis.TetriServeBoard.deviceLabel(b, g)); })()")
        SCREENSHOT.parent.mkdir(exist_ok=True)
        await browser.screenshot(SCREENSHOT)
        shutil.copy(SCREENSHOT, tmp_path / SCREENSHOT.name)
        history = await asyncio.to_thread(comfy.history, prompt_id, 120)
        assert history["status"]["status_str"] == "success", json.dumps(history["status"])[-2000:]
        done.set()
        return shown, converted, await bystander
