"""comfy_tetriserve: deadline-aware, step-level sequence-parallel serving of diffusion transformers.

The core package imports neither torch nor ComfyUI at import time: the planner, the simulator and
the client run without them. Torch is imported by the engine's worker modules only when used.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
