"""The nodes' side of the scheduler service: which service, which model, one client per loop.

``TETRISERVE_MODEL`` values are ``ModelHandle``s: the service's address and the name under which
it serves the DiT, plus what the nodes need to build a job (family, widths, shift). ComfyUI never
loads the DiT; the service loads the same file from its own model folders (``serve --model-dir``,
on a studio box ComfyUI's diffusion_models folders).

Imports neither ComfyUI nor torch.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from dataclasses import dataclass

from comfy_tetriserve import config as config_module
from comfy_tetriserve.client import DEFAULT_URL, TetriServeClient, ensure_service
from comfy_tetriserve.errors import Conflict, NotFound, ServiceUnavailable
from comfy_tetriserve.sampling.names import WEIGHT_DTYPES as SERVICE_WEIGHT_DTYPES

log = logging.getLogger(__name__)

WEIGHT_DTYPES = ("default", *SERVICE_WEIGHT_DTYPES)
FAMILY_DEFAULT_SHIFT = {"sd3": 3.0, "flux": 1.15, "qwen_image": 1.15, "wan": 8.0}  # ComfyUI's sampling settings


@dataclass(frozen=True)
class ModelHandle:
    """A DiT held by the scheduler service (the TETRISERVE_MODEL socket type)."""

    url: str
    model: str  # the name the service knows it by (a file name in its model folders)
    family: str  # "flux" | "sd3" | "qwen_image" | "wan"
    dtype: str | None  # weight dtype asked for (None: the service's default)
    guidance_embeds: bool
    num_heads: int
    in_channels: int
    context_dim: int
    pooled_dim: int
    shift: float | None = None  # model-sampling shift; None = the family's default
    expert_model: str | None = None  # Wan 2.2 two-expert jobs: the low-noise model (this one is the high-noise)
    expert_boundary: float | None = None  # sigma below which steps run on expert_model
    loras: tuple[tuple[str, float], ...] = ()  # LoRA stack (file name in the loras folders, strength), in order

    def with_lora(self, name: str, strength: float) -> "ModelHandle":
        """This model with one more LoRA on its stack (the TetriServe LoRA node; strength 0 adds nothing)."""
        if strength == 0:
            return self
        return dataclasses.replace(self, loras=(*self.loras, (name, float(strength))))

    def lora_setting(self) -> list[dict]:
        return [{"name": n, "strength": s} for n, s in self.loras]

    @classmethod
    def from_entry(cls, url: str, entry: dict, dtype: str | None, shift: float | None) -> "ModelHandle":
        return cls(url=url, model=entry["name"], family=entry["family"], dtype=dtype,
                   guidance_embeds=bool(entry.get("guidance_embeds")), num_heads=int(entry["num_heads"]),
                   in_channels=int(entry["in_channels"]), context_dim=int(entry["context_dim"]),
                   pooled_dim=int(entry["pooled_dim"]), shift=shift)

    @property
    def effective_shift(self) -> float:
        if self.shift is not None:
            return self.shift
        if self.family == "flux" and not self.guidance_embeds:
            return 1.0  # FLUX-schnell (ComfyUI's FluxSchnell sampling settings)
        return FAMILY_DEFAULT_SHIFT[self.family]


def service_url() -> str:
    return (config_module.env("TETRISERVE_URL") or DEFAULT_URL).rstrip("/")


def model_name(comfy_name: str) -> str:
    """A ComfyUI file name (os.sep-separated, relative to a diffusion_models folder) as the service
    wants it ('/'-separated)."""
    return comfy_name.replace(os.sep, "/").replace("\\", "/")


def autostart_args(model_dirs: list[str], num_cuda: int, home_has_config: bool,
                   lora_dirs: list[str] | None = None) -> list[str] | None:
    """``serve`` arguments for a service started by ComfyUI (TETRISERVE_AUTOSTART=1).

    With ``<cache>/serve.json`` present that file decides (None: the client's default). Otherwise
    the service serves ComfyUI's diffusion_models folders on every CUDA device, or on one CPU
    worker on a machine without one.
    """
    if home_has_config:
        return None
    devices = f"cuda:0-{num_cuda - 1}" if num_cuda > 1 else ("cuda:0" if num_cuda == 1 else "cpu:1")
    args = ["--devices", devices]
    if model_dirs:
        args += ["--model-dir", *model_dirs]
    if lora_dirs:
        args += ["--lora-dir", *lora_dirs]
    return args


async def reach_service(url: str, serve_args: list[str] | None = None) -> str:
    """The URL of a service that answers, started if the user allowed auto-start; else a clear error."""
    try:
        return await ensure_service(url, serve_args=serve_args)
    except ServiceUnavailable as exc:
        raise ServiceUnavailable(f"TetriServe: {exc}") from None


async def load_on_service(client: TetriServeClient, name: str, dtype: str | None, *, shift: float | None = None,
                          comfy_folder: str | None = None) -> ModelHandle:
    """Make sure the service has ``name`` loaded (loading it from its model folders if needed)."""
    try:
        entry = await client.load_model(name, dtype)
    except NotFound:
        where = f" ComfyUI found it in {comfy_folder};" if comfy_folder else ""
        raise NotFound(f"TetriServe: the service at {client.url} has no model file {name!r} in its model folders."
                       f"{where} start the service with --model-dir pointing at that folder "
                       "(e.g. ComfyUI/models/diffusion_models)") from None
    except Conflict as exc:
        raise Conflict(f"TetriServe: the service at {client.url} could not load {name!r}: {exc}") from None
    if entry.get("status") != "loaded":
        raise Conflict(f"TetriServe: model {name!r} is {entry.get('status')} at the service: {entry.get('error')}")
    return ModelHandle.from_entry(client.url, entry, dtype, shift)


class ClientPool:
    """One client per (service URL, event loop): an HTTP session belongs to the loop that made it.
    Clients of closed loops are dropped."""

    def __init__(self, **client_kwargs) -> None:
        self._kwargs = client_kwargs
        self._clients: dict[tuple[str, int], tuple[TetriServeClient, asyncio.AbstractEventLoop]] = {}

    def get(self, url: str, loop: asyncio.AbstractEventLoop | None = None) -> TetriServeClient:
        loop = loop or asyncio.get_running_loop()
        for key in [k for k, (_, owner) in self._clients.items() if owner.is_closed()]:
            del self._clients[key]
        key = (url, id(loop))
        if key not in self._clients:
            self._clients[key] = (TetriServeClient(url, **self._kwargs), loop)
        return self._clients[key][0]
