"""Parity of worker/samplers.py with ComfyUI's own sampling code.

tests/data/sampler_reference.safetensors was written by tests/tools/make_sampler_reference.py
running ComfyUI's functions (KSampler sigmas, KSamplerAdvanced windows, ModelSamplingFlux,
prepare_noise, latent formats, cfg_function, CFGGuider.inner_sample with every sampler).
Here the same cases are recomputed with our code and compared. The ``comfyui`` test regenerates
the reference from a live ComfyUI checkout (TETRISERVE_COMFYUI, TETRISERVE_COMFYUI_PYTHON).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from comfy_tetriserve import config
from comfy_tetriserve.worker import samplers as S
from comfy_tetriserve.errors import InvalidRequest

HERE = Path(__file__).parent
FIXTURE = HERE / "data" / "sampler_reference.safetensors"
GENERATOR = HERE / "tools" / "make_sampler_reference.py"
RTOL = 1e-6


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_sampler_reference", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_generator()


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    return tensors, meta


def _close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> float:
    """Assert agreement within RTOL of the reference's scale; return the relative error."""
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    ours, theirs = ours.double(), theirs.double()
    scale = max(float(theirs.abs().max()), 1e-12)
    err = float((ours - theirs).abs().max()) / scale
    assert err <= RTOL, f"{what}: max error {err:.3g} of the reference's scale"
    return err


def _shift_of(case_shift):
    if isinstance(case_shift, (list, tuple)):
        return S.flux_resolution_shift(*case_shift)
    return case_shift


def _trajectory(case: dict, sampler: str, options: dict | None = None) -> torch.Tensor:
    """Our whole KSampler path for one case: LATENT in, LATENT out."""
    family = case["family"]
    raw = torch.zeros(ref.LATENT_SHAPE) if case["latent"] == "zeros" else ref.ramp_latent()
    latent = S.prepare_latent(family, raw)
    noise = S.prepare_noise(latent, case["seed"])
    sigmas = S.compute_sigmas(family, case["scheduler"], case["steps"], case["denoise"], _shift_of(case["shift"]))
    cfg = case["cfg"]

    def denoise(x, sigma):
        return S.cfg_combine(ref.cond_denoiser(x, sigma), ref.uncond_denoiser(x, sigma), cfg)

    traj = S.start_trajectory(latent, noise, sigmas, sampler, seed=case["seed"], options=options)
    while not traj.done:
        traj = S.step(traj, denoise)
    return S.process_latent_out(family, S.finish_latent(traj))


def compare_with_reference(path: Path) -> dict[str, float]:
    """Compare every case of a reference file with our functions; return the worst errors."""
    tensors, meta = _read(path)
    worst: dict[str, float] = {}

    def note(kind: str, err: float) -> None:
        worst[kind] = max(worst.get(kind, 0.0), err)

    for family, scheduler, steps, denoise, shift, offset, n in meta["sigma_index"]:
        theirs = tensors["sigmas"][offset:offset + n]
        what = f"sigmas {family}/{scheduler}/{steps}/{denoise}/{shift}"
        if not bool(torch.isfinite(theirs).all()):  # ComfyUI's kl_optimal with one step: NaN
            with pytest.raises(InvalidRequest):
                S.compute_sigmas(family, scheduler, steps, denoise, shift)
            continue
        note("sigmas", _close(S.compute_sigmas(family, scheduler, steps, denoise, shift), theirs, what))

    for family, scheduler, steps, start, last, force, offset, n in meta["slice_index"]:
        ours = S.slice_sigmas(S.compute_sigmas(family, scheduler, steps), start, last, force)
        if n < 0:
            assert ours is None, f"window {start}:{last} of {steps} steps should skip sampling"
        else:
            note("slices", _close(ours, tensors["slices"][offset:offset + n], f"window {start}:{last}:{force}"))

    for height, width, shift in meta["resolution_shifts"]:
        assert S.flux_resolution_shift(height, width) == shift, (height, width)

    raw = ref.ramp_latent()
    assert torch.equal(S.prepare_noise(raw, 7), tensors["noise/seed7"])
    assert torch.equal(S.prepare_noise(raw, 2 ** 64 - 5), tensors["noise/big_seed"])
    assert torch.equal(S.prepare_noise(torch.zeros(3, 16, 2, 2), 11, [2, 0, 2]), tensors["noise/batch_index"])
    for family in ("sd3", "flux"):
        note("latent_format", _close(S.process_latent_in(family, raw), tensors[f"latent_in/{family}"], family))
        note("latent_format", _close(S.process_latent_out(family, raw), tensors[f"latent_out/{family}"], family))
    sigma = torch.full((2,), 0.37)
    cfg = S.cfg_combine(ref.cond_denoiser(raw, sigma), ref.uncond_denoiser(raw, sigma), 3.5)
    note("cfg", _close(cfg, tensors["cfg/3.5"], "cfg"))

    for case in ref.TRAJECTORY_CASES:
        ours_sigmas = S.compute_sigmas(case["family"], case["scheduler"], case["steps"], case["denoise"],
                                       _shift_of(case["shift"]))
        note("sigmas", _close(ours_sigmas, tensors[f"traj_sigmas/{case['name']}"], case["name"]))
        for sampler in ref.SAMPLERS:
            ours = _trajectory(case, sampler)
            note(sampler, _close(ours, tensors[f"traj/{case['name']}/{sampler}"], f"{case['name']}/{sampler}"))
        ours = _trajectory(case, "euler_ancestral", ref.ANCESTRAL_OPTIONS)
        note("euler_ancestral", _close(ours, tensors[f"traj/{case['name']}/euler_ancestral_opts"], case["name"]))
    return worst


def test_fixture_is_small_and_complete():
    assert FIXTURE.stat().st_size < 64 * 1024
    tensors, meta = _read(FIXTURE)
    assert len(meta["sigma_index"]) == len(ref.SIGMA_CASES)
    assert {s for _, s, *_ in meta["sigma_index"]} == set(S.SCHEDULERS)
    assert {k.split("/")[2] for k in tensors if k.startswith("traj/")} >= set(S.SAMPLERS)


def test_matches_comfyui_reference_fixture():
    worst = compare_with_reference(FIXTURE)
    assert set(worst) >= {"sigmas", "slices", "cfg", *S.SAMPLERS}


@pytest.mark.comfyui
def test_matches_live_comfyui(tmp_path):
    root, python = config.env("TETRISERVE_COMFYUI"), config.env("TETRISERVE_COMFYUI_PYTHON")
    if not root or not python:
        pytest.skip("set TETRISERVE_COMFYUI and TETRISERVE_COMFYUI_PYTHON to compare with a live ComfyUI")
    out = tmp_path / "reference.safetensors"
    proc = subprocess.run([python, str(GENERATOR), "--comfyui", root, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compare_with_reference(out)
