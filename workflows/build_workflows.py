"""Write the example workflows in both of ComfyUI's formats from one description.

    python workflows/build_workflows.py          # (re)write example_workflows/*.json and workflows/api/*.json
    python workflows/build_workflows.py --check  # exit 1 if the committed files differ from this description

- ``example_workflows/NAME.json``: the UI format (what Save exports; listed under Browse
  Templates, ComfyUI serves a pack's ``example_workflows`` folder).
- ``workflows/api/NAME.json``: the API format, for ``POST /prompt`` (``{"prompt": ...}``).

The model and text-encoder file names are the usual ones (flux1-dev.safetensors, clip_l,
t5xxl_fp16, ae.safetensors, sd3.5_medium.safetensors, clip_g); change them in the loaders.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UI_DIR = ROOT / "example_workflows"
API_DIR = ROOT / "workflows" / "api"

#: per node class: (widget names in order, socket inputs (name, type), outputs (name, type))
CLASSES: dict[str, tuple[list[str], list[tuple[str, str]], list[tuple[str, str]]]] = {
    "DualCLIPLoader": (["clip_name1", "clip_name2", "type", "device"], [], [("CLIP", "CLIP")]),
    "TripleCLIPLoader": (["clip_name1", "clip_name2", "clip_name3"], [], [("CLIP", "CLIP")]),
    "CLIPTextEncode": (["text"], [("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "FluxGuidance": (["guidance"], [("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")]),
    "ConditioningZeroOut": ([], [("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")]),
    "EmptySD3LatentImage": (["width", "height", "batch_size"], [], [("LATENT", "LATENT")]),
    "TetriServeLoadDiT": (["unet_name", "weight_dtype", "shift"], [], [("model", "TETRISERVE_MODEL")]),
    "TetriServeSampler": (["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise", "deadline_s", "priority"],
                          [("model", "TETRISERVE_MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                           ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "VAELoader": (["vae_name"], [], [("VAE", "VAE")]),
    "VAEDecode": ([], [("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "SaveImage": (["filename_prefix"], [("images", "IMAGE")], []),
    "LoadImage": (["image"], [], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "InpaintModelConditioning": (["noise_mask"], [("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                                  ("vae", "VAE"), ("pixels", "IMAGE"), ("mask", "MASK")],
                                 [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")]),
    "FluxKontextImageScale": ([], [("image", "IMAGE")], [("IMAGE", "IMAGE")]),
    "VAEEncode": ([], [("pixels", "IMAGE"), ("vae", "VAE")], [("LATENT", "LATENT")]),
    "ReferenceLatent": ([], [("conditioning", "CONDITIONING"), ("latent", "LATENT")],
                        [("CONDITIONING", "CONDITIONING")]),
}
#: widgets followed by a "control after generate" value in the UI format
CONTROLLED = {("TetriServeSampler", "seed")}
#: widgets followed by a UI-only value (the upload button of LoadImage)
UI_ONLY = {("LoadImage", "image"): "image"}


@dataclass
class Node:
    id: int
    cls: str
    widgets: dict = field(default_factory=dict)
    links: dict = field(default_factory=dict)  # input name -> (source node id, output slot)
    pos: tuple[int, int] = (0, 0)
    title: str | None = None


def api_format(nodes: list[Node]) -> dict:
    prompt = {}
    for n in nodes:
        inputs = {**n.widgets, **{name: [str(src), slot] for name, (src, slot) in n.links.items()}}
        order = CLASSES[n.cls][0] + [name for name, _ in CLASSES[n.cls][1]]
        prompt[str(n.id)] = {"class_type": n.cls, "inputs": {k: inputs[k] for k in order if k in inputs},
                             "_meta": {"title": n.title or n.cls}}
    return prompt


def ui_format(nodes: list[Node]) -> dict:
    by_id = {n.id: n for n in nodes}
    links = []
    for n in nodes:
        for name, (src, slot) in n.links.items():
            target_slot = [i for i, _ in CLASSES[n.cls][1]].index(name)
            links.append([len(links) + 1, src, slot, n.id, target_slot, CLASSES[by_id[src].cls][2][slot][1]])
    out_nodes = []
    for order, n in enumerate(nodes):
        widgets, sockets, outputs = CLASSES[n.cls]
        values = []
        for w in widgets:
            if w in n.widgets:
                values.append(n.widgets[w])
                if (n.cls, w) in CONTROLLED:
                    values.append("fixed")
                if (n.cls, w) in UI_ONLY:
                    values.append(UI_ONLY[n.cls, w])
        node = {
            "id": n.id, "type": n.cls, "pos": list(n.pos), "size": [315, 60 + 26 * (len(values) + len(sockets))],
            "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": name, "type": typ, "link": next((l[0] for l in links if l[3] == n.id and l[4] == i),
                                                                  None)}
                       for i, (name, typ) in enumerate(sockets)],
            "outputs": [{"name": name, "type": typ, "links": [l[0] for l in links if l[1] == n.id and l[2] == i]}
                        for i, (name, typ) in enumerate(outputs)],
            "properties": {"Node name for S&R": n.cls},
            "widgets_values": values,
        }
        if n.title:
            node["title"] = n.title
        out_nodes.append(node)
    return {"last_node_id": max(n.id for n in nodes), "last_link_id": len(links), "nodes": out_nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}},
            "version": 0.4}


# --------------------------------------------------------------------------- the workflows
def _flux_text(y: int = 0) -> list[Node]:
    return [
        Node(1, "DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                   "type": "flux", "device": "default"}, pos=(0, y)),
        Node(2, "CLIPTextEncode", {"text": "a lighthouse on a cliff at dawn, volumetric light, film grain"},
             {"clip": (1, 0)}, pos=(360, y), title="prompt"),
        Node(3, "FluxGuidance", {"guidance": 3.5}, {"conditioning": (2, 0)}, pos=(720, y)),
        Node(4, "ConditioningZeroOut", {}, {"conditioning": (2, 0)}, pos=(720, y + 120), title="negative (unused at cfg 1)"),
        Node(5, "TetriServeLoadDiT", {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default", "shift": 0.0},
             pos=(0, y + 200)),
        Node(6, "VAELoader", {"vae_name": "ae.safetensors"}, pos=(0, y + 360)),
    ]


def flux_t2i() -> list[Node]:
    return _flux_text() + [
        Node(7, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, pos=(360, 200)),
        Node(8, "TetriServeSampler", {"seed": 42, "steps": 20, "cfg": 1.0, "sampler_name": "euler",
                                      "scheduler": "simple", "denoise": 1.0, "deadline_s": 20.0, "priority": 0},
             {"model": (5, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (7, 0)}, pos=(1080, 0)),
        Node(9, "VAEDecode", {}, {"samples": (8, 0), "vae": (6, 0)}, pos=(1440, 0)),
        Node(10, "SaveImage", {"filename_prefix": "tetriserve_flux"}, {"images": (9, 0)}, pos=(1440, 120)),
    ]


def sd3_cfg() -> list[Node]:
    return [
        Node(1, "TripleCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
                                     "clip_name3": "t5xxl_fp16.safetensors"}, pos=(0, 0)),
        Node(2, "CLIPTextEncode", {"text": "a watercolor fox in a snowy forest, soft morning light"},
             {"clip": (1, 0)}, pos=(360, 0), title="positive"),
        Node(3, "CLIPTextEncode", {"text": "blurry, low quality, deformed"}, {"clip": (1, 0)}, pos=(360, 220),
             title="negative"),
        Node(4, "TetriServeLoadDiT", {"unet_name": "sd3.5_medium.safetensors", "weight_dtype": "default",
                                      "shift": 0.0}, pos=(0, 200)),
        Node(5, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, pos=(0, 360)),
        Node(6, "VAELoader", {"vae_name": "sd3_vae.safetensors"}, pos=(0, 500)),
        Node(7, "TetriServeSampler", {"seed": 7, "steps": 28, "cfg": 4.5, "sampler_name": "dpmpp_2m",
                                      "scheduler": "sgm_uniform", "denoise": 1.0, "deadline_s": 30.0, "priority": 0},
             {"model": (4, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (5, 0)}, pos=(720, 0)),
        Node(8, "VAEDecode", {}, {"samples": (7, 0), "vae": (6, 0)}, pos=(1080, 0)),
        Node(9, "SaveImage", {"filename_prefix": "tetriserve_sd3"}, {"images": (8, 0)}, pos=(1080, 120)),
    ]


def flux_multi_deadline() -> list[Node]:
    """One prompt, three resolutions with their own deadlines, sampled concurrently by the service."""
    nodes = _flux_text()
    sizes = [(512, 512, 8.0, 1), (768, 1024, 20.0, 0), (1024, 1024, 45.0, 0)]
    for i, (w, h, deadline, priority) in enumerate(sizes):
        base, y = 7 + 4 * i, 420 * i
        nodes += [
            Node(base, "EmptySD3LatentImage", {"width": w, "height": h, "batch_size": 1}, pos=(720, 260 + y)),
            Node(base + 1, "TetriServeSampler", {"seed": 100 + i, "steps": 20, "cfg": 1.0, "sampler_name": "euler",
                                                 "scheduler": "simple", "denoise": 1.0, "deadline_s": deadline,
                                                 "priority": priority},
                 {"model": (5, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (base, 0)},
                 pos=(1080, y), title=f"{w}x{h}, deadline {deadline:g} s"),
            Node(base + 2, "VAEDecode", {}, {"samples": (base + 1, 0), "vae": (6, 0)}, pos=(1440, y)),
            Node(base + 3, "SaveImage", {"filename_prefix": f"tetriserve_flux_{w}x{h}"}, {"images": (base + 2, 0)},
                 pos=(1440, y + 120)),
        ]
    return nodes


def flux_fill_inpaint() -> list[Node]:
    """FLUX Fill: the image and its mask (paint it in the mask editor) through InpaintModelConditioning."""
    return [
        Node(1, "DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                   "type": "flux", "device": "default"}, pos=(0, 0)),
        Node(2, "CLIPTextEncode", {"text": "a red brick fireplace with a small fire"}, {"clip": (1, 0)},
             pos=(360, 0), title="prompt"),
        Node(3, "FluxGuidance", {"guidance": 30.0}, {"conditioning": (2, 0)}, pos=(720, 0)),
        Node(4, "ConditioningZeroOut", {}, {"conditioning": (2, 0)}, pos=(720, 120), title="negative (unused at cfg 1)"),
        Node(5, "TetriServeLoadDiT", {"unet_name": "flux1-fill-dev.safetensors", "weight_dtype": "default",
                                      "shift": 0.0}, pos=(0, 200)),
        Node(6, "VAELoader", {"vae_name": "ae.safetensors"}, pos=(0, 360)),
        Node(7, "LoadImage", {"image": "example.png"}, pos=(0, 480), title="image (paint the mask)"),
        Node(8, "InpaintModelConditioning", {"noise_mask": False},
             {"positive": (3, 0), "negative": (4, 0), "vae": (6, 0), "pixels": (7, 0), "mask": (7, 1)},
             pos=(1080, 0), title="masked image + mask (noise_mask off)"),
        Node(9, "TetriServeSampler", {"seed": 11, "steps": 20, "cfg": 1.0, "sampler_name": "euler",
                                      "scheduler": "simple", "denoise": 1.0, "deadline_s": 25.0, "priority": 0},
             {"model": (5, 0), "positive": (8, 0), "negative": (8, 1), "latent_image": (8, 2)}, pos=(1440, 0)),
        Node(10, "VAEDecode", {}, {"samples": (9, 0), "vae": (6, 0)}, pos=(1800, 0)),
        Node(11, "SaveImage", {"filename_prefix": "tetriserve_flux_fill"}, {"images": (10, 0)}, pos=(1800, 120)),
    ]


def flux_kontext_edit() -> list[Node]:
    """FLUX Kontext: the input image, scaled to a Kontext size and encoded, as a reference latent."""
    return [
        Node(1, "DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                   "type": "flux", "device": "default"}, pos=(0, 0)),
        Node(2, "CLIPTextEncode", {"text": "make it a snowy winter evening, keep the composition"}, {"clip": (1, 0)},
             pos=(360, 0), title="edit instruction"),
        Node(3, "LoadImage", {"image": "example.png"}, pos=(0, 480)),
        Node(4, "FluxKontextImageScale", {}, {"image": (3, 0)}, pos=(360, 480)),
        Node(5, "VAELoader", {"vae_name": "ae.safetensors"}, pos=(0, 360)),
        Node(6, "VAEEncode", {}, {"pixels": (4, 0), "vae": (5, 0)}, pos=(720, 480)),
        Node(7, "ReferenceLatent", {}, {"conditioning": (2, 0), "latent": (6, 0)}, pos=(720, 0)),
        Node(8, "FluxGuidance", {"guidance": 2.5}, {"conditioning": (7, 0)}, pos=(1080, 0)),
        Node(9, "ConditioningZeroOut", {}, {"conditioning": (2, 0)}, pos=(1080, 120),
             title="negative (unused at cfg 1)"),
        Node(10, "TetriServeLoadDiT", {"unet_name": "flux1-kontext-dev.safetensors", "weight_dtype": "default",
                                       "shift": 0.0}, pos=(0, 200)),
        Node(11, "TetriServeSampler", {"seed": 21, "steps": 20, "cfg": 1.0, "sampler_name": "euler",
                                       "scheduler": "simple", "denoise": 1.0, "deadline_s": 40.0, "priority": 0},
             {"model": (10, 0), "positive": (8, 0), "negative": (9, 0), "latent_image": (6, 0)}, pos=(1440, 0),
             title="edit (reference tokens double the sequence)"),
        Node(12, "VAEDecode", {}, {"samples": (11, 0), "vae": (5, 0)}, pos=(1800, 0)),
        Node(13, "SaveImage", {"filename_prefix": "tetriserve_flux_kontext"}, {"images": (12, 0)}, pos=(1800, 120)),
    ]


WORKFLOWS = {
    "tetriserve_flux_text_to_image": flux_t2i,
    "tetriserve_sd3_cfg": sd3_cfg,
    "tetriserve_flux_multi_resolution_deadlines": flux_multi_deadline,
    "tetriserve_flux_fill_inpaint": flux_fill_inpaint,
    "tetriserve_flux_kontext_edit": flux_kontext_edit,
}


def rendered() -> dict[Path, str]:
    files = {}
    for name, build in WORKFLOWS.items():
        nodes = build()
        files[UI_DIR / f"{name}.json"] = json.dumps(ui_format(nodes), indent=1) + "\n"
        files[API_DIR / f"{name}.json"] = json.dumps(api_format(nodes), indent=1) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered().items():
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if stale:
        print("out of date (run python workflows/build_workflows.py):", *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
