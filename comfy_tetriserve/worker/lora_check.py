"""Checking a job's LoRA stack against its model before the job is admitted (in the service process).

Reads only the LoRA files' key names and shapes and the model's architecture (no weights), so a
LoRA for the other family, or one whose keys match nothing, is refused at submission with a 4xx
instead of failing on the workers. Results are cached per (model source, LoRA file, mtime).
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

from ..errors import InvalidRequest

log = logging.getLogger(__name__)

#: strength_model range of the TetriServe LoRA node (ComfyUI's LoraLoaderModelOnly range)
MAX_STRENGTH = 100.0


@lru_cache(maxsize=16)
def _targets(source: str):
    from .lora import targets_of_config
    from .models import source_config

    return targets_of_config(source_config(source))


@lru_cache(maxsize=256)
def _check(source: str, path: str, mtime_ns: int, size: int) -> tuple[int, int, tuple[str, ...]]:
    from .lora import check_lora

    return check_lora(path, _targets(source))


def check_stack(source: str, loras) -> list[str]:
    """Raise InvalidRequest for an unusable stack; returns warnings (modules that will not be applied)."""
    warnings = []
    for item in loras:
        if len(item) != 2:
            raise InvalidRequest(f"a LoRA stack entry is (path, strength), got {item!r}")
        path, strength = item
        if not isinstance(strength, (int, float)) or not -MAX_STRENGTH <= float(strength) <= MAX_STRENGTH:
            raise InvalidRequest(f"LoRA strength must be a number in [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}], got {strength!r}")
        try:
            st = os.stat(path)
        except OSError:
            raise InvalidRequest(f"LoRA file {Path(path).name} is gone") from None
        matched, total, skipped = _check(source, str(path), st.st_mtime_ns, st.st_size)
        if skipped:
            warnings.append(f"LoRA {Path(path).name}: {len(skipped)} of {total} modules not applied: "
                            f"{', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}")
            log.warning("%s", warnings[-1])
    return warnings
