"""``comfy-tetriserve profile``: argument parsing and the written table."""
from __future__ import annotations

import subprocess
import sys

import pytest

from comfy_tetriserve.cost import load_profile
from comfy_tetriserve.worker.profile import parse_models, parse_resolution
from comfy_tetriserve.errors import InvalidRequest


def test_parse_resolution_and_models():
    assert parse_resolution("1024") == (1024, 1024)
    assert parse_resolution("768x1344") == (768, 1344)
    for bad in ("1000", "abc", "0", "512xz", "-16"):
        with pytest.raises(InvalidRequest):
            parse_resolution(bad)
    assert parse_models(["flux=/m/f.safetensors", "x=random:flux-dev"]) == {
        "flux": "/m/f.safetensors", "x": "random:flux-dev"}
    with pytest.raises(InvalidRequest, match="NAME=PATH"):
        parse_models(["flux"])


@pytest.mark.slow
def test_profile_command_writes_a_planner_table(tmp_path):
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "-m", "comfy_tetriserve", "profile", "--devices", "cpu:2",
                           "--model", "tiny=random:tiny-sd3", "--res", "64", "--steps", "2", "--warmup", "1",
                           "--dtype", "fp32", "--loaded", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = load_profile(out)
    assert set(table.models) == {"tiny"} and table.models["tiny"].num_text_tokens == 333
    assert sorted(r.sp_degree for r in table.rows) == [1, 2]
    assert all(r.includes_comm and r.height == r.width == 64 for r in table.rows)
    assert "2 x cpu" in table.device
    # --loaded: measured with the other device busy, and the parallel capacity of the two workers
    assert "loaded" in table.how and table.extra["parallel_capacity"] in (1, 2)
    assert set(table.extra["step_ms_by_busy_devices"]) == {"1", "2"}


def test_parallel_capacity_from_steps_with_more_devices_busy():
    from comfy_tetriserve.worker.profile import capacity_extra, capacity_from

    cpu_box = {1: 0.082, 2: 0.082, 3: 0.116, 4: 0.168}  # four workers on two cores (demo profile)
    assert capacity_from(cpu_box) == 2
    assert capacity_from({1: 0.02, 2: 0.021, 3: 0.02, 4: 0.022}) == 4  # real devices
    assert capacity_from({1: 0.02, 2: 0.04, 3: 0.021, 4: 0.02}) == 1  # the first slow count decides
    extra = capacity_extra(cpu_box, "tiny 768x768")
    assert extra["parallel_capacity"] == 2 and extra["step_ms_by_busy_devices"] == {
        "1": 82.0, "2": 82.0, "3": 116.0, "4": 168.0}


def test_background_load_runs_on_disjoint_groups_of_the_same_size():
    from comfy_tetriserve.worker.profile import load_groups
    from comfy_tetriserve.plan import aligned_groups

    groups = aligned_groups(range(4))
    assert load_groups(groups, (0,)) == [(1,), (2,), (3,)]
    assert load_groups(groups, (2, 3)) == [(0, 1)]
    assert load_groups(groups, (0, 1, 2, 3)) == []
