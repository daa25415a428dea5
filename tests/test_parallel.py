"""Ulysses attention: shard arithmetic, and sharded forwards over real gloo groups equal one device."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as tmp

from comfy_tetriserve.engine.parallel import SeqShard, split_range, split_sizes


def test_split_sizes_uneven_and_covering():
    assert split_sizes(3969, 2) == (1985, 1984)
    assert split_sizes(333, 4) == (84, 83, 83, 83)
    assert split_sizes(7, 8) == (1, 1, 1, 1, 1, 1, 1, 0)
    for n in (0, 1, 5, 63, 4096):
        for k in (1, 2, 4, 8):
            sizes = split_sizes(n, k)
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
            ranges = [split_range(n, k, r) for r in range(k)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_seq_shard_joint_sizes():
    s = SeqShard(rank=1, degree=2, num_text=7, num_image=63)
    assert s.text_sizes == (4, 3) and s.image_sizes == (32, 31)
    assert s.joint_sizes == (36, 34)
    assert s.text_range == (4, 7) and s.image_range == (32, 63)


# ----------------------------------------------------------------- multi-process
def _group_main(rank: int, world: int, store: str, family: str, ckpt: str, inputs: dict, queue) -> None:
    import torch.distributed as dist

    from comfy_tetriserve.engine.models import load_transformer
    from comfy_tetriserve.engine.parallel import GroupComm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = load_transformer(ckpt, dtype="fp32")
        results = {}
        for degree in (2, 4):
            if degree > world:
                continue
            ranks = list(range(degree))
            group = dist.new_group(ranks)  # every rank creates every group, in the same order
            if rank >= degree:
                continue
            comm = GroupComm(group, ranks, rank)
            out, votes = model.forward(inputs["x"], inputs["sigma"], inputs["context"], inputs["pooled"],
                                       inputs.get("guidance"), comm=comm, vote=float(rank == 1))
            results[degree] = (out, votes)
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


def run_sharded(family: str, ckpt: str, inputs: dict, world: int) -> dict:
    ctx = tmp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        store = os.path.join(d, "store")
        procs = [ctx.Process(target=_group_main, args=(r, world, store, family, ckpt, inputs, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=300) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    return results


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from comfy_tetriserve.engine.tiny import write_tiny_checkpoint

    d = tmp_path_factory.mktemp("parallel")
    return {"flux": str(write_tiny_checkpoint("flux", "bfl", d / "flux")),
            "sd3": str(write_tiny_checkpoint("sd3", "sd3_single", d / "sd3"))}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_sharded_forward_equals_single_device(family, checkpoints):
    """Odd token counts (7 text, 63 image: like 1008 px) over degrees 2 and 4, batch of 2."""
    from comfy_tetriserve.engine.models import load_transformer

    g = torch.Generator().manual_seed(5)
    inputs = {"x": torch.randn(2, 16, 14, 18, generator=g), "sigma": torch.tensor([0.9, 0.4]),
              "context": torch.randn(2, 7, 32, generator=g), "pooled": torch.randn(2, 16, generator=g)}
    if family == "flux":
        inputs["guidance"] = torch.tensor([3.5, 1.0])
    ref, votes = load_transformer(checkpoints[family], dtype="fp32").forward(
        inputs["x"], inputs["sigma"], inputs["context"], inputs["pooled"], inputs.get("guidance"))
    assert votes is None
    results = run_sharded(family, checkpoints[family], inputs, world=4)
    for degree in (2, 4):
        outs = [results[r][degree][0] for r in range(degree)]
        for r in range(1, degree):
            assert torch.equal(outs[r], outs[0]), "every rank must hold the same gathered output"
        rel = ((outs[0] - ref).norm() / ref.norm()).item()
        assert rel <= 1e-6, (degree, rel)
        # The piggy-backed vote: rank 1 voted 1, the others 0, and every rank sees all votes.
        assert results[0][degree][1].tolist() == [0.0, 1.0] + [0.0] * (degree - 2)
