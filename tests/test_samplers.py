"""worker/samplers.py and sampling/schedules.py: schedules, sampler math, resumability, errors.

Parity with ComfyUI itself is in test_samplers_parity.py.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import replace

import pytest
import torch

from comfy_tetriserve.worker import samplers as S
from comfy_tetriserve.errors import InvalidRequest

FLOW_FAMILIES = tuple(S.FAMILIES)
MU, SD = 0.3, 0.5  # the Gaussian "data" of the analytic denoiser


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact denoiser E[x0 | x] for data x0 ~ N(MU, SD^2) under x = (1 - s) x0 + s n.
    Its flow ODE from noise z at sigma 1 ends exactly at MU + SD * z."""
    s = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    a = 1 - s
    return MU + SD ** 2 * a / (a ** 2 * SD ** 2 + s ** 2) * (x - a * MU)


def wobbly_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Row-wise, non-linear, deterministic: enough to expose any state a split would lose."""
    s = sigma.reshape(-1, 1, 1, 1)
    return torch.tanh(x) * s * 0.6 + x * (1 - s) * 0.7 - 0.03 * torch.cos(3 * x)


def run(traj: S.Trajectory, denoise=wobbly_denoiser, until: int | None = None) -> S.Trajectory:
    until = traj.num_steps if until is None else until
    while traj.step_index < until:
        traj = S.step(traj, denoise)
    return traj


def start(sampler: str, family: str = "flux", steps: int = 6, seed: int = 17, batch: int = 2,
          latent_nonzero: bool = False, options=None) -> S.Trajectory:
    raw = torch.linspace(-1, 1, batch * 16 * 16).reshape(batch, 16, 4, 4) if latent_nonzero \
        else torch.zeros(batch, 16, 4, 4)
    latent = S.prepare_latent(family, raw)
    noise = S.prepare_noise(latent, seed)
    sigmas = S.compute_sigmas(family, "simple", steps, 0.8 if latent_nonzero else 1.0)
    return S.start_trajectory(latent, noise, sigmas, sampler, seed=seed, options=options)


# ---------------------------------------------------------------- schedules

@pytest.mark.parametrize("family", FLOW_FAMILIES)
@pytest.mark.parametrize("scheduler", list(S.SCHEDULERS))
def test_schedules_descend_from_one_to_zero(family, scheduler):
    for steps in (2, 3, 7, 20, 50):
        sigmas = S.compute_sigmas(family, scheduler, steps)
        assert sigmas.dtype == torch.float32 and sigmas.dim() == 1
        assert float(sigmas[-1]) == 0.0
        assert bool((sigmas[1:] < sigmas[:-1]).all()), f"{scheduler} not strictly decreasing: {sigmas}"
        if scheduler == "ddim_uniform":  # strided table entries: starts below the top, length varies
            assert 0.5 < float(sigmas[0]) < 1.0 and len(sigmas) >= steps + 1
            continue
        assert float(sigmas[0]) == pytest.approx(1.0, abs=1e-6)
        if scheduler == "beta":  # repeated quantiles are dropped
            assert len(sigmas) <= steps + 1
        else:
            assert len(sigmas) == steps + 1


def test_model_sampling_tables():
    sd3, flux, schnell = (S.model_sigmas(f) for f in ("sd3", "flux", "flux-schnell"))
    assert (len(sd3), len(flux), len(schnell)) == (1000, 10000, 1000)
    for table in (sd3, flux, schnell):
        assert float(table[-1]) == 1.0 and bool((table[1:] > table[:-1]).all())
    assert torch.allclose(schnell, torch.arange(1, 1001) / 1000)  # shift 1: sigma = t
    t = torch.tensor(0.25)
    assert float(S.model_sigmas("sd3")[249]) == pytest.approx(float(3 * t / (1 + 2 * t)), rel=1e-6)
    assert float(flux[2499]) == pytest.approx(float(torch.exp(torch.tensor(1.15)) / (torch.exp(torch.tensor(1.15)) + 3)), rel=1e-6)
    assert float(S.model_sigmas("sd3", shift=1.0)[99]) == pytest.approx(0.1)


def test_simple_schedule_values():
    assert S.compute_sigmas("flux-schnell", "simple", 4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert S.compute_sigmas("sd3", "simple", 4).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-6)
    assert torch.equal(S.simple_sigmas(S.model_sigmas("flux"), 5), S.compute_sigmas("flux", "simple", 5))


def test_shift_changes_the_schedule():
    low, high = (S.compute_sigmas("flux", "simple", 10, shift=s) for s in (0.5, 3.0))
    assert bool((low[1:-1] < high[1:-1]).all())
    assert torch.equal(S.compute_sigmas("sd3", "normal", 9, shift=3.0), S.compute_sigmas("sd3", "normal", 9))


@pytest.mark.parametrize("scheduler", ["simple", "normal", "beta", "sgm_uniform", "karras"])
@pytest.mark.parametrize("steps,denoise", [(10, 0.5), (7, 0.3), (20, 0.75), (1, 0.2)])
def test_denoise_keeps_the_tail_of_a_longer_schedule(scheduler, steps, denoise):
    tail = S.compute_sigmas("flux", scheduler, steps, denoise)
    full = S.compute_sigmas("flux", scheduler, int(steps / denoise))
    assert torch.equal(tail, full[-(steps + 1):])
    assert float(tail[0]) < 1.0 and float(tail[-1]) == 0.0
    if scheduler != "beta":
        assert len(tail) == steps + 1


def test_denoise_threshold_and_range():
    assert torch.equal(S.compute_sigmas("sd3", "simple", 20, 0.99995), S.compute_sigmas("sd3", "simple", 20))
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(InvalidRequest, match="denoise"):
            S.compute_sigmas("sd3", "simple", 20, bad)


def test_kl_optimal_single_step_is_refused():
    # ComfyUI computes 0/0 there (NaN sigmas); a schedule of 2+ steps is fine
    with pytest.raises(InvalidRequest, match="finite"):
        S.compute_sigmas("flux", "kl_optimal", 1)
    assert len(S.compute_sigmas("flux", "kl_optimal", 1, denoise=0.5)) == 2


def test_slice_sigmas_like_ksampler_advanced():
    sigmas = S.compute_sigmas("flux", "simple", 10)
    assert torch.equal(S.slice_sigmas(sigmas, 0, 10000), sigmas)
    window = S.slice_sigmas(sigmas, 3, 7)
    assert torch.equal(window, sigmas[3:8])
    forced = S.slice_sigmas(sigmas, 3, 7, force_full_denoise=True)
    assert torch.equal(forced[:-1], sigmas[3:7]) and float(forced[-1]) == 0.0
    assert float(sigmas[7]) > 0  # the input is not modified
    assert S.slice_sigmas(sigmas, 10) is None and S.slice_sigmas(sigmas, 12) is None


def test_validate_sigmas():
    good = S.validate_sigmas([1.0, 0.5, 0.5, 0.0])
    assert good.dtype == torch.float32 and good.tolist() == [1.0, 0.5, 0.5, 0.0]
    f64 = torch.tensor([0.9, 0.1], dtype=torch.float64)
    assert S.validate_sigmas(f64) is f64  # accepted as given
    for bad, msg in [([1.0], "at least 2"), ([[1.0, 0.0]], "1-D"), ([1.0, float("nan"), 0.0], "finite"),
                     ([0.5, 0.7, 0.0], "non-increasing"), ([1.0, -0.1], ">= 0"), ([0.5, 0.0, 0.0], "only the last"),
                     ([1.0, 1.0], "last sigma"), ("abc", "list of numbers")]:
        with pytest.raises(InvalidRequest, match=msg):
            S.validate_sigmas(bad)


def test_flux_resolution_shift():
    assert S.flux_resolution_shift(1024, 1024) == pytest.approx(1.15)
    assert S.flux_resolution_shift(256, 256) == pytest.approx(0.5)
    assert S.flux_resolution_shift(512, 512) == pytest.approx(0.5 + 0.65 * (1024 - 256) / 3840)
    assert S.flux_resolution_shift(768, 1344) == S.flux_resolution_shift(1344, 768)
    with pytest.raises(InvalidRequest):
        S.flux_resolution_shift(0, 512)


def test_unknown_names():
    with pytest.raises(InvalidRequest, match="family"):
        S.compute_sigmas("sdxl", "simple", 4)
    with pytest.raises(InvalidRequest, match="scheduler"):
        S.compute_sigmas("flux", "bogus", 4)
    with pytest.raises(InvalidRequest, match="steps"):
        S.compute_sigmas("flux", "simple", 0)
    with pytest.raises(InvalidRequest, match="sampler"):
        start("euler_a")
    with pytest.raises(InvalidRequest, match="option"):
        start("euler", options={"eta": 0.5})
    with pytest.raises(InvalidRequest, match="option"):
        start("euler_ancestral", options={"eta": -1.0})
    with pytest.raises(InvalidRequest, match="seed"):
        start("euler", seed=2 ** 64)
    with pytest.raises(InvalidRequest, match="sampler"):
        S.num_model_calls("nope", torch.tensor([1.0, 0.0]))


# ---------------------------------------------------------------- latent space and helpers

def test_latent_formats_round_trip_and_values():
    x = torch.randn(1, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    for family in FLOW_FAMILIES:
        xf = torch.randn(1, S.FAMILIES[family].latent_channels, 3, 3, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(S.process_latent_out(family, S.process_latent_in(family, xf)), xf, atol=1e-6)
    assert torch.allclose(S.process_latent_in("sd3", x), (x - 0.0609) * 1.5305)
    assert torch.allclose(S.process_latent_in("flux", x), (x - 0.1159) * 0.3611)


def test_prepare_latent_rules():
    empty = S.prepare_latent("flux", torch.zeros(2, 4, 8, 8))  # a 4-channel empty latent
    assert empty.shape == (2, 16, 8, 8) and torch.count_nonzero(empty) == 0
    assert torch.count_nonzero(S.prepare_latent("sd3", torch.zeros(1, 16, 2, 2))) == 0  # no shift applied
    img = torch.full((1, 16, 2, 2), 0.5)
    assert torch.equal(S.prepare_latent("sd3", img), S.process_latent_in("sd3", img))
    with pytest.raises(InvalidRequest, match="channels"):
        S.prepare_latent("flux", torch.ones(1, 4, 2, 2))
    with pytest.raises(InvalidRequest, match=r"\[B, C, H, W\]"):
        S.prepare_latent("flux", torch.zeros(16, 2, 2))


def test_prepare_noise_is_comfyui_cpu_noise():
    latent = torch.zeros(2, 16, 3, 3)
    assert torch.equal(S.prepare_noise(latent, 5), torch.randn(2, 16, 3, 3, generator=torch.Generator().manual_seed(5)))
    gen = torch.Generator().manual_seed(9)
    draws = [torch.randn(1, 16, 3, 3, generator=gen) for _ in range(3)]
    assert torch.equal(S.prepare_noise(torch.zeros(3, 16, 3, 3), 9, [2, 0, 2]), torch.cat([draws[2], draws[0], draws[2]]))
    with pytest.raises(InvalidRequest, match="batch_index"):
        S.prepare_noise(latent, 9, [0])


def test_model_space_helpers():
    x = torch.randn(2, 16, 2, 2, generator=torch.Generator().manual_seed(1))
    v = torch.randn(2, 16, 2, 2, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    assert torch.equal(S.denoised_from_model_output(x, v, torch.tensor([0.25, 0.25])), x - v.float() * 0.25)
    assert torch.equal(S.denoised_from_model_output(x, v, torch.tensor(0.25)), x - v.float() * 0.25)
    rows = S.denoised_from_model_output(x, v, torch.tensor([0.5, 0.25]))
    assert torch.equal(rows[1], (x - v.float() * 0.25)[1])
    assert float(S.timestep_of_sigma("sd3", torch.tensor(0.5))) == 500.0
    assert float(S.timestep_of_sigma("flux", torch.tensor(0.5))) == 0.5
    assert float(S.timestep_of_sigma("flux-schnell", torch.tensor(0.5))) == 0.5
    assert S.sampling_family("flux", guidance_embeds=False) == "flux-schnell"
    assert S.sampling_family("flux") == "flux" and S.sampling_family("sd3", False) == "sd3"
    latent = torch.randn(1, 16, 2, 2)
    assert torch.equal(S.noise_scaling(torch.tensor(1.0), x[:1], latent), x[:1])
    assert torch.allclose(S.inverse_noise_scaling(torch.tensor(0.2), latent * 0.8), latent)
    assert S.max_denoise("flux", S.compute_sigmas("flux", "simple", 4))
    assert not S.max_denoise("flux", S.compute_sigmas("flux", "simple", 4, denoise=0.5))


def test_cfg():
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])
    assert torch.equal(S.cfg_combine(cond, uncond, 3.0), uncond + (cond - uncond) * 3.0)
    assert torch.equal(S.cfg_combine(cond, uncond, 1.0), cond)
    assert torch.equal(S.cfg_combine(cond, None, 1.0), cond)
    assert torch.equal(S.cfg_combine(cond, None, 1.5), cond * 1.5)  # ComfyUI's skipped uncond is zeros
    assert S.cfg_skips_uncond(1.0) and S.cfg_skips_uncond(1.0 + 1e-12) and not S.cfg_skips_uncond(1.01)


def test_num_model_calls():
    sigmas = S.compute_sigmas("flux", "simple", 5)
    assert S.num_model_calls("euler", sigmas) == 5
    assert S.num_model_calls("heun", sigmas) == 9  # the last step (to sigma 0) is an Euler step
    assert S.num_model_calls("dpmpp_2s_ancestral", sigmas, 1, 3) == 4

    calls = []
    traj = run(start("heun", steps=5), lambda x, s: calls.append(1) or wobbly_denoiser(x, s))
    assert len(calls) == 9 and traj.done


# ---------------------------------------------------------------- sampler math (analytic)

def _ode_error(sampler: str, steps: int) -> float:
    z = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    traj = run(S.start_trajectory(torch.zeros_like(z), z, sigmas, sampler), gaussian_denoiser)
    return float((S.finish_latent(traj) - (MU + SD * z)).abs().max())


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2), ("ipndm", 2)])
def test_deterministic_samplers_converge_to_the_exact_flow(sampler, order):
    coarse, fine = _ode_error(sampler, 32), _ode_error(sampler, 64)
    assert fine < coarse
    assert coarse / fine == pytest.approx(2 ** order, rel=0.25)
    assert fine < (0.04 if order == 1 else 0.006)


def test_gradient_estimation_beats_euler():
    assert _ode_error("gradient_estimation", 64) < _ode_error("euler", 64)


def test_euler_step_is_exact_for_a_point_mass():
    # data = one point x0: the denoiser returns x0 and each Euler step lands on the exact path
    x0 = torch.full((1, 16, 2, 2), 0.7)
    noise = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(3))
    sigmas = S.compute_sigmas("sd3", "simple", 5)
    traj = S.start_trajectory(torch.zeros_like(x0), noise, sigmas, "euler")
    for i in range(5):
        traj = S.step(traj, lambda x, s: x0.expand_as(x))
        s = sigmas[i + 1]
        assert torch.allclose(traj.x, s * noise + (1 - s) * x0, atol=1e-6)


@pytest.mark.parametrize("sampler,steps,tol", [("euler_ancestral", 300, 0.04), ("dpmpp_2s_ancestral", 60, 0.015)])
def test_ancestral_samplers_sample_the_data_distribution(sampler, steps, tol):
    latent = torch.zeros(1, 16, 32, 32, dtype=torch.float64)
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    traj = run(S.start_trajectory(latent, S.prepare_noise(latent, 5), sigmas, sampler, seed=5), gaussian_denoiser)
    out = S.finish_latent(traj)
    assert float(out.mean()) == pytest.approx(MU, abs=4 * SD / out.numel() ** 0.5)  # 4 standard errors
    assert float(out.std()) == pytest.approx(SD, rel=tol)


def test_euler_ancestral_without_eta_is_euler():
    a = run(start("euler_ancestral", options={"eta": 0.0}))
    b = run(start("euler"))
    assert torch.allclose(a.x, b.x, atol=1e-6)
    assert a.noise_device is None and S.RNG_KEY not in a.memory  # no noise drawn


def test_options_change_the_result():
    base = run(start("euler_ancestral")).x
    assert not torch.equal(run(start("euler_ancestral", options={"s_noise": 0.5})).x, base)
    assert torch.equal(run(start("euler_ancestral", options={"eta": 1.0, "s_noise": 1.0})).x, base)


def test_ancestral_noise_stream_is_seeded_like_comfyui():
    # ComfyUI seeds a fresh generator on the sampling device with the noise seed: on CPU the
    # first ancestral draw repeats the initial noise
    traj = S.step(start("euler_ancestral", seed=1234), wobbly_denoiser)
    gen = torch.Generator().manual_seed(1234)
    torch.randn(2, 16, 4, 4, generator=gen)
    assert traj.noise_device == "cpu"
    assert torch.equal(traj.memory[S.RNG_KEY], gen.get_state())


# ---------------------------------------------------------------- resumability

def _round_trip(traj: S.Trajectory, how: str) -> S.Trajectory:
    if how == "pickle":
        return pickle.loads(pickle.dumps(traj))
    if how == "torch.save":
        buf = io.BytesIO()
        torch.save({"x": traj.x, "sigmas": traj.sigmas, "memory": traj.memory}, buf)
        buf.seek(0)
        tensors = torch.load(buf)
        return S.Trajectory(tensors["x"], tensors["sigmas"], traj.step_index, traj.sampler, traj.seed,
                            tensors["memory"], dict(traj.options), traj.noise_device)
    return traj.to("cpu")


@pytest.mark.parametrize("sampler", list(S.SAMPLERS))
def test_split_anywhere_is_bitwise_identical(sampler):
    fresh = start(sampler, family="sd3", steps=7, latent_nonzero=True)
    whole = run(fresh)
    for a in range(fresh.num_steps + 1):
        for how in ("pickle", "torch.save", "to"):
            first = _round_trip(run(fresh, until=a), how)
            resumed = run(first)
            assert torch.equal(resumed.x, whole.x), f"{sampler}: split at {a} via {how}"
            assert torch.equal(S.finish_latent(resumed), S.finish_latent(whole))


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2s_ancestral", "lcm"])
def test_replicas_draw_identical_noise(sampler):
    traj = run(start(sampler), until=2)
    copies = [pickle.loads(pickle.dumps(traj)) for _ in range(3)]
    stepped = [S.step(c, wobbly_denoiser) for c in copies]
    for other in stepped[1:]:
        assert torch.equal(other.x, stepped[0].x)
        assert torch.equal(other.memory[S.RNG_KEY], stepped[0].memory[S.RNG_KEY])
    assert not torch.equal(stepped[0].memory[S.RNG_KEY], traj.memory[S.RNG_KEY])  # the stream advanced


def test_finished_trajectory_and_foreign_noise_device():
    done = run(start("euler", steps=2))
    with pytest.raises(InvalidRequest, match="finished"):
        S.step(done, wobbly_denoiser)
    cuda_stream = replace(start("euler_ancestral"), noise_device="cuda")
    with pytest.raises(InvalidRequest, match="cuda"):
        S.step(cuda_stream, wobbly_denoiser)


def test_pinned_cpu_noise_device():
    pinned = run(S.start_trajectory(torch.zeros(1, 16, 2, 2), torch.ones(1, 16, 2, 2),
                                    S.compute_sigmas("flux", "simple", 4), "euler_ancestral", seed=3, noise_device="cpu"))
    follow = run(S.start_trajectory(torch.zeros(1, 16, 2, 2), torch.ones(1, 16, 2, 2),
                                    S.compute_sigmas("flux", "simple", 4), "euler_ancestral", seed=3))
    assert pinned.noise_device == follow.noise_device == "cpu" and torch.equal(pinned.x, follow.x)
    with pytest.raises(InvalidRequest, match="noise_device"):
        S.start_trajectory(torch.zeros(1, 16, 2, 2), torch.ones(1, 16, 2, 2), torch.tensor([1.0, 0.0]),
                           "euler", noise_device="cuda:0")


def test_trajectory_to_keeps_the_rng_state_on_cpu():
    traj = S.step(start("lcm"), wobbly_denoiser).to("cpu")
    assert traj.memory[S.RNG_KEY].device.type == "cpu" and traj.memory[S.RNG_KEY].dtype == torch.uint8


def test_start_checks_inputs():
    latent = torch.zeros(1, 16, 2, 2)
    with pytest.raises(InvalidRequest, match="noise shape"):
        S.start_trajectory(latent, torch.zeros(1, 16, 2, 3), S.compute_sigmas("flux", "simple", 3), "euler")
    with pytest.raises(InvalidRequest, match="non-increasing"):
        S.start_trajectory(latent, latent, torch.tensor([0.5, 0.8, 0.0]), "euler")
    traj = S.start_trajectory(latent, torch.ones_like(latent), torch.tensor([0.6, 0.0]), "euler")
    assert torch.allclose(traj.x, torch.full_like(latent, 0.6))
    legacy = S.Trajectory(x=latent, sigmas=torch.tensor([1.0, 0.0]), step_index=0, sampler="euler")
    assert S.step(legacy, wobbly_denoiser).done


@pytest.mark.parametrize("sampler", list(S.SAMPLERS))
def test_a_step_never_reads_a_tensor_on_the_host(sampler, monkeypatch):
    """Every sampler branches on the host copy of the sigmas: no step turns a tensor into a Python bool
    or number (on a GPU that waits for the device every step). The trajectory is first made (that
    reads the sigmas once), then every step runs with Tensor.__bool__/__float__/item refusing."""
    traj = start(sampler, steps=5, options={"eta": 1.0} if "eta" in S.SAMPLER_OPTIONS[sampler] else None)
    expected = run(traj)

    def refuse(self, *args):
        raise AssertionError("a tensor was read on the host inside a sampler step")

    for name in ("__bool__", "__float__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    with pytest.raises(AssertionError, match="read on the host"):
        bool(torch.ones(1))  # the trap is armed
    got = run(traj)
    monkeypatch.undo()
    assert torch.equal(got.x, expected.x)
