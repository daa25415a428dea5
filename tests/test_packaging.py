"""Installing the pack into ComfyUI must not touch ComfyUI's torch: the nodes' requirements.txt and the
package's own dependencies name no torch; the Registry metadata ([tool.comfy]) is complete."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
TORCH = re.compile(r"^\s*(torch|torchvision|torchaudio|xformers)\b", re.IGNORECASE)


def requirement_names(lines) -> list[str]:
    return [re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower() for line in lines
            if line.strip() and not line.strip().startswith("#")]


def test_nothing_comfyui_installs_names_torch():
    reqs = (ROOT / "requirements.txt").read_text().splitlines()
    assert requirement_names(reqs) and not [line for line in reqs if TORCH.match(line)]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if TORCH.match(d)]
    assert "aiohttp" in requirement_names(reqs)  # what the nodes' client needs
    # the nodes' imports outside ComfyUI's own packages are covered by requirements.txt
    node_imports = set()
    for path in (ROOT / "nodes").glob("*.py"):
        node_imports |= set(re.findall(r"^\s*(?:from|import) (\w+)", path.read_text(), re.MULTILINE))
    provided = {"comfy", "comfy_api", "comfy_execution", "folder_paths", "server", "torch", "comfy_tetriserve", "nodes",
                "__future__"}
    third_party = {m for m in node_imports if m not in provided and m not in sys.stdlib_module_names}
    assert third_party <= set(requirement_names(reqs)), third_party


def test_registry_metadata_is_complete():
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = doc["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert comfy["Icon"].startswith("https://") and comfy["Icon"].endswith("/docs/icon.svg")
    assert (ROOT / "docs" / "icon.svg").read_text().startswith("<svg")
    for name in comfy["includes"]:
        assert (ROOT / name).exists(), name
    assert "requirements.txt" in comfy["includes"]
    assert doc["project"]["urls"]["Repository"].startswith("https://")
