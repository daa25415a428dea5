"""The submit body: parsing and validation, then resolution into a SamplingJob.

A job is one safetensors file: tensors ``latent`` [B, C, H/8, W/8] (required), ``context``
[B|1, tokens, dim] and ``pooled`` [B|1, dim] (required), optional ``noise`` (latent's shape),
``sigmas`` [steps + 1], ``neg_context`` / ``neg_pooled`` (together, for CFG); the settings are
JSON in the safetensors metadata under the key ``tetriserve`` (fields: ``JobSettings``).
Anything else is refused with InvalidRequest naming what is wrong. safetensors never runs
code while parsing (no pickle).

Resolution follows ComfyUI: missing sigmas come from steps + scheduler + denoise, missing noise
from the seed (CPU generator), and a VAE-space latent is moved into model space only if it
has a non-zero entry (an empty text-to-image latent stays zeros).
"""
from __future__ import annotations

import dataclasses
import json
import re
import struct
from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StrictFloat, StrictInt, StrictStr, TypeAdapter, ValidationError, with_config

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..sampling import latents, schedules
from ..sampling.names import SAMPLER_NAMES, SCHEDULER_NAMES
from ..core.executor import ModelInfo, SamplingJob
from ..errors import InvalidRequest
from ..sampling.image_cond import REFERENCE_METHODS
from .api_models import TOKEN_PATTERN, Token, validation_message
from .catalog import check_model_name
from .image_inputs import IMAGE_TENSORS, check_image_tensors, image_inputs
from .settings import ServiceConfig

SETTINGS_KEY = "tetriserve"
REQUIRED_TENSORS = ("latent", "context", "pooled")
OPTIONAL_TENSORS = ("noise", "sigmas", "neg_context", "neg_pooled") + IMAGE_TENSORS  # image_inputs.py
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SPACES = ("vae", "model")
MAX_HEADER_BYTES = 1 << 20
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF
MAX_CFG = 100.0
MAX_PRIORITY = 1000
MAX_SCHEDULE_FACTOR = 10  # steps / denoise may reach this many times max_steps
DEFAULT_FLUX_GUIDANCE = 3.5

_TOKEN_RE = re.compile(TOKEN_PATTERN)


def check_token(value: object, what: str) -> str:
    """A client-chosen identifier (tenant, job key, lease id): 1-128 of [A-Za-z0-9_.:@-]."""
    if not isinstance(value, str) or not _TOKEN_RE.match(value):
        raise InvalidRequest(f"{what} must be 1-128 characters of letters, digits and _.:@- "
                             f"starting with a letter or digit")
    return value


Steps = Annotated[StrictInt, Field(ge=1, description="required unless a sigmas tensor is sent")]
Space = Literal[SPACES]  # type: ignore[valid-type]


@with_config(ConfigDict(extra="forbid", allow_inf_nan=False))
@dataclass(frozen=True)
class JobSettings:
    """The JSON settings of a job (metadata key ``tetriserve``); see docs/api.md.

    The annotations are the validation (pydantic, ``SETTINGS_ADAPTER``) and the OpenAPI schema;
    limits that depend on the service's configuration are checked in ``parse_settings``."""

    model: Annotated[StrictStr, Field(description="a configured model name or a file in the model folders")]
    steps: Steps | None = None
    scheduler: Literal[SCHEDULER_NAMES] = "simple"  # type: ignore[valid-type]
    denoise: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] = 1.0
    # the model sampling's shift (SD3 alpha, FLUX mu); None = the family default
    shift: Annotated[StrictFloat, Field(gt=0.0, le=100.0)] | None = None
    sampler: Literal[SAMPLER_NAMES] = "euler"  # type: ignore[valid-type]
    cfg: Annotated[StrictFloat, Field(gt=0.0, le=MAX_CFG)] = 1.0
    # FLUX-dev distilled guidance (default 3.5 for models that take it)
    guidance: Annotated[StrictFloat, Field(ge=0.0, le=MAX_CFG)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] = 0
    deadline_s: Annotated[StrictFloat, Field(gt=0.0, description="seconds after submission; null = best effort")] \
        | None = None
    priority: Annotated[StrictInt, Field(ge=-MAX_PRIORITY, le=MAX_PRIORITY)] = 0
    tenant: Annotated[Token, Field(description="default: the lease's tenant, else 'default'")] | None = None
    job_key: Annotated[Token, Field(description="idempotency key: the same key returns the existing job")] | None = None
    lease: Token | None = None
    # the latent sent is in VAE space ("vae") or already in model space ("model")
    latent_space: Space = "vae"
    result_space: Space | None = None  # space of the returned latent; default: latent_space
    # FLUX Kontext: how ref_latent_i are placed
    reference_latents_method: Literal[REFERENCE_METHODS] = "offset"  # type: ignore[valid-type]


SETTINGS_ADAPTER: TypeAdapter[JobSettings] = TypeAdapter(JobSettings)
SETTINGS_FIELDS = tuple(f.name for f in fields(JobSettings))


def parse_settings(raw: Any, limits: ServiceConfig) -> JobSettings:
    """Check every field of the settings object (types and ranges); unknown keys are refused."""
    if not isinstance(raw, dict):
        raise InvalidRequest(f"settings under {SETTINGS_KEY!r} must be a JSON object")
    try:
        settings = SETTINGS_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc, "setting", SETTINGS_FIELDS)) from None
    check_model_name(settings.model)
    if settings.steps is not None and settings.steps > limits.max_steps:
        raise InvalidRequest(f"steps must be between 1 and {limits.max_steps}, got {settings.steps}")
    longest = MAX_SCHEDULE_FACTOR * limits.max_steps
    if settings.steps is not None and settings.denoise <= 0.9999 and settings.steps / settings.denoise > longest:
        # ComfyUI computes a schedule of steps / denoise steps and keeps the tail: bound its length
        raise InvalidRequest(f"denoise {settings.denoise:g} is too small for {settings.steps} steps: the full "
                             f"schedule would have {settings.steps / settings.denoise:.3g} steps, more than {longest}")
    if settings.deadline_s is not None and settings.deadline_s > limits.max_deadline_s:
        raise InvalidRequest(f"deadline_s must be > 0 and <= {limits.max_deadline_s:g} seconds "
                             f"(or null for best effort), got {settings.deadline_s}")
    return dataclasses.replace(settings, denoise=float(settings.denoise), cfg=float(settings.cfg))


def read_metadata(body: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors body, read from its JSON header."""
    if len(body) < 8:
        raise InvalidRequest("body is not a safetensors file (shorter than its 8-byte header length)")
    (header_len,) = struct.unpack("<Q", body[:8])
    if header_len > min(MAX_HEADER_BYTES, len(body) - 8):
        raise InvalidRequest("body is not a safetensors file (header length out of range)")
    try:
        header = json.loads(body[8:8 + header_len])
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("body is not a safetensors file (header is not JSON)") from None
    except RecursionError:
        raise InvalidRequest("body is not a safetensors file (header JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise InvalidRequest("body is not a safetensors file (header is not an object)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InvalidRequest("safetensors __metadata__ must map strings to strings")
    return meta


def parse_body(body: bytes, limits: ServiceConfig) -> tuple[JobSettings, dict[str, torch.Tensor]]:
    """Settings and tensors of a submit body (no model-dependent checks yet)."""
    meta = read_metadata(body)
    if SETTINGS_KEY not in meta:
        raise InvalidRequest(f"safetensors metadata has no {SETTINGS_KEY!r} key with the job's settings (JSON)")
    try:
        raw = json.loads(meta[SETTINGS_KEY])
    except ValueError as exc:
        raise InvalidRequest(f"settings under {SETTINGS_KEY!r} are not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest(f"settings under {SETTINGS_KEY!r} are nested too deeply") from None
    settings = parse_settings(raw, limits)
    try:
        tensors = load_safetensors(body)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise InvalidRequest(f"body is not a valid safetensors file: {exc}") from None
    missing = [n for n in REQUIRED_TENSORS if n not in tensors]
    extra = sorted(set(tensors) - set(REQUIRED_TENSORS) - set(OPTIONAL_TENSORS))
    if missing:
        raise InvalidRequest(f"missing tensor(s): {', '.join(missing)}")
    if extra:
        raise InvalidRequest(f"unexpected tensor(s): {', '.join(extra)} "
                             f"(allowed: {', '.join(REQUIRED_TENSORS + OPTIONAL_TENSORS)})")
    if ("neg_context" in tensors) != ("neg_pooled" in tensors):
        raise InvalidRequest("neg_context and neg_pooled go together")
    if ("concat_latent_image" in tensors) != ("concat_mask" in tensors):
        raise InvalidRequest("concat_latent_image and concat_mask go together")
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise InvalidRequest(f"tensor {name} must be floating point (F32, F16, BF16 or F64), got {t.dtype}")
        if t.numel() == 0:
            raise InvalidRequest(f"tensor {name} is empty")
        if not torch.isfinite(t).all():
            raise InvalidRequest(f"tensor {name} contains NaN or Inf")
    return settings, tensors


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def check_tensors(settings: JobSettings, tensors: dict[str, torch.Tensor], info: ModelInfo,
                  limits: ServiceConfig) -> None:
    """Shapes against the model and the limits; raises InvalidRequest naming the tensor."""
    latent = tensors["latent"]
    if latent.ndim != 4:
        raise InvalidRequest(f"latent must be [B, C, H/8, W/8], got {_shape(latent)}")
    batch, channels, h, w = latent.shape
    if not 1 <= batch <= limits.max_batch:
        raise InvalidRequest(f"latent batch must be between 1 and {limits.max_batch}, got {batch}")
    if channels != info.in_channels:
        raise InvalidRequest(f"latent has {channels} channels, model {info.name} takes {info.in_channels}")
    if h < 2 or w < 2 or h % 2 or w % 2:
        raise InvalidRequest(f"latent height and width must be even and >= 2 (images in multiples of 16 px), got {h}x{w}")
    if (h // 2) * (w // 2) > limits.max_image_tokens:
        raise InvalidRequest(f"image of {h * 8}x{w * 8} px has {(h // 2) * (w // 2)} tokens, "
                             f"more than the limit {limits.max_image_tokens}")
    if "noise" in tensors and tensors["noise"].shape != latent.shape:
        raise InvalidRequest(f"noise must have the latent's shape {_shape(latent)}, got {_shape(tensors['noise'])}")
    for prefix in ("", "neg_"):
        if prefix + "context" not in tensors:
            continue
        ctx, pooled = tensors[prefix + "context"], tensors[prefix + "pooled"]
        if ctx.ndim != 3 or ctx.shape[0] not in (1, batch) or ctx.shape[2] != info.context_dim:
            raise InvalidRequest(f"{prefix}context must be [1 or {batch}, tokens, {info.context_dim}], got {_shape(ctx)}")
        if not 1 <= ctx.shape[1] <= limits.max_text_tokens:
            raise InvalidRequest(f"{prefix}context has {ctx.shape[1]} tokens, limit {limits.max_text_tokens}")
        if pooled.ndim != 2 or pooled.shape[0] not in (1, batch) or pooled.shape[1] != info.pooled_dim:
            raise InvalidRequest(f"{prefix}pooled must be [1 or {batch}, {info.pooled_dim}], got {_shape(pooled)}")
    check_image_tensors(tensors, info, limits.max_image_tokens)
    if settings.cfg != 1.0 and "neg_context" not in tensors:
        raise InvalidRequest("cfg != 1 needs neg_context and neg_pooled (the negative conditioning)")
    if "sigmas" in tensors:
        sig = tensors["sigmas"]
        if sig.ndim != 1 or not 2 <= sig.numel() <= limits.max_steps + 1:
            raise InvalidRequest(f"sigmas must be 1-D with 2 to {limits.max_steps + 1} entries, got {_shape(sig)}")
        if settings.steps is not None and settings.steps != sig.numel() - 1:
            raise InvalidRequest(f"steps={settings.steps} disagrees with {sig.numel()} sigmas (steps + 1 expected)")
        if (sig < 0).any() or not sig[0] > 0 or (sig[1:] > sig[:-1]).any() or sig[0] > 1e4:
            raise InvalidRequest("sigmas must be non-negative, non-increasing, start above 0 and at most 1e4")
    elif settings.steps is None:
        raise InvalidRequest("give steps (with scheduler and denoise) or a sigmas tensor")


def resolve_job(job_id: str, settings: JobSettings, tensors: dict[str, torch.Tensor], info: ModelInfo) -> SamplingJob:
    """The SamplingJob the workers run: sigmas, noise and latent space resolved (ComfyUI's rules)."""
    latent = tensors["latent"].to(torch.float32).contiguous()
    noise = tensors["noise"].to(torch.float32) if "noise" in tensors else latents.prepare_noise(latent, settings.seed)
    if settings.latent_space == "vae" and bool(latent.count_nonzero()):
        latent = latents.process_latent_in(info.family, latent)
    if "sigmas" in tensors:
        sigmas = tensors["sigmas"].to(torch.float32)
    else:
        assert settings.steps is not None
        sigmas = schedules.compute_sigmas(info.family, settings.scheduler, settings.steps, settings.denoise,
                                         settings.shift)
    guidance = settings.guidance
    if info.guidance_embeds and guidance is None:
        guidance = DEFAULT_FLUX_GUIDANCE
    if not info.guidance_embeds:
        guidance = None
    uses_cfg = settings.cfg != 1.0
    concat, refs = image_inputs(info.family, tensors)
    return SamplingJob(
        request_id=job_id, model=settings.model, latent=latent, noise=noise, sigmas=sigmas,
        context=tensors["context"], pooled=tensors["pooled"], sampler=settings.sampler, seed=settings.seed,
        cfg=settings.cfg, guidance=guidance,
        neg_context=tensors.get("neg_context") if uses_cfg else None,
        neg_pooled=tensors.get("neg_pooled") if uses_cfg else None,
        extra={"result_space": settings.result_space or settings.latent_space},
        concat=concat, ref_latents=refs, ref_method=settings.reference_latents_method,
    )


def encode_result(latent: torch.Tensor, metadata: dict[str, str]) -> bytes:
    """A job's result as a safetensors body: tensor ``latent``, metadata as given."""
    return save_safetensors({"latent": latent.contiguous()}, metadata=metadata)
