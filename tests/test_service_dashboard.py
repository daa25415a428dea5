"""The dashboard page's script runs against a real board document (node, with a stub DOM and canvas)."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import textwrap

import aiohttp
import pytest

from factories import PowerLawCost
from service_helpers import FifoPolicy, follow_events, job_body, make_service_app, running_service, submit_json
from comfy_tetriserve.service.routes import STATIC_DIR

STUB = textwrap.dedent("""
    const fs = require("fs");
    const board = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
    const calls = [];
    const ctx = new Proxy({}, {
      get(target, name) {
        if (name in target) return target[name];
        return (...args) => { calls.push([name, ...args]); };
      },
      set(target, name, value) { target[name] = value; return true; },
    });
    const elements = {};
    const element = (id) => elements[id] || (elements[id] = {
      id, textContent: "", className: "", clientWidth: 1000, clientHeight: 300, children: [],
      getContext: () => ctx, replaceChildren(...c) { this.children = c; }, appendChild(c) { this.children.push(c); },
    });
    global.document = { getElementById: element, createElement: (tag) => ({ tag, children: [], className: "",
      innerHTML: "", appendChild(c) { this.children.push(c); } }) };
    global.window = { devicePixelRatio: 1 };
    global.localStorage = { getItem: () => "", setItem: () => {} };
    global.prompt = () => null;
    global.setInterval = () => 0;
    global.fetch = async () => ({ status: 200, ok: true, json: async () => board });
    require(process.argv[3]);
    setTimeout(() => {
      const rows = elements.jobs.children;
      console.log(JSON.stringify({
        status: elements.status.textContent, sar: elements.sar.textContent, busy: elements.busy.textContent,
        rects: calls.filter((c) => c[0] === "fillRect").length,
        outlines: calls.filter((c) => c[0] === "strokeRect").length,
        triangles: calls.filter((c) => c[0] === "fill").length,
        rows: rows.length, late_rows: rows.filter((r) => r.className === "late").length,
      }));
    }, 50);
""")


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: the dashboard script is not run")
def test_dashboard_script_draws_the_board(tmp_path):
    async def board_document():
        app, _ = make_service_app(num_gpus=2, policy=FifoPolicy(round_steps=5), cost=PowerLawCost(base_s=0.04))
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            ids = []
            for deadline, steps in ((30, 10), (0.01, 12), (None, 6)):
                _, r = await submit_json(s, url, job_body({"steps": steps, "deadline_s": deadline}, res=512))
                ids.append(r["job_id"])
            for job_id in ids:
                await follow_events(s, url, job_id)
            async with s.get(url + "/v1/board") as resp:
                return await resp.json()

    board = asyncio.run(board_document())
    assert len(board["assignments"]) >= 6 and sum(j["late"] for j in board["jobs"]) == 1
    (tmp_path / "board.json").write_text(json.dumps(board))
    (tmp_path / "stub.js").write_text(STUB)
    proc = subprocess.run(["node", str(tmp_path / "stub.js"), str(tmp_path / "board.json"),
                           str(STATIC_DIR / "board.js")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "live"
    assert out["sar"].startswith("50.0 %") and "(1/2)" in out["sar"]
    assert out["busy"] == "0/2"
    assert out["rows"] == 3 and out["late_rows"] == 1
    # one bar per assignment and device, lane frames are strokes, the late job's bars are outlined
    assert out["rects"] >= len(board["assignments"])
    assert out["outlines"] >= 2 + 1
    assert out["triangles"] >= 1  # deadline marks inside the window
