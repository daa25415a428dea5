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

import json
import math
import re
import struct
from dataclasses import dataclass, fields
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..sampling import latents, schedules
from ..sampling.names import SAMPLER_NAMES, SCHEDULER_NAMES
from ..core.executor import ModelInfo, SamplingJob
from ..errors import InvalidRequest
from .catalog import check_model_name
from .settings import ServiceConfig

SETTINGS_KEY = "tetriserve"
REQUIRED_TENSORS = ("latent", "context", "pooled")
OPTIONAL_TENSORS = ("noise", "sigmas", "neg_context", "neg_pooled")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SPACES = ("vae", "model")
MAX_HEADER_BYTES = 1 << 20
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF
MAX_CFG = 100.0
MAX_PRIORITY = 1000
MAX_SCHEDULE_FACTOR = 10  # steps / denoise may reach this many times max_steps
DEFAULT_FLUX_GUIDANCE = 3.5

_TOKEN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")


def check_token(value: object, what: str) -> str:
    """A client-chosen identifier (tenant, job key, lease id): 1-128 of [A-Za-z0-9_.:@-]."""
    if not isinstance(value, str) or not _TOKEN_RE.match(value):
        raise InvalidRequest(f"{what} must be 1-128 characters of letters, digits and _.:@- "
                             f"starting with a letter or digit")
    return value


@dataclass(frozen=True)
class JobSettings:
    """The JSON settings of a job (metadata key ``tetriserve``); see docs/api.md."""

    model: str
    steps: int | None = None  # required unless a sigmas tensor is sent
    scheduler: str = "simple"
    denoise: float = 1.0
    shift: float | None = None  # the model sampling's shift (SD3 alpha, FLUX mu); None = the family default
    sampler: str = "euler"
    cfg: float = 1.0
    guidance: float | None = None  # FLUX-dev distilled guidance (default 3.5 for models that take it)
    seed: int = 0
    deadline_s: float | None = None  # relative to submission; None = best effort
    priority: int = 0
    tenant: str | None = None  # default: the lease's tenant, else "default"
    job_key: str | None = None  # client-chosen idempotency key
    lease: str | None = None
    latent_space: str = "vae"  # the latent sent is in VAE space ("vae") or already in model space ("model")
    result_space: str | None = None  # space of the returned latent; default: latent_space
    loras: tuple[tuple[str, float], ...] = ()  # LoRA stack by file name (service/loras.py), in order


def _number(value: Any, what: str, *, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise InvalidRequest(f"{what} must be {'an integer' if integer else 'a number'}, got {json.dumps(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequest(f"{what} must be finite")
    return value


def parse_settings(raw: Any, limits: ServiceConfig) -> JobSettings:
    """Check every field of the settings object (types and ranges); unknown keys are refused."""
    if not isinstance(raw, dict):
        raise InvalidRequest(f"settings under {SETTINGS_KEY!r} must be a JSON object")
    known = {f.name for f in fields(JobSettings)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InvalidRequest(f"unknown setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    if "model" not in raw:
        raise InvalidRequest("setting 'model' is required")
    s = dict(raw)
    check_model_name(s["model"])
    for name in ("scheduler", "sampler"):
        if name in s and not isinstance(s[name], str):
            raise InvalidRequest(f"{name} must be a string")
    if s.get("scheduler", "simple") not in SCHEDULER_NAMES:
        raise InvalidRequest(f"unknown scheduler {s['scheduler']!r} (known: {', '.join(SCHEDULER_NAMES)})")
    if s.get("sampler", "euler") not in SAMPLER_NAMES:
        raise InvalidRequest(f"unknown sampler {s['sampler']!r} (known: {', '.join(SAMPLER_NAMES)})")
    if s.get("steps") is not None:
        steps = _number(s["steps"], "steps", integer=True)
        if not 1 <= steps <= limits.max_steps:
            raise InvalidRequest(f"steps must be between 1 and {limits.max_steps}, got {steps}")
    denoise = _number(s.get("denoise", 1.0), "denoise")
    if not 0.0 < denoise <= 1.0:
        raise InvalidRequest(f"denoise must be in (0, 1], got {denoise}")
    longest = MAX_SCHEDULE_FACTOR * limits.max_steps
    if s.get("steps") is not None and denoise <= 0.9999 and s["steps"] / denoise > longest:
        # ComfyUI computes a schedule of steps / denoise steps and keeps the tail: bound its length
        raise InvalidRequest(f"denoise {denoise:g} is too small for {s['steps']} steps: the full schedule would have "
                             f"{s['steps'] / denoise:.3g} steps, more than {MAX_SCHEDULE_FACTOR * limits.max_steps}")
    if s.get("shift") is not None and not 0.0 < _number(s["shift"], "shift") <= 100.0:
        raise InvalidRequest("shift must be in (0, 100]")
    cfg = _number(s.get("cfg", 1.0), "cfg")
    if not 0.0 < cfg <= MAX_CFG:
        raise InvalidRequest(f"cfg must be in (0, {MAX_CFG}], got {cfg}")
    if s.get("guidance") is not None and not 0.0 <= _number(s["guidance"], "guidance") <= MAX_CFG:
        raise InvalidRequest(f"guidance must be in [0, {MAX_CFG}]")
    seed = _number(s.get("seed", 0), "seed", integer=True)
    if not 0 <= seed <= MAX_SEED:
        raise InvalidRequest(f"seed must be between 0 and {MAX_SEED}")
    if s.get("deadline_s") is not None:
        deadline = _number(s["deadline_s"], "deadline_s")
        if not 0.0 < deadline <= limits.max_deadline_s:
            raise InvalidRequest(f"deadline_s must be > 0 and <= {limits.max_deadline_s:g} seconds "
                                 f"(or null for best effort), got {deadline}")
    priority = _number(s.get("priority", 0), "priority", integer=True)
    if not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidRequest(f"priority must be between {-MAX_PRIORITY} and {MAX_PRIORITY}")
    for name in ("tenant", "job_key", "lease"):
        if s.get(name) is not None:
            check_token(s[name], name)
    for name in ("latent_space", "result_space"):
        if s.get(name) is not None and s[name] not in SPACES:
            raise InvalidRequest(f"{name} must be one of {', '.join(SPACES)}")
    for name in ("denoise", "cfg"):
        if name in s:
            s[name] = float(s[name])
    if "loras" in s:
        from .loras import parse_stack

        s["loras"] = parse_stack(s["loras"])
    return JobSettings(**s)


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
    return SamplingJob(
        request_id=job_id, model=settings.model, latent=latent, noise=noise, sigmas=sigmas,
        context=tensors["context"], pooled=tensors["pooled"], sampler=settings.sampler, seed=settings.seed,
        cfg=settings.cfg, guidance=guidance,
        neg_context=tensors.get("neg_context") if uses_cfg else None,
        neg_pooled=tensors.get("neg_pooled") if uses_cfg else None,
        extra={"result_space": settings.result_space or settings.latent_space},
    )


def encode_result(latent: torch.Tensor, metadata: dict[str, str]) -> bytes:
    """A job's result as a safetensors body: tensor ``latent``, metadata as given."""
    return save_safetensors({"latent": latent.contiguous()}, metadata=metadata)
