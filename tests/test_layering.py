"""The core package keeps its layers: planner, simulator and client need neither torch nor ComfyUI."""
from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import comfy_tetriserve

PKG_DIR = Path(comfy_tetriserve.__file__).parent

# Modules that must import with torch, diffusers and ComfyUI all missing.
TORCH_FREE_PACKAGES = ("core", "policy", "sim")
TORCH_FREE_MODULES = ("types", "plan", "cost", "errors", "config", "cli", "client", "sampling.names", "cluster.topology")


def torch_free_modules() -> list[str]:
    names = [f"comfy_tetriserve.{m}" for m in TORCH_FREE_MODULES if (PKG_DIR / (m.replace(".", "/") + ".py")).exists()]
    for pkg in TORCH_FREE_PACKAGES:
        path = PKG_DIR / pkg
        names.append(f"comfy_tetriserve.{pkg}")
        names += [f"comfy_tetriserve.{pkg}.{m.name}" for m in pkgutil.iter_modules([str(path)])]
    return names


BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = ("torch", "diffusers", "comfy", "folder_paths", "server", "comfy_api", "safetensors")
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, Blocker())
    """
)


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_blocker_really_blocks():
    proc = run_blocked("import torch")
    assert proc.returncode != 0 and "blocked in this test" in proc.stderr


def test_core_imports_without_torch_and_comfyui():
    modules = torch_free_modules()
    assert "comfy_tetriserve.core.engine" in modules and "comfy_tetriserve.plan" in modules
    proc = run_blocked(
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "leaked = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'diffusers', 'comfy'))\n"
        "assert not leaked, leaked\n"
        "print('imported', len(" + repr(modules) + "))\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "imported" in proc.stdout


def test_cli_help_without_torch():
    proc = run_blocked("from comfy_tetriserve.cli import main\nimport sys\nsys.exit(main([]))")
    assert proc.returncode == 2, proc.stderr  # no subcommand: help and exit 2
    assert "serve" in proc.stdout and "bench" in proc.stdout and "selfcheck" in proc.stdout


def test_no_comfy_imports_inside_core_package():
    offenders = []
    for path in PKG_DIR.rglob("*.py"):
        for line in path.read_text(encoding="utf-8").splitlines():
            s = line.strip()
            if s.startswith(("import comfy ", "import comfy.", "from comfy ", "from comfy.", "import folder_paths",
                             "from server import", "from comfy_api")) or s == "import comfy":
                offenders.append(f"{path.relative_to(PKG_DIR)}: {s}")
    assert not offenders, offenders


def test_pack_root_imports_outside_comfyui():
    """ComfyUI imports the folder by path; outside ComfyUI that import must succeed and stay inert."""
    root = PKG_DIR.parent
    proc = run_blocked(
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('tetriserve_pack', {str(root / '__init__.py')!r},"
        f" submodule_search_locations=[{str(root)!r}])\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "sys.modules['tetriserve_pack'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "assert mod.WEB_DIRECTORY == './web'\n"
        "assert not hasattr(mod, 'NODE_CLASS_MAPPINGS')\n"
        "print('ok')\n"
    )
    assert proc.returncode == 0, proc.stderr


def _package_modules(pkg: str) -> list[str]:
    return [f"comfy_tetriserve.{pkg}"] + [f"comfy_tetriserve.{pkg}.{m.name}"
                                          for m in pkgutil.iter_modules([str(PKG_DIR / pkg)])]


def test_service_and_nodes_import_no_worker_module():
    """The service reaches the workers only through the executor (created on demand), and the node side
    shares names and tensor helpers with the service, never the worker: importing every service module
    and every node-side module of the package loads no ``comfy_tetriserve.worker`` module."""
    modules = _package_modules("service") + ["comfy_tetriserve.sampling.latents", "comfy_tetriserve.sampling.schedules"]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "leaked = sorted(k for k in sys.modules if k.startswith('comfy_tetriserve.worker') or k.split('.')[0] == 'diffusers')\n"
        "assert not leaked, leaked\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # nodes/ is imported by ComfyUI, not by tests: read its imports instead
    offenders = [f"{p.name}: {line.strip()}" for p in (PKG_DIR.parent / "nodes").glob("*.py")
                 for line in p.read_text(encoding="utf-8").splitlines()
                 if line.strip().startswith(("from comfy_tetriserve.worker", "import comfy_tetriserve.worker",
                                             "from comfy_tetriserve.service", "import comfy_tetriserve.service",
                                             "from comfy_tetriserve import service"))]
    assert not offenders, offenders


def test_nothing_imports_upward():
    """Lower layers never import higher ones: core/policy/sim/sampling never import service, worker (except
    sampling -> nothing above it), demo, reliability or cli; the service never imports demo or reliability."""
    rules = {
        "core": ("service", "worker", "demo", "reliability", "cli", "sim", "policy"),
        "policy": ("service", "worker", "demo", "reliability", "cli", "sim", "core"),
        "sampling": ("service", "worker", "demo", "reliability", "cli", "core", "sim", "policy"),
        "sim": ("service", "worker", "demo", "reliability", "cli"),
        "service": ("demo", "reliability", "cli"),
        "worker": ("service", "demo", "reliability", "cli", "sim", "policy"),
    }
    offenders = []
    for pkg, banned in rules.items():
        for path in (PKG_DIR / pkg).glob("*.py"):
            for line in path.read_text(encoding="utf-8").splitlines():
                s = line.strip()
                for b in banned:
                    if s.startswith((f"from ..{b} ", f"from ..{b}.", f"from .. import {b}", f"import comfy_tetriserve.{b}",
                                     f"from comfy_tetriserve.{b}")):
                        offenders.append(f"{pkg}/{path.name}: {s}")
    assert not offenders, offenders
