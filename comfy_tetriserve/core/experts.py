"""Two-expert jobs (Wan 2.2 A14B): what a job's expert fields mean and their checks (torch-free;
the stepping is worker/experts.py)."""
from __future__ import annotations

from typing import Any

from ..errors import InvalidRequest


def parse_expert(extra: dict[str, Any]) -> tuple[str, float] | None:
    """(low-noise model, boundary sigma) of a job's ``extra``, or None; raises InvalidRequest."""
    spec = extra.get("expert")
    if spec is None:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), str) or not spec["model"]:
        raise InvalidRequest('expert must be {"model": NAME, "boundary": SIGMA}')
    boundary = spec.get("boundary")
    if isinstance(boundary, bool) or not isinstance(boundary, (int, float)) or not 0.0 < float(boundary) < 1.0:
        raise InvalidRequest(f"expert boundary must be a sigma in (0, 1), got {boundary!r}")
    return spec["model"], float(boundary)


def check_experts(high, low) -> None:
    """The two experts' ModelInfo must be interchangeable inputs-wise."""
    for field in ("family", "in_channels", "context_dim", "pooled_dim"):
        if getattr(high, field) != getattr(low, field):
            raise InvalidRequest(f"experts {high.name} and {low.name} differ in {field} "
                                 f"({getattr(high, field)} vs {getattr(low, field)})")
