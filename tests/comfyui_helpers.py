"""Running a real ComfyUI for the tests: a sandbox folder, processes, prompts, websocket events.

The sandbox holds an extra_model_paths.yaml that adds this repository as a custom node pack
(a symlink named comfy_tetriserve), the test node pack, a diffusion_models folder with the tiny
models and a vae_approx folder with random-weight tiny autoencoders. ComfyUI's own checkout is
never written to (outputs, inputs, temp and user folders are in the sandbox too).
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from nodes_helpers import ROOT, TESTS, free_port, get_json, post_json, stop, wait_http, write_comfy_sd3, write_tiny_flux

TINY_TEXT = {"flux": (32, 16), "sd3": (32, 16)}  # (context width, pooled width) of the tiny models
BINARY_TEXT = 3  # protocol.BinaryEventTypes.TEXT: progress text of a node


def comfyui_paths() -> tuple[Path, Path]:
    comfy_dir, comfy_python = os.environ.get("TETRISERVE_COMFYUI"), os.environ.get("TETRISERVE_COMFYUI_PYTHON")
    if not comfy_dir or not comfy_python:
        pytest.skip("no ComfyUI configured: set TETRISERVE_COMFYUI (a checkout) and TETRISERVE_COMFYUI_PYTHON "
                    "(its venv's python) to run the ComfyUI tests")
    if not (Path(comfy_dir) / "main.py").exists() or not Path(comfy_python).exists():
        pytest.skip(f"TETRISERVE_COMFYUI={comfy_dir} / TETRISERVE_COMFYUI_PYTHON={comfy_python} do not exist")
    return Path(comfy_dir), Path(comfy_python)


@dataclass
class Sandbox:
    root: Path
    comfy_dir: Path
    comfy_python: Path

    @property
    def models(self) -> Path:
        return self.root / "diffusion_models"

    def yaml(self) -> Path:
        return self.root / "extra_model_paths.yaml"


def make_sandbox(root: Path) -> Sandbox:
    comfy_dir, comfy_python = comfyui_paths()
    box = Sandbox(root, comfy_dir, comfy_python)
    (root / "custom_nodes").mkdir(parents=True, exist_ok=True)
    os.symlink(ROOT, root / "custom_nodes" / "comfy_tetriserve")
    os.symlink(TESTS / "comfyui_nodes_for_tests", root / "custom_nodes" / "tetriserve_test_nodes")
    write_comfy_sd3(box.models / "tiny_sd3.safetensors")
    write_tiny_flux(box.models / "tiny_flux.safetensors")
    write_tiny_flux(box.models / "tiny_flux_fill.safetensors", variant="fill")
    proc = subprocess.run([str(comfy_python), str(TESTS / "comfyui_tools.py"), str(comfy_dir), "taesd",
                           str(root / "vae_approx")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    box.yaml().write_text(
        "tetriserve_test:\n"
        f"    base_path: {root}\n"
        "    custom_nodes: custom_nodes\n"
        "    diffusion_models: diffusion_models\n"
        "    vae_approx: vae_approx\n", encoding="utf-8")
    return box


@dataclass
class ComfyUI:
    url: str
    proc: subprocess.Popen
    log_path: Path
    output_dir: Path

    def post(self, prompt: dict, client_id: str = "tetriserve-test") -> str:
        try:
            return post_json(self.url + "/prompt", {"prompt": prompt, "client_id": client_id})["prompt_id"]
        except Exception as exc:  # noqa: BLE001 - show ComfyUI's validation message
            body = getattr(exc, "read", lambda: b"")().decode(errors="replace")
            raise AssertionError(f"POST /prompt refused: {exc} {body}") from None

    def history(self, prompt_id: str, timeout_s: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            entry = get_json(f"{self.url}/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("status_str") in ("success", "error")):
                return entry
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not end within {timeout_s} s; log:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


def start_comfyui(box: Sandbox, service_url: str, name: str) -> ComfyUI:
    port = free_port()
    work = box.root / name
    for sub in ("output", "input", "temp", "user/default"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    # a browser opening this ComfyUI is not a first-time user: no template or missing-model dialogs
    (work / "user" / "default" / "comfy.settings.json").write_text(json.dumps({
        "Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
        "Comfy.Workflow.ShowMissingNodesWarning": False}), encoding="utf-8")
    log_path = work / "comfyui.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETRISERVE_")}
    env.update(TETRISERVE_URL=service_url, TETRISERVE_HOME=str(work / "home"), PYTHONUNBUFFERED="1")
    cmd = [str(box.comfy_python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--database-url", "sqlite:///:memory:", "--disable-auto-launch", "--extra-model-paths-config",
           str(box.yaml()), "--output-directory", str(work / "output"), "--input-directory", str(work / "input"),
           "--temp-directory", str(work / "temp"), "--user-directory", str(work / "user")]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=box.comfy_dir, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/system_stats", proc, 180, log_path)
    except BaseException:
        stop(proc)
        raise
    return ComfyUI(url, proc, log_path, work / "output")


# ------------------------------------------------------------------------- workflows
def load_api_workflow(name: str) -> dict:
    return json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text(encoding="utf-8"))


def runnable_here(prompt: dict, family: str, *, steps: int = 6, scale: int = 8, tokens: int = 8) -> dict:
    """A shipped API workflow made runnable on this machine: text encoders become the test pack's
    conditioning node (same text), the DiT and VAE become the tiny test models, sizes shrink by
    ``scale`` and samplers run ``steps`` steps. Everything else (FluxGuidance, ConditioningZeroOut,
    the TetriServe nodes and their settings) stays as shipped."""
    context_dim, pooled_dim = TINY_TEXT[family]
    out = copy.deepcopy(prompt)
    for node_id, node in list(out.items()):
        cls, inputs = node["class_type"], node["inputs"]
        if cls in ("DualCLIPLoader", "TripleCLIPLoader", "CLIPLoader"):
            del out[node_id]
        elif cls == "CLIPTextEncode":
            out[node_id] = {"class_type": "TetriServeTestConditioning",
                            "inputs": {"text": inputs["text"], "tokens": tokens, "context_dim": context_dim,
                                       "pooled_dim": pooled_dim, "seed": 0}}
        elif cls == "TetriServeLoadDiT":
            inputs.update(unet_name=f"tiny_{family}.safetensors", weight_dtype="fp32")
        elif cls == "VAELoader":
            inputs["vae_name"] = "taef1" if family == "flux" else "taesd3"
        elif cls == "EmptySD3LatentImage":
            inputs.update(width=max(inputs["width"] // scale // 16 * 16, 32),
                          height=max(inputs["height"] // scale // 16 * 16, 32))
        elif cls == "TetriServeSampler":
            inputs["steps"] = steps
    return out


# ------------------------------------------------------------------------- websocket
@dataclass
class Events:
    json: list[dict] = field(default_factory=list)
    texts: list[tuple[str, str]] = field(default_factory=list)  # (node, progress text)

    def of(self, kind: str) -> list[dict]:
        return [e["data"] for e in self.json if e.get("type") == kind]


async def collect_events(url: str, client_id: str, stop_when, timeout_s: float = 180.0) -> Events:
    """Read ComfyUI's websocket for ``client_id`` until ``stop_when(events)`` is true."""
    events = Events()
    ws_url = url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, heartbeat=20) as ws:
        deadline = time.monotonic() + timeout_s
        while not stop_when(events):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"websocket: condition not met within {timeout_s} s "
                                     f"({len(events.json)} events, last {events.json[-3:]})")
            try:
                msg = await ws.receive(timeout=min(left, 5.0))
            except asyncio.TimeoutError:
                continue
            if msg.type == aiohttp.WSMsgType.TEXT:
                events.json.append(json.loads(msg.data))
            elif msg.type == aiohttp.WSMsgType.BINARY and len(msg.data) >= 8:
                (kind,) = struct.unpack(">I", msg.data[:4])
                if kind == BINARY_TEXT:
                    (n,) = struct.unpack(">I", msg.data[4:8])
                    events.texts.append((msg.data[8:8 + n].decode(), msg.data[8 + n:].decode(errors="replace")))
            elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                break
    return events
