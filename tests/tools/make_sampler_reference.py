"""Write the sampling reference fixture by running ComfyUI's own sampling code.

Run it with the python of a ComfyUI venv (it imports ComfyUI from the checkout given by
--comfyui or $TETRISERVE_COMFYUI; it does not import comfy_tetriserve):

    $TETRISERVE_COMFYUI_PYTHON tests/tools/make_sampler_reference.py \
        --comfyui $TETRISERVE_COMFYUI --out tests/data/sampler_reference.safetensors

The fixture holds, computed by ComfyUI: KSampler sigmas for every scheduler x family x a few
step counts and denoise values (and custom shifts through the ModelSamplingSD3 /
ModelSamplingFlux nodes), KSamplerAdvanced step windows, ModelSamplingFlux's resolution shift,
initial noise (with and without batch_index), latent format in/out, CFG, and the final LATENT of
short trajectories of every sampler run through ComfyUI's CFGGuider.inner_sample with the
synthetic denoisers below. tests/test_samplers_parity.py recomputes all of it with
comfy_tetriserve.worker.samplers and compares. Everything above ``main`` must stay importable
without ComfyUI: the test reads the case lists and the denoisers from here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types

import torch

FAMILIES = ("sd3", "flux", "flux-schnell")
SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
              "linear_quadratic", "kl_optimal")
SAMPLERS = ("euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2s_ancestral", "lcm", "ipndm",
            "gradient_estimation")

#: (family, scheduler, steps, denoise, shift or None)
SIGMA_CASES = [(f, s, n, d, None) for f in FAMILIES for s in SCHEDULERS for n in (1, 4, 20)
               for d in (1.0, 0.5, 0.3)]
SIGMA_CASES += [(f, s, 10, 1.0, shift) for f, shift in (("sd3", 1.0), ("sd3", 6.0), ("flux", 0.5),
                                                        ("flux", 1.3)) for s in SCHEDULERS]

#: (family, scheduler, steps, start_step, last_step, force_full_denoise) for KSamplerAdvanced
SLICE_CASES = [("flux", "simple", 10, 0, 10000, False), ("flux", "simple", 10, 3, 7, False),
               ("flux", "simple", 10, 3, 7, True), ("sd3", "normal", 8, 6, 100, True),
               ("sd3", "beta", 8, 8, 100, False), ("sd3", "beta", 8, 12, 100, False),
               ("flux", "karras", 6, 0, 2, True)]

#: (height, width) for ModelSamplingFlux's default base 0.5 / max 1.15
RESOLUTIONS = [(1024, 1024), (512, 512), (256, 256), (768, 1344), (1536, 1024), (2048, 2048), (16, 16)]

LATENT_SHAPE = (2, 16, 2, 2)

#: trajectory configurations: every sampler runs each of them
TRAJECTORY_CASES = [
    {"name": "flux_t2i", "family": "flux", "scheduler": "simple", "steps": 6, "denoise": 1.0, "shift": None,
     "seed": 123, "cfg": 1.0, "latent": "zeros"},
    {"name": "sd3_i2i_cfg", "family": "sd3", "scheduler": "sgm_uniform", "steps": 5, "denoise": 0.6,
     "shift": None, "seed": 2 ** 40 + 3, "cfg": 2.5, "latent": "ramp"},
    {"name": "flux_res_normal", "family": "flux", "scheduler": "normal", "steps": 5, "denoise": 1.0,
     "shift": (512, 768), "seed": 7, "cfg": 3.0, "latent": "zeros"},
    {"name": "schnell_beta", "family": "flux-schnell", "scheduler": "beta", "steps": 4, "denoise": 1.0,
     "shift": None, "seed": 99, "cfg": 1.0, "latent": "ramp"},
]

ANCESTRAL_OPTIONS = {"eta": 0.7, "s_noise": 1.3}  # a non-default run of euler_ancestral


def ramp_latent(shape=LATENT_SHAPE) -> torch.Tensor:
    """A deterministic raw (VAE-space) latent with non-zero entries."""
    n = 1
    for d in shape:
        n *= d
    return (torch.arange(n, dtype=torch.float32).reshape(shape) / n - 0.4) * 1.7


def _sigma_rows(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (x.dim() - 1)))


def cond_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Synthetic 'cond' prediction of the clean latent (row-wise, smooth, non-linear)."""
    s = _sigma_rows(sigma, x)
    return s * torch.tanh(x) * 0.5 + (1 - s) * x * 0.8 + 0.05


def uncond_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = _sigma_rows(sigma, x)
    return 0.9 * x * (1 - s) + 0.02 * torch.sin(x)


# ---------------------------------------------------------------- ComfyUI side (imports comfy)

def _comfy(root: str) -> types.SimpleNamespace:
    sys.path.insert(0, root)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.latent_formats
    import comfy.model_base
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models
    from comfy_extras import nodes_model_advanced
    return types.SimpleNamespace(latent_formats=comfy.latent_formats, model_base=comfy.model_base,
                                 sample=comfy.sample, samplers=comfy.samplers,
                                 supported=comfy.supported_models, advanced=nodes_model_advanced)


class _StubPatcher:
    """Just enough of a ModelPatcher for KSampler and the ModelSampling* nodes."""

    def __init__(self, config, objects):
        self.model = types.SimpleNamespace(model_config=config)
        self.objects = dict(objects)
        self.model_options = {}

    def clone(self):
        return _StubPatcher(self.model.model_config, self.objects)

    def add_object_patch(self, name, obj):
        self.objects[name] = obj

    def get_model_object(self, name):
        return self.objects[name]


def _patcher(c, family: str, shift) -> _StubPatcher:
    mb = c.model_base
    if family == "sd3":
        config, kind = c.supported.SD3({"in_channels": 16}), mb.ModelType.FLOW
    elif family == "flux":
        config, kind = c.supported.Flux({"image_model": "flux", "guidance_embed": True}), mb.ModelType.FLUX
    else:
        config, kind = c.supported.FluxSchnell({"image_model": "flux", "guidance_embed": False}), mb.ModelType.FLOW
    patcher = _StubPatcher(config, {"model_sampling": mb.model_sampling(config, kind),
                                    "latent_format": config.latent_format})
    if shift is None:
        return patcher
    if family == "sd3":
        return c.advanced.ModelSamplingSD3().patch(patcher, shift)[0]
    if isinstance(shift, (tuple, list)):  # (height, width) through the node's defaults
        height, width = shift
        return c.advanced.ModelSamplingFlux().patch(patcher, 1.15, 0.5, width, height)[0]
    return c.advanced.ModelSamplingFlux().patch(patcher, shift, shift, 1024, 1024)[0]


def _ksampler_sigmas(c, family, scheduler, steps, denoise, shift, sampler="euler") -> torch.Tensor:
    ks = c.samplers.KSampler(_patcher(c, family, shift), steps=steps, device="cpu", sampler=sampler,
                             scheduler=scheduler, denoise=denoise)
    return ks.sigmas.clone().float()


def _slice(c, family, scheduler, steps, start, last, force):
    captured = {}
    real_sample = c.samplers.sample

    def capture(model, noise, positive, negative, cfg, device, sampler, sigmas, *a, **kw):
        captured["sigmas"] = sigmas.clone()
        return noise

    c.samplers.sample = capture
    try:
        ks = c.samplers.KSampler(_patcher(c, family, None), steps=steps, device="cpu", sampler="euler",
                                 scheduler=scheduler, denoise=1.0)
        latent = torch.zeros(LATENT_SHAPE)
        ks.sample(torch.zeros(LATENT_SHAPE), [], [], 1.0, latent_image=latent, start_step=start,
                  last_step=last, force_full_denoise=force)
    finally:
        c.samplers.sample = real_sample
    return captured.get("sigmas")


def _run_trajectory(c, case: dict, sampler_name: str, options: dict | None):
    patcher = _patcher(c, case["family"], case["shift"])
    ms = patcher.get_model_object("model_sampling")
    latent_raw = torch.zeros(LATENT_SHAPE) if case["latent"] == "zeros" else ramp_latent()
    latent_raw = c.sample.fix_empty_latent_channels(patcher, latent_raw)
    noise = c.sample.prepare_noise(latent_raw, case["seed"])
    sigmas = _ksampler_sigmas(c, case["family"], case["scheduler"], case["steps"], case["denoise"], case["shift"])
    cfg = case["cfg"]
    samplers = c.samplers

    class Guider(samplers.CFGGuider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):
            cond = cond_denoiser(x, timestep)
            uncond = uncond_denoiser(x, timestep)
            return samplers.cfg_function(self.inner_model, cond, uncond, cfg, x, timestep, model_options={})

    guider = Guider(patcher)
    fmt = patcher.get_model_object("latent_format")
    guider.inner_model = types.SimpleNamespace(model_sampling=ms, process_latent_in=fmt.process_in,
                                               process_latent_out=fmt.process_out)
    guider.conds = {}
    sampler = samplers.ksampler(sampler_name, options or {})
    out = guider.inner_sample(noise, latent_raw, "cpu", sampler, sigmas, None, None, True, case["seed"])
    return sigmas, out


def build(root: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    c = _comfy(root)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, object] = {}

    chunks, index = [], []
    offset = 0
    for family, scheduler, steps, denoise, shift in SIGMA_CASES:
        s = _ksampler_sigmas(c, family, scheduler, steps, denoise, shift)
        chunks.append(s)
        index.append([family, scheduler, steps, denoise, shift, offset, int(s.numel())])
        offset += int(s.numel())
    tensors["sigmas"] = torch.cat(chunks)
    meta["sigma_index"] = index

    chunks, index, offset = [], [], 0
    for case in SLICE_CASES:
        s = _slice(c, *case)
        n = -1 if s is None else int(s.numel())
        if s is not None:
            chunks.append(s.float())
        index.append(list(case) + [offset, n])
        offset += max(n, 0)
    tensors["slices"] = torch.cat(chunks)
    meta["slice_index"] = index

    shifts = []
    for h, w in RESOLUTIONS:
        ms = _patcher(c, "flux", (h, w)).get_model_object("model_sampling")
        shifts.append([h, w, ms.shift])
    meta["resolution_shifts"] = shifts

    raw = ramp_latent()
    tensors["noise/seed7"] = c.sample.prepare_noise(raw, 7)
    tensors["noise/big_seed"] = c.sample.prepare_noise(raw, 2 ** 64 - 5)
    tensors["noise/batch_index"] = c.sample.prepare_noise(torch.zeros(3, 16, 2, 2), 11, [2, 0, 2])
    for name, fmt in (("sd3", c.latent_formats.SD3()), ("flux", c.latent_formats.Flux())):
        tensors[f"latent_in/{name}"] = fmt.process_in(raw)
        tensors[f"latent_out/{name}"] = fmt.process_out(raw)
    x = ramp_latent()
    sigma = torch.full((2,), 0.37)
    tensors["cfg/3.5"] = c.samplers.cfg_function(None, cond_denoiser(x, sigma), uncond_denoiser(x, sigma), 3.5, x, sigma)

    for case in TRAJECTORY_CASES:
        for sampler_name in SAMPLERS:
            sigmas, out = _run_trajectory(c, case, sampler_name, None)
            tensors[f"traj/{case['name']}/{sampler_name}"] = out
        tensors[f"traj_sigmas/{case['name']}"] = sigmas
        _, out = _run_trajectory(c, case, "euler_ancestral", ANCESTRAL_OPTIONS)
        tensors[f"traj/{case['name']}/euler_ancestral_opts"] = out

    import comfyui_version
    meta["comfyui_version"] = comfyui_version.__version__
    meta["torch_version"] = torch.__version__
    return {k: v.contiguous() for k, v in tensors.items()}, {k: json.dumps(v) for k, v in meta.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("TETRISERVE_COMFYUI"),
                   help="ComfyUI checkout (default: $TETRISERVE_COMFYUI)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data", "sampler_reference.safetensors"))
    args = p.parse_args(argv)
    if not args.comfyui:
        p.error("give --comfyui or set TETRISERVE_COMFYUI")
    tensors, meta = build(os.path.abspath(args.comfyui))
    from safetensors.torch import save_file
    save_file(tensors, args.out, metadata=meta)
    print(f"wrote {args.out}: {len(tensors)} tensors, {os.path.getsize(args.out)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
