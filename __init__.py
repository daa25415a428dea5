"""ComfyUI entry point of comfy_tetriserve.

ComfyUI imports this folder by file path as a custom node pack. Outside ComfyUI (no ``comfy``
package) importing it defines nothing and fails nothing, so tools that walk the folder are safe.
"""
import os as _os
import sys as _sys

WEB_DIRECTORY = "./web"
__all__ = ["WEB_DIRECTORY"]

# The core package lives beside this file; make ``import comfy_tetriserve`` work by bare name
# when the pack was not pip-installed (ComfyUI loads it from custom_nodes/ by path).
_here = _os.path.dirname(_os.path.abspath(__file__))
if _here not in _sys.path:
    _sys.path.append(_here)

try:
    import comfy  # noqa: F401  (only present inside ComfyUI)
except ImportError:
    comfy = None

if comfy is not None:
    try:
        from .nodes import comfy_entrypoint  # noqa: F401
    except ImportError as _exc:  # the nodes need a recent ComfyUI (V3 API)
        import logging as _logging

        _logging.getLogger(__name__).error("comfy_tetriserve nodes not loaded: %s", _exc)
    else:
        __all__.append("comfy_entrypoint")
