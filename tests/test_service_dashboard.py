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


LIB_STUB = textwrap.dedent("""
    const fs = require("fs");
    const board = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
    globalThis.TETRISERVE_BOARD_EMBED = true;
    global.window = { devicePixelRatio: 1 };
    require(process.argv[3]);
    const lib = globalThis.TetriServeBoard;
    const texts = [];
    const ctx = new Proxy({}, { get(t, name) { return name in t ? t[name]
      : (...args) => { if (name === "fillText") texts.push(args[0]); }; }, set(t, n, v) { t[n] = v; return true; } });
    lib.draw(board, { clientWidth: 1000, clientHeight: 300, getContext: () => ctx });
    const colours = Array.from({ length: 12 }, (_, i) => lib.colour(`j-x-${i}`));
    const job = board.jobs[0];
    const later = { ...board, now_at: board.now_at + 2 };
    console.log(JSON.stringify({
      texts, colours, again: lib.colour("j-x-3"), span: lib.timeSpan(board),
      phase_now: lib.phaseText(job, board.now_at), phase_later: lib.phaseText(job, later.now_at),
    }));
""")


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: the board script is not run")
def test_board_labels_devices_gives_concurrent_jobs_distinct_colours_and_fits_its_time_axis(tmp_path):
    async def board_document():
        app, _ = make_service_app(num_gpus=2, policy=FifoPolicy(round_steps=2), cost=PowerLawCost(base_s=0.04),
                                  time_scale=20.0)
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            await submit_json(s, url, job_body({"steps": 50, "deadline_s": 40}, res=512))
            await asyncio.sleep(0.5)
            async with s.get(url + "/v1/board") as resp:
                return await resp.json()

    board = asyncio.run(board_document())
    assert board["device_labels"] == {"0": "sim 0", "1": "sim 1"}
    assert board["jobs"][0]["status"] == "running"
    board["jobs"][0]["predicted_finish_at"] = board["now_at"] + 30.0  # a prediction well ahead, for the text below
    (tmp_path / "board.json").write_text(json.dumps(board))
    (tmp_path / "lib.js").write_text(LIB_STUB)
    proc = subprocess.run(["node", str(tmp_path / "lib.js"), str(tmp_path / "board.json"),
                           str(STATIC_DIR / "board.js")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert "sim 0" in out["texts"] and "sim 1" in out["texts"] and not any(t.startswith("GPU") for t in out["texts"])
    hues = [int(c[4:c.index(",")]) for c in out["colours"]]
    gaps = [min(abs(a - b), 360 - abs(a - b)) for i, a in enumerate(hues) for b in hues[i + 1:]]
    assert min(gaps) >= 10 and out["again"] == out["colours"][3]  # distinct, and stable per job
    # the axis spans what is there: from just before the job's submission (seconds ago) to just after its
    # deadline (40 s ahead), not the fixed 45 s back / 15 s ahead of a 60 s window
    lo, hi = out["span"]
    job = board["jobs"][0]
    assert lo <= job["submitted_at"] and job["deadline_at"] <= hi <= job["deadline_at"] + 5
    assert board["now_at"] - lo < 10
    # the phase text is computed from the board's clock: two seconds later it says two seconds less
    assert "finish in" in out["phase_now"] and out["phase_now"] != out["phase_later"]
    now_s = float(out["phase_now"].split("finish in ")[1].split(" s")[0])
    later_s = float(out["phase_later"].split("finish in ")[1].split(" s")[0])
    assert now_s == 30.0 and later_s == 28.0
