"""Validation cost of a submit body's settings with pydantic v2 (what the service uses) and msgspec.

Both validate the same JSON (the metadata of a typical submit body) into a typed object with the
same constraints; the numbers are microseconds per validation, best of 5 runs, on this machine.
The settings are a small part of a submit: parsing the safetensors body is timed too, for scale.

    python scripts/schema_cost.py
"""
from __future__ import annotations

import json
import timeit
from typing import Annotated, Literal

import msgspec
import torch
from safetensors.torch import save

from comfy_tetriserve.sampling.names import SAMPLER_NAMES, SCHEDULER_NAMES
from comfy_tetriserve.service.schemas import MAX_CFG, MAX_PRIORITY, SETTINGS_ADAPTER, parse_body
from comfy_tetriserve.service.settings import ServiceConfig

TOKEN = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")]


class MsgspecSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    model: str
    steps: Annotated[int, msgspec.Meta(ge=1)] | None = None
    scheduler: Literal[SCHEDULER_NAMES] = "simple"  # type: ignore[valid-type]
    denoise: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    shift: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)] | None = None
    sampler: Literal[SAMPLER_NAMES] = "euler"  # type: ignore[valid-type]
    cfg: Annotated[float, msgspec.Meta(gt=0.0, le=MAX_CFG)] = 1.0
    guidance: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_CFG)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0)] = 0  # msgspec cannot bound an int above int64 (MAX_SEED is u64)
    deadline_s: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    priority: Annotated[int, msgspec.Meta(ge=-MAX_PRIORITY, le=MAX_PRIORITY)] = 0
    tenant: TOKEN | None = None
    job_key: TOKEN | None = None
    lease: TOKEN | None = None
    latent_space: Literal["vae", "model"] = "vae"
    result_space: Literal["vae", "model"] | None = None


SETTINGS = {"model": "flux-dev", "steps": 28, "scheduler": "simple", "sampler": "euler", "seed": 1234,
            "deadline_s": 12.5, "priority": 0, "tenant": "team-a", "job_key": "prompt-42:0", "cfg": 1.0}


def best_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    raw = json.dumps(SETTINGS)
    raw_bytes = raw.encode()
    decoder = msgspec.json.Decoder(MsgspecSettings)
    assert decoder.decode(raw_bytes).steps == SETTINGS_ADAPTER.validate_json(raw).steps == 28
    rows = {
        "pydantic validate_json (str -> JobSettings)": best_us(lambda: SETTINGS_ADAPTER.validate_json(raw), 20000),
        "pydantic json.loads + validate_python": best_us(lambda: SETTINGS_ADAPTER.validate_python(json.loads(raw)), 20000),
        "msgspec decode (bytes -> Struct)": best_us(lambda: decoder.decode(raw_bytes), 20000),
    }
    body = save({"latent": torch.zeros(1, 16, 128, 128), "context": torch.zeros(1, 512, 4096),
                 "pooled": torch.zeros(1, 768)}, metadata={"tetriserve": raw})
    config = ServiceConfig()
    rows["whole submit body parse (1024 px FLUX, 8.4 MB)"] = best_us(lambda: parse_body(body, config), 20)
    for name, us in rows.items():
        print(f"{name:50s} {us:10.2f} us")


if __name__ == "__main__":
    main()
