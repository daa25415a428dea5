"""Cluster mode: one planner over several boxes, workers placed by Ray (``serve --cluster ray``).

Only this package imports ``ray`` (an optional extra: ``pip install "comfy-tetriserve[cluster]"``);
single-box serving never does. ``topology`` is pure (no torch, no ray): which devices each node
has and the groups the planner may name (never spanning two nodes). ``executor`` is the
``Executor`` over one Ray actor per node (``agent``), each running the node's worker pool.
"""
from __future__ import annotations

from ..errors import InvalidRequest

INSTALL_HINT = 'pip install "comfy-tetriserve[cluster]"  (or: pip install ray)'


def require_ray():
    """The ``ray`` module, or InvalidRequest saying what to install."""
    try:
        import ray
    except ImportError as exc:
        raise InvalidRequest(f"--cluster ray needs Ray, which is not installed ({exc}); install it with {INSTALL_HINT}") \
            from None
    return ray
