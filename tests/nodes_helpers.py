"""Helpers for the node tests: the nodes package loaded without ComfyUI, a degree-forcing policy,
tiny ComfyUI-loadable checkpoints, and real services on real ports.

The policy and cost factories are for ``serve --policy nodes_helpers:degree_policy`` (the tests
put tests/ on the service's PYTHONPATH).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from comfy_tetriserve.types import Assignment, RoundPlan

from factories import PowerLawCost

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def load_nodes_package():
    """The repository's nodes/ folder as package ``tetriserve_nodes`` (its ComfyUI-free modules
    import without ComfyUI; ``comfy_nodes`` is never imported here)."""
    if "tetriserve_nodes" in sys.modules:
        return sys.modules["tetriserve_nodes"]
    spec = importlib.util.spec_from_file_location("tetriserve_nodes", ROOT / "nodes" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "nodes")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["tetriserve_nodes"] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class DegreeByPriorityPolicy:
    """Test policy: arrival order; a job runs on ``priority`` devices when that is 2, 4 or 8 (and
    allowed for its model), else on one; at most ``round_steps`` steps per assignment."""

    round_steps: int | None = 4
    name: str = "test-degree-by-priority"

    def plan_round(self, view, cost):
        used: set[int] = set()
        out = []
        for snap in view.plannable:
            r = snap.request
            k = r.priority if r.priority in (2, 4, 8) and r.priority in cost.allowed_degrees(r.model) else 1
            group = next((g for g in view.free_groups(k) if used.isdisjoint(g)), None)
            if group is None:
                continue
            used.update(group)
            steps = snap.steps_left if self.round_steps is None else min(self.round_steps, snap.steps_left)
            out.append(Assignment((snap.request_id,), group, steps))
        return RoundPlan(view.round_index, 0.0, tuple(out))


def degree_policy() -> DegreeByPriorityPolicy:
    return DegreeByPriorityPolicy()


def tiny_cost() -> PowerLawCost:
    """Prices for the CPU workers' tiny models (a few ms per step)."""
    return PowerLawCost(base_s=0.02)


# ---------------------------------------------------------------------------- models
def write_comfy_sd3(path: Path, seed: int = 3) -> Path:
    """A tiny random SD3 that ComfyUI's own loader detects (hidden 128 = 2 heads x 64, 2 blocks,
    SD3.5-style q/k norms), as a single file with ComfyUI's prefix, like a checkpoint in
    diffusion_models. Text width 32, pooled width 16."""
    from safetensors.torch import save_file

    from comfy_tetriserve.worker.convert import COMFY_PREFIX, from_diffusers
    from comfy_tetriserve.worker.tiny import TINY_SD3_CONFIG, random_model

    config = dict(TINY_SD3_CONFIG, attention_head_dim=64, num_attention_heads=2, caption_projection_dim=128,
                  dual_attention_layers=[])
    sd = from_diffusers("sd3", random_model(config, seed=seed).state_dict(), "sd3_single")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({COMFY_PREFIX + k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def write_tiny_flux(path: Path, seed: int = 5, variant: str = "") -> Path:
    """The engine's tiny FLUX-dev (ComfyUI's single-file layout; ComfyUI itself cannot load it:
    its FLUX detection fixes the width at 3072)."""
    from comfy_tetriserve.worker.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint("flux", "comfy", path, seed=seed, variant=variant)


# ---------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout_s: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def post_json(url: str, body: dict, timeout_s: float = 10.0):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read() or b"{}")


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log_path: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            get_json(url, 2.0)
            return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-4000:] if log_path else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout_s} s")
        time.sleep(0.2)


def stop(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM the process (its own session), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def start_service(tmp: Path, model_dir: Path, *, devices: str = "cpu:2", policy: str = "nodes_helpers:degree_policy",
                  cost: str = "nodes_helpers:tiny_cost", extra: tuple[str, ...] = ()) -> tuple[str, subprocess.Popen]:
    """``comfy-tetriserve serve`` (default: two CPU workers, the test policy); returns (url, process)."""
    port = free_port()
    log_path = tmp / f"service-{port}.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "comfy_tetriserve", "serve", "--port", str(port), "--devices", devices,
           "--model-dir", str(model_dir), "--dtype", "fp32", "--policy", policy, "--cost", cost, "--lease-s", "10",
           "--journal", str(tmp / f"history-{port}.sqlite3"), *extra]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/v1/health", proc, 120, log_path)
    except BaseException:
        stop(proc)
        raise
    return url, proc
