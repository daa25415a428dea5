"""``comfy-tetriserve selfcheck`` as a user runs it, and its schedules."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest

from comfy_tetriserve.worker.selfcheck import schedules
from comfy_tetriserve.plan import aligned_groups


def test_schedules_cover_degrees_and_both_handoff_paths():
    groups = aligned_groups((0, 1, 2, 3))
    plans = schedules(groups, (1, 2, 4), 6, random.Random(0))
    assert set(plans) == {"ref", "k2", "k4", "switching", "handoff"}
    assert plans["ref"] == [((0,), 6)] and plans["k2"] == [((0, 1), 6)] and plans["k4"] == [((0, 1, 2, 3), 6)]
    assert all(n == 1 for _, n in plans["switching"]) and len(plans["switching"]) == 6
    assert {len(g) for g, _ in plans["switching"]} == {1, 2, 4}
    # {0,1} -> {2,3}: no member holds the latent (the pool sends it); -> {0..3}: a member broadcasts it.
    assert plans["handoff"] == [((0, 1), 2), ((2, 3), 2), ((0, 1, 2, 3), 2)]
    assert sum(n for _, n in plans["handoff"]) == 6


@pytest.mark.slow
def test_selfcheck_command_on_four_cpu_workers(tmp_path):
    out = tmp_path / "selfcheck.json"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "comfy_tetriserve", "selfcheck", "--devices", "cpu:4",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) == {"flux", "sd3"}
    assert set(report["flux"]) == {"k2", "k4", "switching", "handoff", "fill", "kontext"}
    assert set(report["sd3"]) == {"k2", "k4", "switching", "handoff"}
    for family in ("flux", "sd3"):
        assert all(0 <= v <= 1e-5 for v in report[family].values()), report
    assert "PASS" in proc.stderr
    assert elapsed < 120, f"selfcheck took {elapsed:.0f} s"
