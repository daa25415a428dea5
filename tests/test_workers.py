"""The worker pool on four gloo CPU workers: one pool for the module (starting one costs ~20 s on 2 cores).

The test that kills a worker runs last: it ends with a degraded pool (closed by the fixture).
"""
from __future__ import annotations

import asyncio
import os
import pickle
import signal
import time

import pytest
import torch

from comfy_tetriserve.core.executor import DevicesUnavailable, Executor, SamplingJob
from comfy_tetriserve.worker.samplers import SAMPLERS, compute_sigmas, prepare_noise
from comfy_tetriserve.worker.tiny import write_tiny_checkpoint
from comfy_tetriserve.worker.pool import WorkerPool, parse_devices
from comfy_tetriserve.errors import Conflict, InvalidRequest, NotFound, WorkerError
from comfy_tetriserve.plan import aligned_groups
from comfy_tetriserve.types import Assignment

pytestmark = pytest.mark.slow


def test_parse_devices():
    assert parse_devices("cpu:4") == ["cpu"] * 4
    assert parse_devices("cuda:0-3") == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert parse_devices("cuda:0,1,3") == ["cuda:0", "cuda:1", "cuda:3"]
    assert parse_devices("cuda:2") == ["cuda:2"]
    assert parse_devices("cuda:0,0") == ["cuda:0", "cuda:0"]
    for bad in ("gpu:1", "cuda:", "cuda:3-1", "cuda:a", "cpu:0"):
        with pytest.raises(InvalidRequest):
            parse_devices(bad)
    with pytest.raises(InvalidRequest, match="NCCL"):
        WorkerPool(["cuda:0", "cuda:0"], backend="nccl")
    with pytest.raises(InvalidRequest, match="not a set of worker ids"):
        WorkerPool("cpu:2", groups=[(0, 2)])


class Harness:
    """A pool on a private event loop (the loop runs while a test awaits the pool)."""

    def __init__(self, tmp) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool = WorkerPool("cpu:4")
        self.tmp = tmp

    def __call__(self, coro):
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def h(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pool")
    harness = Harness(tmp)
    harness(harness.pool.start())
    harness(harness.pool.load_model("flux", str(write_tiny_checkpoint("flux", "comfy", tmp / "flux")), "fp32"))
    harness(harness.pool.load_model("sd3", str(write_tiny_checkpoint("sd3", "diffusers", tmp / "sd3")), "fp32"))
    yield harness
    harness(harness.pool.close())
    harness.loop.close()


def make_job(rid: str, model: str, steps: int = 4, seed: int = 0, sampler: str = "euler", cfg: float = 1.0,
             text_tokens: int = 7, neg_tokens: int = 7) -> SamplingJob:
    g = torch.Generator().manual_seed(seed + 100)
    latent = torch.zeros(1, 16, 14, 18)
    family = "flux" if model == "flux" else "sd3"
    return SamplingJob(request_id=rid, model=model, latent=latent, noise=prepare_noise(latent, seed),
                       sigmas=compute_sigmas(family, "simple", steps), context=torch.randn(1, text_tokens, 32, generator=g),
                       pooled=torch.randn(1, 16, generator=g), sampler=sampler, seed=seed, cfg=cfg,
                       guidance=3.5 if family == "flux" else None,
                       neg_context=torch.randn(1, neg_tokens, 32, generator=g) if cfg != 1.0 else None,
                       neg_pooled=torch.randn(1, 16, generator=g) if cfg != 1.0 else None)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


async def sample(pool, job, plan) -> torch.Tensor:
    await pool.admit(job)
    for group, steps in plan:
        result = await pool.execute(Assignment((job.request_id,), group, steps))
        assert result.error is None and result.steps_done == steps, result
    out = await pool.fetch_result(job.request_id)
    await pool.release(job.request_id)
    return out


def test_pool_is_an_executor_with_warm_groups(h):
    pool = h.pool
    assert isinstance(pool, Executor)
    assert pool.gpu_ids == (0, 1, 2, 3) and pool.groups == aligned_groups((0, 1, 2, 3)) and pool.backend == "gloo"
    assert [w["device"] for w in pool.worker_info] == ["cpu"] * 4
    assert len({w["pid"] for w in pool.worker_info}) == 4
    assert not any(w["cuda_graphs"] for w in pool.worker_info)  # eager (the flag is off; a no-op on CPU anyway)
    assert set(pool.models()) == {"flux", "sd3"}
    from comfy_tetriserve.worker.memory import lora_cache_bytes

    for rank, info in enumerate(pool.worker_info):  # the LoRA cache's limit each worker gets with its work
        limit = lora_cache_bytes(info["total_memory_bytes"], 4, pool.residency.budget_bytes(rank))
        assert pool.lora_cache_limits[rank] == limit and 0 < limit <= 4 << 30
    # Loading again is a no-op; the same name from another file is a conflict.
    assert h(pool.load_model("flux", pool._models["flux"][0], "fp32")) == pool.models()["flux"]
    with pytest.raises(Conflict):
        h(pool.load_model("flux", "random:tiny-flux", "fp32"))


def test_selfcheck_on_the_shared_pool(h):
    from comfy_tetriserve.worker.selfcheck import run_checks

    report = h(run_checks(h.pool, h.tmp / "selfcheck", variants=False))  # the variants: test_selfcheck.py
    assert set(report) == {"flux", "sd3"}
    for family, checks in report.items():
        image = {"fill", "kontext"} if family == "flux" else set()  # FLUX Fill / Kontext at degrees 2 and 4
        assert set(checks) == {"k2", "k4", "switching", "handoff"} | image, family
        assert all(0 <= v <= 1e-5 for v in checks.values()), report


def test_progress_callback_and_step_times(h):
    pool = h.pool
    seen = []
    h(pool.admit(make_job("progress", "flux", steps=5)))
    result = h(pool.execute(Assignment(("progress",), (0, 1), 3), lambda rid, i, s: seen.append((rid, i, s))))
    assert result.error is None and result.steps_done == 3 and len(result.step_times_s) == 3
    assert [(r, i) for r, i, _ in seen] == [("progress", 1), ("progress", 2), ("progress", 3)]
    assert all(s > 0 for _, _, s in seen) and result.finished_at >= result.started_at
    assert pool.checkpoint("progress").step_index == 3
    with pytest.raises(Conflict, match="steps left"):
        h(pool.fetch_result("progress"))
    result = h(pool.execute(Assignment(("progress",), (2, 3), 2), lambda rid, i, s: seen.append((rid, i, s))))
    assert [i for _, i, _ in seen[3:]] == [4, 5]  # step indices count over the whole trajectory
    assert h(pool.fetch_result("progress")).shape == (1, 16, 14, 18)
    h(pool.release("progress"))
    with pytest.raises(NotFound):
        pool.checkpoint("progress")


def test_conditioning_goes_once_through_shared_memory_off_the_event_loop(h):
    """4 MiB of conditioning (64 rows x 512 tokens x 32 channels, fp32) to a two-worker group."""
    from multiprocessing import shared_memory

    pool = h.pool
    job = make_job("big-cond", "flux", steps=3)
    g = torch.Generator().manual_seed(9)
    rows = 64
    job = SamplingJob(**{**job.__dict__, "latent": torch.zeros(rows, 16, 4, 4),
                         "noise": prepare_noise(torch.zeros(rows, 16, 4, 4), 0),
                         "context": torch.randn(rows, 512, 32, generator=g), "pooled": torch.randn(rows, 16, generator=g)})
    assert job.context.numel() * 4 == 4 * 2**20
    t0 = time.thread_time()  # CPU time of this thread, which runs the event loop (not the pool's threads)
    h(pool.admit(job))
    admit_s = time.thread_time() - t0
    req = pool._requests["big-cond"]
    assert req.shared is not None and req.shared.nbytes >= 4 * 2**20
    t0 = time.thread_time()
    r = h(pool.execute(Assignment(("big-cond",), (0, 1), 1)))
    execute_s = time.thread_time() - t0
    assert r.error is None and r.steps_done == 1
    r2 = h(pool.execute(Assignment(("big-cond",), (0, 1), 1)))  # the workers keep it: nothing is sent again
    assert r2.error is None
    # what the loop spent on this submit: well under 5 ms although 4 MiB reach two workers
    assert admit_s + execute_s < 5e-3, (admit_s, execute_s)
    block = req.shared.block
    shared_memory.SharedMemory(name=block).close()  # it exists while the job lives
    h(pool.release("big-cond"))
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=block)


def test_pool_checkpoint_reaches_a_new_group_through_one_member(h, monkeypatch):
    """A move to a group none of whose members holds the latest step (0,1 -> 2,3): the checkpoint
    goes in one member's message and that member broadcasts it; the result is exact, and the event
    loop pickles one copy instead of one per member (measured side by side with the old path)."""
    pool = h.pool
    ref = h(sample(pool, make_job("seed-ref", "flux", steps=4, seed=5), [((0,), 4)]))
    other = h(sample(pool, make_job("seed-other", "flux", steps=4, seed=6), [((0,), 4)]))
    assert rel(other, ref) > 1e-2  # the margin: another latent is 1000x the tolerance below away
    sent: dict[int, int] = {}
    real_send = pool._send

    def counting_send(rank, *msg):
        if msg and msg[0] == "run":
            sent[rank] = sent.get(rank, 0) + len(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
        return real_send(rank, *msg)

    monkeypatch.setattr(pool, "_send", counting_send)
    monkeypatch.setattr(pool, "seed_min_bytes", 0)  # the tiny latent is far below the default's 512 KiB
    seeded_before = len(pool.stats["handoff_seed_s"])
    out = {}
    for mode in (True, False):
        pool.seed_broadcast = mode
        sent.clear()
        rid = f"seed-{mode}"
        h(pool.admit(make_job(rid, "flux", steps=4, seed=5)))
        assert h(pool.execute(Assignment((rid,), (0, 1), 2))).error is None
        sent.clear()
        r = h(pool.execute(Assignment((rid,), (2, 3), 2)))  # neither 2 nor 3 holds step 2
        assert r.error is None and r.steps_done == 2
        out[mode] = dict(sent)
        assert rel(h(pool.fetch_result(rid)), ref) <= 1e-5, mode
        h(pool.release(rid))
    pool.seed_broadcast = True
    latent_bytes = 16 * 14 * 18 * 4
    pool.seed_min_bytes = 1 << 40
    h(pool.admit(make_job("seed-small", "flux", steps=2, seed=5)))
    sent.clear()
    assert h(pool.execute(Assignment(("seed-small",), (0, 1), 1))).error is None
    assert abs(sent[0] - sent[1]) < latent_bytes  # below the threshold: in both messages, as before
    h(pool.release("seed-small"))
    # seeded twice: the first assignment on (0, 1) (no member holds a fresh request) and the move
    assert len(pool.stats["handoff_seed_s"]) == seeded_before + 2
    # seeded: only worker 2's message carries the latent; before, both members' messages did
    assert out[True][2] - out[True][3] >= latent_bytes and abs(out[False][2] - out[False][3]) < latent_bytes
    assert out[True][3] < out[False][3] - latent_bytes


def test_batched_assignment_equals_each_request_alone(h):
    """Requests at different steps, one with CFG whose halves differ in length, in one assignment."""
    pool = h.pool
    sampler = "heun" if "heun" in SAMPLERS else "euler"  # two model calls per step where available
    jobs = {"b1": dict(seed=1, sampler=sampler), "b2": dict(seed=2, sampler=sampler, cfg=3.0, neg_tokens=5),
            "b3": dict(seed=3, sampler=sampler, text_tokens=9)}
    alone = {rid: h(sample(pool, make_job(rid + "-alone", "sd3", steps=4, **kw), [((0,), 4)])) for rid, kw in jobs.items()}
    for rid, kw in jobs.items():
        h(pool.admit(make_job(rid, "sd3", steps=4, **kw)))
    r = h(pool.execute(Assignment(("b1",), (0,), 1)))  # b1 one step ahead of the others
    assert r.error is None
    r = h(pool.execute(Assignment(("b1", "b2", "b3"), (0, 1), 2)))
    assert r.error is None and r.steps_done == 2
    assert [pool.checkpoint(rid).step_index for rid in jobs] == [3, 2, 2]
    h(pool.execute(Assignment(("b1",), (2, 3), 1)))
    h(pool.execute(Assignment(("b2", "b3"), (0, 1, 2, 3), 2)))
    for rid in jobs:
        assert rel(h(pool.fetch_result(rid)), alone[rid]) <= 1e-5, rid
        h(pool.release(rid))


def test_disjoint_groups_run_concurrently_and_exactly(h):
    pool = h.pool
    refs = {rid: h(sample(pool, make_job(rid + "-ref", "flux", steps=3, seed=i), [((0,), 3)]))
            for i, rid in enumerate(("c1", "c2"))}
    for i, rid in enumerate(("c1", "c2")):
        h(pool.admit(make_job(rid, "flux", steps=3, seed=i)))

    async def both():
        return await asyncio.gather(pool.execute(Assignment(("c1",), (0, 1), 3)),
                                    pool.execute(Assignment(("c2",), (2, 3), 3)))

    results = h(both())
    assert all(r.error is None and r.steps_done == 3 for r in results)
    for rid in ("c1", "c2"):
        assert rel(h(pool.fetch_result(rid)), refs[rid]) <= 1e-5
        h(pool.release(rid))


def test_stop_ends_after_the_current_step_on_every_rank(h):
    pool = h.pool
    steps = 30
    ref = h(sample(pool, make_job("stop-ref", "flux", steps=steps, seed=5), [((0,), steps)]))
    h(pool.admit(make_job("stop", "flux", steps=steps, seed=5)))
    loop = h.loop

    def on_step(rid, index, seconds):
        if index == 2:
            loop.create_task(pool.stop(("stop",)))

    result = h(pool.execute(Assignment(("stop",), (0, 1, 2, 3), steps), on_step))
    assert result.error is None, result.error
    assert 2 <= result.steps_done < steps, result.steps_done
    assert pool.checkpoint("stop").step_index == result.steps_done
    left = steps - result.steps_done
    r = h(pool.execute(Assignment(("stop",), (2, 3), left)))  # resumes exactly where the group stopped
    assert r.error is None and r.steps_done == left
    assert rel(h(pool.fetch_result("stop")), ref) <= 1e-5
    h(pool.release("stop"))


def test_caller_errors_raise_and_work_errors_return(h):
    pool = h.pool
    with pytest.raises(NotFound):
        h(pool.execute(Assignment(("nobody",), (0,), 1)))
    h(pool.admit(make_job("err", "flux", steps=2)))
    with pytest.raises(Conflict):
        h(pool.admit(make_job("err", "flux", steps=2)))
    with pytest.raises(InvalidRequest, match="not one of the pool's groups"):
        h(pool.execute(Assignment(("err",), (1, 2), 1)))
    result = h(pool.execute(Assignment(("err",), (0,), 3)))
    assert result.error and "steps asked" in result.error and result.steps_done == 0
    with pytest.raises(NotFound):
        h(pool.admit(make_job("other", "sdxl")))
    bad = make_job("bad", "flux")
    with pytest.raises(InvalidRequest, match="context"):
        h(pool.admit(SamplingJob(**{**bad.__dict__, "context": torch.zeros(1, 7, 31)})))
    with pytest.raises(InvalidRequest, match="latent"):
        h(pool.admit(SamplingJob(**{**bad.__dict__, "latent": torch.zeros(1, 4, 14, 18)})))
    with pytest.raises(InvalidRequest):
        h(pool.load_model("missing", str(h.tmp / "missing.safetensors"), "fp32"))
    h(pool.release("err"))
    h(pool.release("never-admitted"))  # releasing twice or never admitted is harmless


def test_profile_rows_through_the_pool(h):
    from comfy_tetriserve.cost import ProfileTable, load_profile, save_profile
    from comfy_tetriserve.worker.profile import ProfileSpec, profile_model

    spec = ProfileSpec(resolutions=((64, 64), (112, 144)), batches=(1, 2), steps=2, warmup=1, text_tokens=7)
    model_profile, rows = h(profile_model(h.pool, "prof", "random:tiny-flux", "fp32", spec))
    assert (model_profile.num_heads, model_profile.num_attention_layers, model_profile.hidden_size,
            model_profile.num_text_tokens) == (4, 3, 64, 7)
    assert {(r.height, r.width, r.batch, r.sp_degree) for r in rows} == {
        (hh, ww, b, k) for hh, ww in ((64, 64), (112, 144)) for b in (1, 2) for k in (1, 2, 4)}
    assert all(r.includes_comm and r.compute_s > 0 for r in rows)
    path = h.tmp / "profile.json"
    save_profile(ProfileTable(models={"prof": model_profile}, rows=tuple(rows)), path)
    assert load_profile(path).rows == tuple(rows)


def test_out_of_memory_on_one_device_loses_the_assignment_not_the_worker(h):
    pool = h.pool
    ref = h(sample(pool, make_job("oom-ref", "flux", steps=5, seed=4), [((0,), 5)]))
    faults = []
    pool.on_fault = faults.append
    try:
        h(pool.admit(make_job("oom", "flux", steps=5, seed=4)))
        assert h(pool.execute(Assignment(("oom",), (1,), 2))).error is None
        h(pool.inject_fault(1, "oom"))
        result = h(pool.execute(Assignment(("oom",), (1,), 3)))
        assert result.lost and result.steps_done == 0 and "OutOfMemoryError" in result.error
        assert pool.alive and not pool.unavailable_gpu_ids and pool.checkpoint("oom").step_index == 2
        assert [(f.gpu_ids, f.request_ids, f.fatal) for f in faults] == [((), ("oom",), False)]
        r = h(pool.execute(Assignment(("oom",), (1,), 3)))  # the same worker, from the checkpoint
        assert r.error is None and rel(h(pool.fetch_result("oom")), ref) <= 1e-5
        h(pool.release("oom"))
    finally:
        pool.on_fault = None


def test_dead_worker_degrades_the_pool_and_restart_resumes_from_checkpoint(h):
    """Runs last: kills a worker (SIGKILL) under an assignment, then a CUDA-like error kills another."""
    pool = h.pool
    steps = 150
    ref = h(sample(pool, make_job("death-ref", "sd3", steps=7, seed=9), [((0,), 7)]))
    victim_ref = h(sample(pool, make_job("victim-ref", "sd3", steps=steps, seed=1), [((0,), steps)]))
    h(pool.admit(make_job("death", "sd3", steps=7, seed=9)))
    assert h(pool.execute(Assignment(("death",), (0, 1), 2))).error is None
    h(pool.admit(make_job("victim", "sd3", steps=steps, seed=1)))
    victim_pid = pool.worker_info[3]["pid"]
    faults = []
    pool.on_fault = faults.append
    pool.checkpoint_every_s = 0.0  # the leader checkpoints after every step of the assignment

    def on_step(rid, index, seconds):
        if index == 5:
            os.kill(victim_pid, signal.SIGKILL)

    try:
        t0 = time.monotonic()
        result = h(pool.execute(Assignment(("victim",), (2, 3), steps), on_step))
        assert time.monotonic() - t0 < 60
        assert result.error and "worker 3" in result.error and "killed by SIGKILL" in result.error
        # the steps up to the leader's last checkpoint inside the assignment are kept
        assert result.lost and 5 <= result.steps_done < steps, result
        assert pool.checkpoint("victim").step_index == result.steps_done
        victim_left = steps - result.steps_done
        assert pool.broken and not pool.alive and pool.needs_restart == pool.dead[3] == pool.broken
        assert faults[0].gpu_ids == (3,) and faults[0].request_ids == ("victim",) and faults[0].fatal
        # gloo: the dead rank's peer fails its collective at once and takes work again; groups without rank 3 run
        t0 = time.monotonic()
        while 2 in pool.unavailable_gpu_ids and time.monotonic() - t0 < 30:
            h(asyncio.sleep(0.02))
        assert pool.unavailable_gpu_ids == {3}
        assert h(pool.execute(Assignment(("death",), (0, 1), 1))).error is None  # degraded, still serving
        assert h(pool.execute(Assignment(("death",), (2,), 1))).error is None
        with pytest.raises(DevicesUnavailable, match="worker 3 .*died"):
            h(pool.execute(Assignment(("death",), (2, 3), 1)))
        with pytest.raises(WorkerError, match="recovering"):
            h(pool.load_model("late", "random:tiny-flux", "fp32"))
        h(pool.restart())
        assert pool.alive and {"flux", "sd3"} <= set(pool.models()) and pool.num_restarts == 1
        assert pool.worker_info[3]["pid"] != victim_pid and not pool.unavailable_gpu_ids
        r = h(pool.execute(Assignment(("death",), (2, 3), 3)))  # conditioning re-sent, latent from the checkpoint
        assert r.error is None and r.steps_done == 3
        assert rel(h(pool.fetch_result("death")), ref) <= 1e-5
        # the victim resumes from the checkpoint taken inside its lost assignment, and ends exactly
        r = h(pool.execute(Assignment(("victim",), (0, 1, 2, 3), victim_left)))
        assert r.error is None and r.steps_done == victim_left
        assert rel(h(pool.fetch_result("victim")), victim_ref) <= 1e-5
        # an unrecoverable device error inside a two-device assignment: the worker reports it and exits
        h(pool.admit(make_job("cuda", "flux", steps=4, seed=2)))
        h(pool.inject_fault(1, "cuda"))
        r = h(pool.execute(Assignment(("cuda",), (0, 1), 4)))
        assert r.lost and "worker 1 (cpu) died (exit code 70) after InjectedFault" in r.error
        assert "CUDA error" in r.error
        assert pool.dead.keys() == {1}
    finally:
        pool.on_fault = None
        pool.checkpoint_every_s = 1.0
