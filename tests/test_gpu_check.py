"""scripts/gpu_check.py runs end to end on CPU with tiny models (the GPU run is the same code)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_tiny_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path), "--reps", "3", "--steps", "3",
                           "--budget-s", "1000"],
                          capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "tiny-cpu" and report["all_ok"] is True
    for family in ("flux", "sd3"):
        r = report[family]
        for key in ("bare_forward_ms", "engine_forward_ms", "engine_step_ms", "step_over_bare_ratio",
                    "k1_gloo_step_ms", "k2_gloo_step_ms"):
            assert isinstance(r[key], float) and r[key] > 0, (family, key, r[key])
        assert 0 <= r["k2_gloo_rel_err"] <= 1e-2 and r["rel_err_ok"] is True
        assert r["ratio_ok"] is None  # judged at real size only
        for px in ("64", "128"):  # phase D: eager measured, capture needs CUDA
            assert r["graphs"][px]["eager_ms"] > 0 and "CUDA" in r["graphs"][px]["captured_ms"]
    # phase E: the profile measured by the engine itself, a loadable cost model
    from comfy_tetriserve.cost import ProfileCostModel, load_profile

    prof = report["engine_profile"]
    assert prof["cuda_graphs"] is False and prof["rows"] == 4
    cost = ProfileCostModel(load_profile(tmp_path / "profile-engine.json"))
    assert cost.step_time_s("tiny-flux", 128, 128, 1, 1) > 0 and cost.capture_steps == 0.0
