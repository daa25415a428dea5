"""LoRA stacks in job settings: checked, and resolved by name inside the service's LoRA folders.

A job's settings may carry ``"loras": [{"name": "style.safetensors", "strength": 0.8}, ...]``
(or ``[["style.safetensors", 0.8], ...]``), applied in order. Names are resolved only inside the
folders the service was started with (``serve --lora-dir``, repeatable; an auto-started service
gets ComfyUI's ``loras`` folders), never as paths; an unknown name is a 404 that names the folders
searched. The workers then read each file once and apply the stack per job (worker/lora.py).
"""
from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidRequest, NotFound
from .catalog import check_model_name, find_file

LORA_SUFFIXES = (".safetensors", ".sft")
MAX_LORAS = 16
MAX_STRENGTH = 100.0  # the TetriServe LoRA node's (and ComfyUI's LoraLoaderModelOnly's) range


def parse_stack(raw: Any) -> tuple[tuple[str, float], ...]:
    """The ``loras`` setting as ((name, strength), ...); raises InvalidRequest saying what is wrong."""
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        raise InvalidRequest("loras must be a list of {\"name\": ..., \"strength\": ...} objects")
    if len(raw) > MAX_LORAS:
        raise InvalidRequest(f"at most {MAX_LORAS} LoRAs per job, got {len(raw)}")
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, dict):
            extra = sorted(set(item) - {"name", "strength"})
            if extra:
                raise InvalidRequest(f"loras[{i}]: unknown key(s) {', '.join(extra)} (known: name, strength)")
            name, strength = item.get("name"), item.get("strength", 1.0)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            name, strength = item
        else:
            raise InvalidRequest(f"loras[{i}] must be {{\"name\": ..., \"strength\": ...}}, got {json.dumps(item)}")
        try:
            check_model_name(name)
        except InvalidRequest as exc:
            raise InvalidRequest(f"loras[{i}]: {str(exc).replace('model', 'LoRA', 1)}") from None
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength != strength:
            raise InvalidRequest(f"loras[{i}].strength must be a number, got {json.dumps(strength)}")
        if not -MAX_STRENGTH <= float(strength) <= MAX_STRENGTH:
            raise InvalidRequest(f"loras[{i}].strength must be in [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}], got {strength}")
        out.append((name, float(strength)))
    return tuple(out)


def resolve_lora(name: str, roots: tuple[str, ...]) -> str:
    """The real path of LoRA file ``name`` inside one of ``roots``; NotFound naming the folders otherwise."""
    found = find_file(name, roots, "LoRA", LORA_SUFFIXES)
    if found is None:
        where = ", ".join(roots) if roots else "none: start the service with --lora-dir"
        raise NotFound(f"unknown LoRA {name!r}: no such file in the LoRA folders ({where})")
    return found


def resolve_stack(stack: tuple[tuple[str, float], ...], roots: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    """((path, strength), ...) of a parsed stack; entries of strength 0 are dropped (they change nothing)."""
    return tuple((resolve_lora(name, roots), s) for name, s in stack if s != 0.0)


def adapter_key(stack: tuple[tuple[str, float], ...]) -> str:
    """The identity of a stack for batching (equal stacks only share a batched step)."""
    return json.dumps([[name, s] for name, s in stack]) if stack else ""


def list_loras(roots: tuple[str, ...]) -> list[str]:
    from .catalog import list_model_files

    return [n for n in list_model_files(roots) if n.endswith(LORA_SUFFIXES)]


def with_loras(job, settings, roots: tuple[str, ...]):
    """(SamplingJob with its stack resolved to paths, adapter key) for a job's settings."""
    import dataclasses

    if not settings.loras:
        return job, ""
    stack = resolve_stack(settings.loras, roots)
    return dataclasses.replace(job, loras=stack), adapter_key(stack)
