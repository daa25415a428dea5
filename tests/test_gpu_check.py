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
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path), "--reps", "3", "--steps", "3"],
                          capture_output=True, text=True, timeout=600)
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
