"""The TetriServe nodes (ComfyUI V3 API) and the board panel's routes. Imported only inside ComfyUI.

- **TetriServe Load DiT** asks the scheduler service to load a file from ComfyUI's
  diffusion_models folders (the service reads the same folders) and outputs a TETRISERVE_MODEL.
  ComfyUI never loads the DiT.
- **TetriServe Sampler** is the KSampler of that model: ComfyUI's own noise
  (comfy.sample.prepare_noise), sigmas (comfy.samplers.KSampler on a model-sampling object of the
  model's family and shift), empty-latent and latent-format rules, with the denoising done by the
  service under a deadline and priority. Progress, phase text and the predicted finish show on the
  node; ComfyUI's interrupt, a failing sibling node or the prompt's end cancel the job.

All service I/O runs on the server's event loop (see jobs.py for why).
"""
from __future__ import annotations

import asyncio
import logging
import os
from types import SimpleNamespace
from typing import Any, Awaitable, Callable, TypeVar

import torch

import comfy.cli_args
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.supported_models
import comfy.utils
import folder_paths
from comfy_api.latest import ComfyExtension, io
from server import PromptServer

from comfy_tetriserve import config as config_module
from comfy_tetriserve.client import TetriServeClient
from comfy_tetriserve.sampling.names import SAMPLER_NAMES as SERVICE_SAMPLERS

from .conditioning import ConditioningError, job_conditioning, own_tensor
from .jobs import JobProgress, deadline_setting, sample_remote
from .panel import add_panel_routes
from .service import (WEIGHT_DTYPES, ClientPool, ModelHandle, autostart_args, load_on_service, model_name,
                      reach_service, service_url)

log = logging.getLogger(__name__)
T = TypeVar("T")

CATEGORY = "TetriServe"
EVENT = "tetriserve.job"  # pushed to the browsers on every change of a job's progress
TetriServeModel = io.Custom("TETRISERVE_MODEL")

SAMPLER_NAMES = [name for name in SERVICE_SAMPLERS if name in comfy.samplers.KSampler.SAMPLERS]
_CLIENTS = ClientPool()
_PANEL_CLIENTS = ClientPool(retries=0, timeout_s=5.0)


# ----------------------------------------------------------------------------- helpers
def _io_loop() -> asyncio.AbstractEventLoop | None:
    """The server's loop (always running while ComfyUI serves), or None outside a server."""
    server = getattr(PromptServer, "instance", None)
    loop = getattr(server, "loop", None)
    return loop if loop is not None and loop.is_running() else None


async def _on_io_loop(url: str, fn: Callable[[TetriServeClient], Awaitable[T]]) -> T:
    """Run ``fn(client)`` on the server's loop, polling ComfyUI's interrupt meanwhile."""
    loop, here = _io_loop(), asyncio.get_running_loop()
    if loop is None or loop is here:
        return await fn(_CLIENTS.get(url))

    async def call() -> T:
        return await fn(_CLIENTS.get(url))

    future = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), loop))
    try:
        while not future.done():
            comfy.model_management.throw_exception_if_processing_interrupted()
            await asyncio.wait({future}, timeout=0.1)
        return future.result()
    finally:
        future.cancel()


def _autostart_args() -> list[str] | None:
    num_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    has_config = (config_module.home_dir() / "serve.json").exists()
    return autostart_args(folder_paths.get_folder_paths("diffusion_models"), num_cuda, has_config)


class _ModelView:
    """The two objects ComfyUI's sampling helpers read from a model (comfy.sample.fix_empty_latent_channels,
    comfy.samplers.KSampler's sigmas), for a model that lives in the service."""

    def __init__(self, handle: ModelHandle) -> None:
        if handle.family == "sd3":
            self.latent_format = comfy.latent_formats.SD3()
            settings, model_type = dict(comfy.supported_models.SD3.sampling_settings), comfy.model_base.ModelType.FLOW
        elif handle.guidance_embeds:
            self.latent_format = comfy.latent_formats.Flux()
            settings, model_type = dict(comfy.supported_models.Flux.sampling_settings), comfy.model_base.ModelType.FLUX
        else:  # FLUX-schnell: discrete flow with multiplier 1
            self.latent_format = comfy.latent_formats.Flux()
            settings = dict(comfy.supported_models.FluxSchnell.sampling_settings)
            model_type = comfy.model_base.ModelType.FLOW
        settings["shift"] = handle.effective_shift
        self.model_sampling = comfy.model_base.model_sampling(SimpleNamespace(sampling_settings=settings), model_type)

    def get_model_object(self, name: str) -> Any:
        if name == "latent_format":
            return self.latent_format
        if name == "model_sampling":
            return self.model_sampling
        raise KeyError(name)


def _tenant() -> str:
    return f"comfyui-{comfy.cli_args.args.port}"


def _prompt_id() -> str | None:
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    context = get_executing_context()
    return context.prompt_id if context is not None else None


# ------------------------------------------------------------------------------- nodes
class TetriServeLoadDiT(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TetriServeLoadDiT",
            display_name="TetriServe Load DiT",
            category=CATEGORY,
            description="Has the TetriServe scheduler service load a FLUX or SD3 diffusion model from ComfyUI's "
                        "diffusion_models folders (the service reads the same folders). ComfyUI itself never "
                        "loads it.",
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="a FLUX or SD3 file from the diffusion_models folders"),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="weight dtype on the service's devices; default: the service's setting"),
                io.Float.Input("shift", default=0.0, min=0.0, max=100.0, step=0.01,
                               tooltip="model-sampling shift; 0 = the family's default (SD3 3.0, FLUX-dev 1.15, "
                                       "FLUX-schnell 1.0), as ModelSamplingSD3 / ModelSamplingFlux set it"),
            ],
            outputs=[TetriServeModel.Output(display_name="model")],
        )

    @classmethod
    async def execute(cls, unet_name: str, weight_dtype: str, shift: float) -> io.NodeOutput:
        url = service_url()
        name = model_name(unet_name)
        dtype = None if weight_dtype == "default" else weight_dtype
        folder = next((d for d in folder_paths.get_folder_paths("diffusion_models")
                       if os.path.isfile(os.path.join(d, unet_name))), None)
        serve_args = _autostart_args()

        async def load(client: TetriServeClient) -> ModelHandle:
            await reach_service(url, serve_args)
            return await load_on_service(client, name, dtype, shift=shift or None, comfy_folder=folder)

        handle = await _on_io_loop(url, load)
        log.info("TetriServe: %s (%s) loaded at %s", handle.model, handle.family, url)
        return io.NodeOutput(handle)


class TetriServeSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TetriServeSampler",
            display_name="TetriServe Sampler",
            category=CATEGORY,
            description="The KSampler of a TetriServe model: denoising runs on the shared GPUs of the scheduler "
                        "service, which plans all jobs on the box to meet their deadlines.",
            inputs=[
                TetriServeModel.Input("model"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=SAMPLER_NAMES),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS)),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Float.Input("deadline_s", default=0.0, min=0.0, max=86400.0, step=0.5,
                               tooltip="seconds from submission to finish by; 0 = best effort"),
                io.Int.Input("priority", default=0, min=-1000, max=1000,
                             tooltip="for policies that weigh jobs (higher first)"),
            ],
            outputs=[io.Latent.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    async def execute(cls, model: ModelHandle, seed: int, steps: int, cfg: float, sampler_name: str,
                      scheduler: str, positive: Any, negative: Any, latent_image: dict, denoise: float,
                      deadline_s: float, priority: int) -> io.NodeOutput:
        if not isinstance(model, ModelHandle):
            raise ValueError("TetriServe Sampler needs a model from TetriServe Load DiT")
        if latent_image.get("noise_mask") is not None:
            raise ValueError("TetriServe Sampler does not apply latent noise masks (SetLatentNoiseMask, or "
                             "InpaintModelConditioning with noise_mask on); for FLUX Fill set noise_mask to false "
                             "(the mask still reaches the model), or use the stock KSampler")
        node_id = cls.hidden.unique_id
        view = _ModelView(model)
        samples = comfy.sample.fix_empty_latent_channels(view, latent_image["samples"])
        noise = comfy.sample.prepare_noise(samples, seed, latent_image.get("batch_index"))
        sigmas = comfy.samplers.KSampler(view, steps=steps, device="cpu", sampler=sampler_name,
                                         scheduler=scheduler, denoise=denoise).sigmas
        if sigmas.numel() < 2:  # denoise 0: ComfyUI returns the latent unchanged
            return io.NodeOutput(latent_image.copy())
        try:
            cond = job_conditioning(model.family, positive, negative, cfg, guidance_embeds=model.guidance_embeds,
                                    context_dim=model.context_dim, pooled_dim=model.pooled_dim)
        except ConditioningError as exc:
            raise ValueError(f"TetriServe Sampler: {exc}") from None
        latent = samples.float()
        if torch.count_nonzero(latent) > 0:  # ComfyUI leaves an empty (all-zero) latent as it is
            latent = view.latent_format.process_in(latent)
        num_steps = int(sigmas.numel()) - 1
        settings = {"model": model.model, "steps": num_steps, "sampler": sampler_name, "seed": int(seed),
                    "cfg": float(cfg), "deadline_s": deadline_setting(deadline_s), "priority": int(priority),
                    "latent_space": "model", "result_space": "model"}
        if cond.guidance is not None:
            settings["guidance"] = cond.guidance
        settings.update(cond.settings)
        tensors = {"latent": latent.contiguous(), "noise": noise.float().contiguous(),
                   "sigmas": sigmas.float().cpu().contiguous()}
        for key, t in cond.tensors.items():  # a body holds each tensor once (a reference may be the latent)
            tensors[key] = own_tensor(t, tensors.values())

        pbar = comfy.utils.ProgressBar(num_steps, node_id=node_id)
        server = PromptServer.instance
        prompt_id = _prompt_id()
        client_id = server.client_id  # the prompt's own client session: its events go there, to no one else

        def on_progress(p: JobProgress) -> None:
            text = p.text()
            server.send_progress_text(text, node_id, client_id)
            server.send_sync(EVENT, {"prompt_id": prompt_id, "node": node_id, "job_id": p.job_id, "phase": p.phase,
                                     "text": text, "steps_done": p.steps_done, "num_steps": p.num_steps or num_steps,
                                     "gpu_ids": list(p.gpu_ids), "predicted_finish_at": p.predicted_finish_at,
                                     "deadline_at": p.deadline_at, "feasible": p.feasible}, client_id)
            pbar.update_absolute(min(p.steps_done, num_steps), num_steps)  # an interrupt point as well

        io_loop = _io_loop()
        client = _CLIENTS.get(model.url, io_loop or asyncio.get_running_loop())

        async def reload_model() -> None:
            await client.load_model(model.model, model.dtype)

        await _on_io_loop(model.url, lambda c: reach_service(model.url, _autostart_args()))
        result = await sample_remote(client, tensors, settings, tenant=_tenant(), on_progress=on_progress,
                                     check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                                     reload_model=reload_model, io_loop=io_loop)
        if result.metadata.get("simulated") == "true":
            log.warning("TetriServe: the service runs simulated devices; job %s returned its input latent",
                        result.progress.job_id)
        out = latent_image.copy()
        out["samples"] = view.latent_format.process_out(result.latent.float())
        return io.NodeOutput(out)


class TetriServeExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TetriServeLoadDiT, TetriServeSampler]


def _register_routes() -> None:
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return
    add_panel_routes(server.routes, lambda: _PANEL_CLIENTS.get(service_url()))


_register_routes()
