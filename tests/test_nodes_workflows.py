"""The example workflows: committed files match their description, and the UI and API formats
describe the same graph. (The e2e tests post them to a real ComfyUI; the browser test converts
the UI format with ComfyUI's own frontend and compares it with the API format.)"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nodes_helpers import ROOT

BUILD = ROOT / "workflows" / "build_workflows.py"
NAMES = sorted(p.stem for p in (ROOT / "example_workflows").glob("*.json"))


def test_committed_workflows_are_up_to_date():
    proc = subprocess.run([sys.executable, str(BUILD), "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert NAMES == sorted(p.stem for p in (ROOT / "workflows" / "api").glob("*.json"))
    assert len(NAMES) == 5
    # ComfyUI lists */workflows/*.json as templates too: API files stay in a subfolder
    assert not list((ROOT / "workflows").glob("*.json"))


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_formats_describe_the_same_graph(name):
    ui = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
    api = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    assert {str(n["id"]) for n in ui["nodes"]} == set(api)
    links = {link[0]: link for link in ui["links"]}
    assert ui["last_link_id"] == len(links) and ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
    for n in ui["nodes"]:
        entry = api[str(n["id"])]
        assert entry["class_type"] == n["type"]
        linked = {k: v for k, v in entry["inputs"].items() if isinstance(v, list)}
        assert {i["name"] for i in n["inputs"]} == set(linked)
        for slot, i in enumerate(n["inputs"]):
            _, src, src_slot, dst, dst_slot, _typ = links[i["link"]]
            assert (dst, dst_slot) == (n["id"], slot) and linked[i["name"]] == [str(src), src_slot]
        widgets = [v for k, v in entry["inputs"].items() if not isinstance(v, list)]
        values = list(n["widgets_values"])
        if n["type"] == "TetriServeSampler":
            assert values.pop(1) == "fixed"  # control after generate, UI only
        if n["type"] == "LoadImage":
            assert values.pop(1) == "image"  # the upload button, UI only
        assert values == widgets


def test_workflows_cover_flux_sd3_cfg_and_concurrent_deadlines():
    api = {name: json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text()) for name in NAMES}

    def samplers(name):
        return [n["inputs"] for n in api[name].values() if n["class_type"] == "TetriServeSampler"]

    (flux,) = samplers("tetriserve_flux_text_to_image")
    assert flux["cfg"] == 1.0 and flux["deadline_s"] > 0
    assert any(n["class_type"] == "FluxGuidance" for n in api["tetriserve_flux_text_to_image"].values())
    (sd3,) = samplers("tetriserve_sd3_cfg")
    assert sd3["cfg"] > 1.0 and sd3["negative"] != sd3["positive"]
    multi = samplers("tetriserve_flux_multi_resolution_deadlines")
    assert len(multi) == 3 and len({m["deadline_s"] for m in multi}) == 3 and len({m["latent_image"][0] for m in multi}) == 3


def test_fill_and_kontext_workflows_wire_the_stock_image_conditioning():
    api = {name: json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text()) for name in NAMES}
    fill = api["tetriserve_flux_fill_inpaint"]
    (inpaint_id,) = [k for k, v in fill.items() if v["class_type"] == "InpaintModelConditioning"]
    assert fill[inpaint_id]["inputs"]["noise_mask"] is False  # the sampler refuses latent noise masks
    (sampler,) = [v["inputs"] for v in fill.values() if v["class_type"] == "TetriServeSampler"]
    assert sampler["positive"] == [inpaint_id, 0] and sampler["latent_image"] == [inpaint_id, 2]
    assert sampler["deadline_s"] > 0
    kontext = api["tetriserve_flux_kontext_edit"]
    (ref_id,) = [k for k, v in kontext.items() if v["class_type"] == "ReferenceLatent"]
    encode = kontext[kontext[ref_id]["inputs"]["latent"][0]]
    assert encode["class_type"] == "VAEEncode"
    assert kontext[encode["inputs"]["pixels"][0]]["class_type"] == "FluxKontextImageScale"
    (sampler,) = [v["inputs"] for v in kontext.values() if v["class_type"] == "TetriServeSampler"]
    assert kontext[sampler["positive"][0]]["inputs"]["conditioning"] == [ref_id, 0] and sampler["deadline_s"] > 0
