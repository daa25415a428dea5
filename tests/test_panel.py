"""The board panel's ComfyUI-side routes (against a real service) and its scripts (with node)."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import textwrap

import aiohttp
import pytest
from aiohttp import web

from comfy_tetriserve.client import TetriServeClient
from comfy_tetriserve.service.routes import STATIC_DIR
from nodes_helpers import ROOT, load_nodes_package
from service_helpers import FifoPolicy, follow_events, free_port, job_body, make_service_app, running_service, submit_json

load_nodes_package()
from tetriserve_nodes.panel import BOARD_JS, add_panel_routes  # noqa: E402

needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: panel scripts not run")


async def comfy_side(service_url: str):
    """An aiohttp app with only the panel's routes, as ComfyUI would host them."""
    routes = web.RouteTableDef()
    add_panel_routes(routes, lambda: TetriServeClient(service_url, retries=0, timeout_s=5.0))
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def test_routes_proxy_the_board_and_health_and_serve_the_drawing_code():
    async def main():
        app, _ = make_service_app(num_gpus=2, policy=FifoPolicy(round_steps=3))
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            _, job = await submit_json(s, url, job_body({"steps": 6, "deadline_s": 20}))
            await follow_events(s, url, job["job_id"])
            runner, comfy = await comfy_side(url)
            try:
                async with s.get(comfy + "/tetriserve/board?window_s=30") as r:
                    board = (r.status, await r.json())
                async with s.get(comfy + "/tetriserve/board?window_s=0") as r:
                    bad = (r.status, await r.json())
                async with s.get(comfy + "/tetriserve/health") as r:
                    health = (r.status, await r.json())
                async with s.get(comfy + "/tetriserve/board.js") as r:
                    script = (r.status, r.headers["Content-Type"], await r.read())
            finally:
                await runner.cleanup()
        return url, board, bad, health, script

    url, (status, board), (bad_status, bad), (h_status, health), (js_status, js_type, js) = asyncio.run(main())
    assert status == 200 and board["service_url"] == url and board["window_s"] == 30
    assert board["jobs"][0]["status"] == "finished" and len(board["assignments"]) == 2 and board["gpu_ids"] == [0, 1]
    assert bad_status == 400 and "window_s" in bad["error"]["message"]
    assert h_status == 200 and health["status"] == "ok" and health["service_url"] == url
    assert js_status == 200 and js_type.startswith("text/javascript") and js == (STATIC_DIR / "board.js").read_bytes()
    assert BOARD_JS == STATIC_DIR / "board.js"


def test_routes_answer_503_with_a_message_when_the_service_is_down():
    async def main():
        url = f"http://127.0.0.1:{free_port()}"
        runner, comfy = await comfy_side(url)
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(comfy + "/tetriserve/board") as r:
                    return url, r.status, await r.json()
        finally:
            await runner.cleanup()

    url, status, doc = asyncio.run(main())
    assert status == 503 and doc["service_url"] == url and "unreachable" in doc["error"]["message"]


EMBED_STUB = textwrap.dedent("""
    const fs = require("fs");
    const board = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
    let fetches = 0, intervals = 0;
    const calls = [];
    const ctx = new Proxy({}, { get(t, n) { return n in t ? t[n] : (...a) => { calls.push(n); }; },
                                set(t, n, v) { t[n] = v; return true; } });
    global.document = { getElementById: () => { throw new Error("embedded board.js touched the page"); },
      createElement: (tag) => ({ tag, children: [], className: "", innerHTML: "", appendChild(c) { this.children.push(c); } }) };
    global.window = { devicePixelRatio: 2 };
    global.localStorage = { getItem: () => "" };
    global.fetch = async () => { fetches++; return {}; };
    global.setInterval = () => { intervals++; };
    globalThis.TETRISERVE_BOARD_EMBED = true;
    require(process.argv[3]);
    const lib = globalThis.TetriServeBoard;
    const canvas = { clientWidth: 800, clientHeight: 200, getContext: () => ctx };
    lib.draw(board, canvas);
    const tbody = { children: [], replaceChildren(...c) { this.children = c; } };
    lib.table(board, tbody);
    console.log(JSON.stringify({ fetches, intervals, width: canvas.width, rects: calls.filter((c) => c === "fillRect").length,
      rows: tbody.children.length, late: tbody.children.filter((r) => r.className === "late").length,
      summary: lib.summary(board), columns: lib.COLUMNS.length }));
""")


@needs_node
def test_board_js_embedded_draws_on_a_given_canvas_and_leaves_the_page_alone(tmp_path):
    board = {"now_at": 1000.0, "window_s": 60, "policy": "tetriserve", "gpu_ids": [0, 1], "busy_gpu_ids": [1],
             "assignments": [{"job_ids": ["j-a-1"], "gpu_ids": [0, 1], "started_at": 990.0, "expected_end_at": 995.0,
                              "finished_at": 994.0, "error": None},
                             {"job_ids": ["j-a-2"], "gpu_ids": [1], "started_at": 996.0, "expected_end_at": 1004.0,
                              "finished_at": None, "error": None}],
             "jobs": [{"job_id": "j-a-1", "tenant": "a", "model": "m", "width": 512, "height": 512, "batch": 1,
                       "status": "finished", "steps_done": 8, "num_steps": 8, "gpu_ids": [0, 1], "deadline_at": 993.0,
                       "predicted_finish_at": None, "slack_s": -1.0, "late": True, "simulated": False},
                      {"job_id": "j-a-2", "tenant": "b", "model": "m", "width": 512, "height": 512, "batch": 1,
                       "status": "running", "steps_done": 2, "num_steps": 8, "gpu_ids": [1], "deadline_at": 1010.0,
                       "predicted_finish_at": 1004.0, "slack_s": 6.0, "late": False, "simulated": False}],
             "sar": {"overall": 0.0, "num_met": 0, "num_deadline_jobs": 1}}
    (tmp_path / "board.json").write_text(json.dumps(board))
    (tmp_path / "stub.js").write_text(EMBED_STUB)
    proc = subprocess.run(["node", str(tmp_path / "stub.js"), str(tmp_path / "board.json"), str(BOARD_JS)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["fetches"] == 0 and out["intervals"] == 0  # no page of its own when embedded
    assert out["width"] == 1600 and out["rects"] == 3  # 2 + 1 device lanes with bars, at devicePixelRatio 2
    assert out["rows"] == 2 and out["late"] == 1 and out["columns"] == 10
    assert out["summary"] == {"sar": "0.0 % (0/1)", "policy": "tetriserve", "busy": "1/2", "open": "1"}


@needs_node
def test_panel_module_parses(tmp_path):
    module = tmp_path / "tetriserve_panel.mjs"
    shutil.copy(ROOT / "web" / "tetriserve_panel.js", module)
    proc = subprocess.run(["node", "--check", str(module)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
