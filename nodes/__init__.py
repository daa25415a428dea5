"""ComfyUI nodes of comfy_tetriserve (V3 API) and the board panel's routes.

Only this folder imports ComfyUI, and only ``comfy_nodes`` does: the other modules
(conditioning, jobs, service, panel) import neither ComfyUI nor, except conditioning, torch,
and are tested without ComfyUI. ``comfy_entrypoint`` is what ComfyUI calls; it imports the
ComfyUI side on first use.
"""
from __future__ import annotations


def comfy_entrypoint():
    """ComfyUI's V3 entry point: the extension that lists the TetriServe nodes."""
    from .comfy_nodes import TetriServeExtension

    return TetriServeExtension()


__all__ = ["comfy_entrypoint"]
