"""The worker's step path: masked batching of different text lengths, the RoPE cache, one batching path."""
from __future__ import annotations

import pytest
import torch

from comfy_tetriserve.errors import InvalidRequest
from comfy_tetriserve.worker.models import LoadedModel
from comfy_tetriserve.worker.parallel import SeqShard
from comfy_tetriserve.worker.runner import Conditioning, StepRunner
from comfy_tetriserve.worker.samplers import compute_sigmas, start_trajectory, step
from comfy_tetriserve.worker.stepcache import LruCache, joint_key_mask, padded_lengths
from comfy_tetriserve.worker.tiny import TINY_CONFIGS, random_model

torch.set_grad_enabled(False)


def tiny(family: str) -> LoadedModel:
    config = dict(TINY_CONFIGS[family])
    return LoadedModel(name=f"tiny-{family}", family=family, config=config, module=random_model(config, seed=3),
                       dtype=torch.float32, device=torch.device("cpu"), source=f"random:tiny-{family}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_padded_rows_equal_their_own_forwards(family):
    model = tiny(family)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 14, 18, generator=g)
    sigma = torch.tensor([0.9, 0.7, 0.4])
    lengths = [9, 4, 6]
    ctxs = [torch.randn(1, n, 32, generator=g) for n in lengths]
    pooled = torch.randn(3, 16, generator=g)
    guidance = torch.tensor([3.5, 2.0, 4.0])
    alone = [model.forward(x[i:i + 1], sigma[i:i + 1], ctxs[i], pooled[i:i + 1], guidance[i:i + 1])[0]
             for i in range(3)]
    padded = torch.cat([torch.nn.functional.pad(c, (0, 0, 0, 9 - c.shape[1])) for c in ctxs])
    together = model.forward(x, sigma, padded, pooled, guidance, text_lengths=lengths)[0]
    unmasked = model.forward(x, sigma, padded, pooled, guidance)[0]
    for i in range(3):
        assert rel(together[i], alone[i][0]) < 1e-5
    # the mask is what makes it exact: without it the padded rows differ by far more
    assert rel(unmasked[1], alone[1][0]) > 1e-2 and rel(unmasked[2], alone[2][0]) > 1e-2
    assert rel(unmasked[0], alone[0][0]) < 1e-5  # the longest row has no padding


@pytest.mark.parametrize("family,sampler", [("flux", "euler"), ("sd3", "dpmpp_2m"), ("flux", "heun")])
def test_cfg_with_different_text_lengths_is_one_exact_forward(family, sampler):
    model = tiny(family)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, 14, 18, generator=g)
    cond = Conditioning("r", model.name, torch.randn(1, 11, 32, generator=g), torch.randn(1, 16, generator=g),
                        cfg=4.0, guidance=3.5, neg_context=torch.randn(1, 5, 32, generator=g),
                        neg_pooled=torch.randn(1, 16, generator=g))
    traj = start_trajectory(torch.zeros_like(noise), noise, compute_sigmas(family, "simple", 4), sampler)
    calls: list[int] = []
    runner = StepRunner(model, None, max_pad_fraction=float("inf"))  # as on a GPU: always one forward
    inner = model.forward

    def counted(x, *args, **kwargs):
        calls.append(x.shape[0])
        return inner(x, *args, **kwargs)

    model.forward = counted
    batched = runner.step([traj], [cond], 0.0)[0][0]
    model.forward = inner
    assert calls and all(b == 2 for b in calls)  # cond and uncond in one forward per model call

    def separate(x, sigma):  # ComfyUI's CFG from two unbatched forwards
        s = sigma.reshape(-1)
        c = x - model.forward(x, s, cond.context, cond.pooled, torch.tensor([3.5]))[0] * s.view(-1, 1, 1, 1)
        u = x - model.forward(x, s, cond.neg_context, cond.neg_pooled, torch.tensor([3.5]))[0] * s.view(-1, 1, 1, 1)
        return u + (c - u) * cond.cfg

    reference = step(traj, separate)
    no_cfg = step(traj, lambda x, s: x - model.forward(x, s.reshape(-1), cond.context, cond.pooled,
                                                       torch.tensor([3.5]))[0] * s.reshape(-1, 1, 1, 1))
    err = rel(batched.x, reference.x)
    assert err < 1e-5
    assert rel(no_cfg.x, reference.x) > 1e3 * max(err, 1e-7)  # CFG's uncond changes the step by far more


def test_requests_at_different_steps_and_samplers_batch_exactly():
    model = tiny("sd3")
    g = torch.Generator().manual_seed(2)
    trajs, conds = [], []
    for i, (sampler, n_text, at) in enumerate((("euler", 7, 0), ("dpmpp_2m", 3, 2), ("euler_ancestral", 12, 1))):
        noise = torch.randn(1, 16, 12, 12, generator=g)
        t = start_trajectory(torch.zeros_like(noise), noise, compute_sigmas("sd3", "simple", 5), sampler, seed=i)
        conds.append(Conditioning(f"r{i}", model.name, torch.randn(1, n_text, 32, generator=g),
                                  torch.randn(1, 16, generator=g)))
        for _ in range(at):
            t = StepRunner(model, None).step([t], [conds[-1]], 0.0)[0][0]
        trajs.append(t)
    calls: list[int] = []
    inner = model.forward
    model.forward = lambda x, *a, **k: (calls.append(x.shape[0]), inner(x, *a, **k))[1]
    together, _ = StepRunner(model, None, max_pad_fraction=float("inf")).step(trajs, conds, 0.0)
    assert calls == [3]  # one forward for three requests of three text lengths
    calls.clear()
    apart, _ = StepRunner(model, None, max_pad_fraction=0.0).step(trajs, conds, 0.0)
    model.forward = inner
    assert sorted(calls) == [1, 1, 1]  # no padding allowed: one forward per text length
    assert StepRunner(model, None).max_pad_fraction == 0.0  # the CPU default: equal lengths only
    for got, other in zip(together, apart):
        assert rel(got.x, other.x) < 1e-5
    for t, c, got in zip(trajs, conds, together):
        alone = StepRunner(model, None).step([t], [c], 0.0)[0][0]
        assert got.step_index == t.step_index + 1
        assert rel(got.x, alone.x) < 1e-5


def test_flux_rope_cached_per_shape_and_shard():
    from comfy_tetriserve.worker.flux_inputs import flux_image_inputs

    model = tiny("flux")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 14, 18, generator=g)
    args = (torch.tensor([0.5]), torch.randn(1, 7, 32, generator=g), torch.randn(1, 16, generator=g))
    plain = (14, 18, (), None)
    first = model.forward(x, *args)[0]
    assert model.rope_cache.keys() == [(plain, 7, 1, 0)] and model.rope_cache.misses == 1
    again = model.forward(x, *args)[0]
    assert torch.equal(first, again) and model.rope_cache.hits == 1
    model.forward(torch.randn(1, 16, 18, 14, generator=g), *args)  # transposed latent: a new key
    model.forward(x, args[0], torch.randn(1, 5, 32, generator=g), args[2])  # other text length: a new key
    ref = torch.randn(1, 16, 8, 10, generator=g)
    with_ref = model.forward(x, *args, refs=(ref,))[0]  # a Kontext reference: its ids are part of the key
    assert model.rope_cache.keys() == [(plain, 7, 1, 0), ((18, 14, (), None), 7, 1, 0), (plain, 5, 1, 0),
                                       ((14, 18, ((8, 10),), "offset"), 7, 1, 0)]
    assert not torch.equal(with_ref, first)
    model.rope_cache.clear()
    assert torch.equal(model.forward(x, *args, refs=(ref,))[0], with_ref)  # recomputed: the same table
    # a rank of a degree-2 group gets its own shard's rotary table, equal to the full table's rows
    _, img_ids, _ = flux_image_inputs(x)
    shard = SeqShard(1, 2, 7, 63)
    full = model.flux_rope(img_ids, plain, SeqShard(0, 1, 7, 63))
    part = model.flux_rope(img_ids, plain, shard)
    t0, t1 = shard.text_range
    i0, i1 = shard.image_range
    rows = list(range(t0, t1)) + [7 + i for i in range(i0, i1)]
    for a, b in zip(part, full):
        assert torch.equal(a, b[rows])
    assert (plain, 7, 2, 1) in model.rope_cache.keys()


def test_lru_cache_bounds_and_order():
    cache = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert cache.keys() == ["a", "c"] and cache.get("b") is None
    with pytest.raises(ValueError):
        LruCache(0)


def test_key_mask_layout_and_checks():
    assert padded_lengths(None, 2, 5) is None
    assert padded_lengths([5, 5], 2, 5) is None
    assert padded_lengths([5, 3], 2, 5) == (5, 3)
    with pytest.raises(InvalidRequest):
        padded_lengths([5], 2, 5)
    with pytest.raises(InvalidRequest):
        padded_lengths([6, 1], 2, 5)
    # degree 2, 5 padded text tokens (3 + 2), 4 image tokens (2 + 2), rows of 5 and 3 valid tokens
    m = joint_key_mask((3, 2), (2, 2), (5, 3), True, torch.device("cpu"))[:, 0, 0]
    assert m.tolist() == [[True] * 9, [True, True, True, True, True, False, False, True, True]]
    m = joint_key_mask((3, 2), (2, 2), (5, 3), False, torch.device("cpu"))[:, 0, 0]  # SD3: image first
    assert m[1].tolist() == [True, True, True, True, True, True, True, False, False]


def test_step_timer_reads_each_step_once_in_order():
    from comfy_tetriserve.worker.steptime import StepTimer

    timer = StepTimer(torch.device("cpu"))
    for _ in range(2):
        timer.start()
        torch.ones(100).sum()
        timer.stop()
    got = timer.ready()
    assert [j for j, _ in got] == [0, 1] and all(t > 0 for _, t in got)
    assert timer.ready() == [] and timer.finish() == []
    timer.start()
    timer.stop()
    assert [j for j, _ in timer.finish()] == [2] and len(timer.times) == 3


def test_deferred_vote_agrees_one_step_late_on_cuda_only():
    from comfy_tetriserve.worker.steptime import DeferredVote

    now = DeferredVote(torch.device("cpu"))
    assert now.agreed(torch.tensor([0.0, 1.0])) is True and now.agreed(torch.tensor([0.0, 0.0])) is False
    assert now.agreed(True) is True and now.agreed(False) is False
    late = DeferredVote(torch.device("cpu"))
    late.defer = True  # what a CUDA worker does: read the previous step's votes (already computed)
    assert late.agreed(torch.tensor([0.0, 0.0])) is False
    assert late.agreed(torch.tensor([0.0, 1.0])) is False  # this step's stop vote ...
    assert late.agreed(torch.tensor([0.0, 0.0])) is True  # ... is honoured after the next step


def test_key_masks_are_built_once_per_layout():
    a = joint_key_mask((3, 2), (2, 2), (5, 3), True, torch.device("cpu"))
    assert joint_key_mask((3, 2), (2, 2), (5, 3), True, torch.device("cpu")) is a
    assert joint_key_mask((3, 2), (2, 2), (5, 4), True, torch.device("cpu")) is not a
    assert not torch.equal(joint_key_mask((3, 2), (2, 2), (5, 3), False, torch.device("cpu")), a)


def test_shared_conditioning_round_trip_with_fill_and_references():
    from multiprocessing import shared_memory

    from comfy_tetriserve.core.executor import SamplingJob
    from comfy_tetriserve.worker.condshare import free_block, share_conditioning

    g = torch.Generator().manual_seed(6)
    lat = torch.zeros(1, 16, 8, 8)
    job = SamplingJob(request_id="r", model="m", latent=lat, noise=lat, sigmas=torch.tensor([1.0, 0.0]),
                      context=torch.randn(1, 9, 32, generator=g), pooled=torch.randn(1, 16, generator=g),
                      cfg=3.0, guidance=2.5, neg_context=torch.randn(1, 4, 32, generator=g),
                      neg_pooled=torch.randn(1, 16, generator=g), concat=torch.randn(1, 80, 8, 8, generator=g),
                      ref_latents=(torch.randn(1, 16, 6, 10, generator=g), torch.randn(1, 16, 4, 4, generator=g)),
                      ref_method="index")
    handle, block = share_conditioning(job)
    try:
        cond = handle.load(torch.device("cpu"), torch.bfloat16)
        for name in ("context", "pooled", "neg_context", "neg_pooled", "concat"):
            assert torch.equal(getattr(cond, name), getattr(job, name).to(torch.bfloat16)), name
        assert [tuple(r.shape) for r in cond.refs] == [(1, 16, 6, 10), (1, 16, 4, 4)]
        assert all(torch.equal(a, b.to(torch.bfloat16)) for a, b in zip(cond.refs, job.ref_latents))
        assert (cond.cfg, cond.guidance, cond.ref_method) == (3.0, 2.5, "index")
        assert len(__import__("pickle").dumps(handle)) < 2000  # the handle, not the tensors, travels
    finally:
        free_block(block)
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=handle.block)
    assert torch.equal(cond.context, job.context.to(torch.bfloat16))  # the worker's copy outlives the block
