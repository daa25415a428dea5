"""A real service for the drills: tiny checkpoints, ``comfy-tetriserve serve`` as its own process on
loopback with CPU workers, its memory (RSS) and its workers' process ids.

The service runs exactly as on a studio box (the real command line, the real HTTP API, the real
worker pool and planner); only the models are tiny and the devices CPU cores.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

MODEL_FILES = {"flux": "tiny-flux.safetensors", "sd3": "tiny-sd3.safetensors"}


def prepare_models(folder: Path) -> dict[str, Path]:
    """Tiny FLUX (ComfyUI's prefixed BFL layout) and SD3 (single file) checkpoints, written once."""
    from ..worker.tiny import write_tiny_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for family, layout, seed in (("flux", "comfy", 1), ("sd3", "sd3_single", 2)):
        path = folder / MODEL_FILES[family]
        if not path.exists():
            tmp = write_tiny_checkpoint(family, layout, folder / f".{MODEL_FILES[family]}.tmp", seed=seed)
            os.replace(tmp, path)
        out[family] = path
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process (Linux /proc), None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class ServiceSettings:
    """What the drills start the service with (the flags of ``comfy-tetriserve serve``)."""

    workers: int = 2
    policy: str = "tetriserve"
    result_ttl_s: float = 5.0
    fetched_ttl_s: float = 1.0
    max_job_faults: int = 2
    rebuild_after_s: float = 5.0
    max_body_mb: float = 8.0
    body_timeout_s: float = 2.0
    lease_s: float = 30.0
    stall_timeout_s: float = 3.0  # the drill's hung workers (SIGSTOP) are found after this long
    extra: tuple[str, ...] = ()


@dataclass
class ServiceProcess:
    """``comfy-tetriserve serve`` on a free loopback port (a context manager)."""

    workdir: Path
    settings: ServiceSettings = field(default_factory=ServiceSettings)
    start_timeout_s: float = 300.0
    port: int = 0
    proc: subprocess.Popen | None = None
    models: dict[str, str] = field(default_factory=dict)  # model name (file name) -> path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "service.log"

    def command(self) -> list[str]:
        s = self.settings
        model_dir = self.workdir / "models"
        return [sys.executable, "-m", "comfy_tetriserve", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--devices", f"cpu:{s.workers}", "--dtype", "fp32", "--model-dir", str(model_dir),
                "--model", *[f"{name}={path}" for name, path in self.models.items()],
                "--policy", s.policy, "--cost", "h200", "--profile-as", "flux=flux-dev", "sd3=sd3-medium",
                "--result-ttl-s", str(s.result_ttl_s), "--fetched-ttl-s", str(s.fetched_ttl_s),
                "--max-job-faults", str(s.max_job_faults), "--rebuild-after-s", str(s.rebuild_after_s),
                "--max-body-mb", str(s.max_body_mb), "--body-timeout-s", str(s.body_timeout_s),
                "--lease-s", str(s.lease_s), "--stall-timeout-s", str(s.stall_timeout_s),
                # the drill kills devices on purpose, the same one several times: none is quarantined
                "--max-device-faults", "0",
                "--journal", str(self.workdir / "history.sqlite3"), *s.extra]

    def start(self) -> "ServiceProcess":
        paths = prepare_models(self.workdir / "models")
        self.models = {MODEL_FILES[family]: str(path) for family, path in paths.items()}
        self.port = self.port or free_port()
        env = dict(os.environ)
        env["TETRISERVE_HOME"] = str(self.workdir / "home")
        env.pop("TETRISERVE_TOKEN", None)  # loopback only, no token
        package_parent = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with code {self.proc.returncode}; log {self.log_path}:\n"
                                   + self.log_tail())
            if self._ready():
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service was not ready within {self.start_timeout_s:g} s; log {self.log_path}")
            time.sleep(0.25)

    def _ready(self) -> bool:
        """Healthy, with every configured model loaded on every worker."""
        try:
            with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as resp:
                listed = {m["name"]: m["status"] for m in json.loads(resp.read())["models"]}
        except (OSError, ValueError):
            return False
        return all(listed.get(name) == "loaded" for name in self.models)

    def log_tail(self, num_chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-num_chars:]
        except OSError:
            return ""

    def rss(self) -> int | None:
        return rss_bytes(self.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the service process alone, as a crash would (its workers leave when their pipes close)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """Graceful stop (SIGINT), then kill if it does not end in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # the workers are the service's children; they exit with it (daemon processes), but make sure
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
