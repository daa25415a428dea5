"""Ulysses attention: shard arithmetic, and sharded forwards over real gloo groups equal one device."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as tmp

from comfy_tetriserve.worker.parallel import SeqShard, split_range, split_sizes


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
def _group_main(rank: int, world: int, store: str, cases: dict, queue) -> None:
    """One rank: every family's sharded forward at every degree <= world; results to the queue."""
    import torch.distributed as dist

    from comfy_tetriserve.worker.models import load_transformer
    from comfy_tetriserve.worker.parallel import GroupComm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        groups = {k: dist.new_group(list(range(k))) for k in (2, 4) if k <= world}  # same order on every rank
        results = {}
        for family, (ckpt, inputs) in cases.items():
            model = load_transformer(ckpt, dtype="fp32")
            for degree, group in groups.items():
                if rank < degree:
                    comm = GroupComm(group, list(range(degree)), rank)
                    results[family, degree] = model.forward(inputs["x"], inputs["sigma"], inputs["context"],
                                                            inputs["pooled"], inputs.get("guidance"), comm=comm,
                                                            vote=float(rank == 1),
                                                            text_lengths=inputs.get("text_lengths"))
        # by value (numpy pickles its bytes): a tensor would be shared through a file descriptor that
        # vanishes if this process exits before the parent has read the queue
        queue.put((rank, {key: tuple(t.detach().cpu().numpy() for t in value) for key, value in results.items()}))
    finally:
        dist.destroy_process_group()


def run_sharded(cases: dict, world: int) -> dict:
    ctx = tmp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        store = os.path.join(d, "store")
        procs = [ctx.Process(target=_group_main, args=(r, world, store, cases, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results = {rank: {key: tuple(torch.from_numpy(a) for a in value) for key, value in found.items()}
                   for rank, found in (queue.get(timeout=300) for _ in procs)}
        for p in procs:
            p.join(timeout=60)
    return results


@pytest.mark.slow
def test_sharded_forward_equals_single_device(tmp_path):
    """Odd token counts (7 text, 63 image: like 1008 px) over degrees 2 and 4, batch of 2, both families."""
    from comfy_tetriserve.worker.models import load_transformer
    from comfy_tetriserve.worker.tiny import write_tiny_checkpoint

    cases = {}
    for family, layout in (("flux", "bfl"), ("sd3", "sd3_single")):
        g = torch.Generator().manual_seed(5)
        inputs = {"x": torch.randn(2, 16, 14, 18, generator=g), "sigma": torch.tensor([0.9, 0.4]),
                  "context": torch.randn(2, 7, 32, generator=g), "pooled": torch.randn(2, 16, generator=g)}
        if family == "flux":
            inputs["guidance"] = torch.tensor([3.5, 1.0])
        cases[family] = (str(write_tiny_checkpoint(family, layout, tmp_path / family)), inputs)
        # the second row's text padded from 4 to 7 tokens and masked: the mask follows the shards
        cases[f"{family}-masked"] = (cases[family][0], {**inputs, "text_lengths": [7, 4]})
    results = run_sharded(cases, world=4)
    for family, (ckpt, inputs) in cases.items():
        ref, votes = load_transformer(ckpt, dtype="fp32").forward(
            inputs["x"], inputs["sigma"], inputs["context"], inputs["pooled"], inputs.get("guidance"),
            text_lengths=inputs.get("text_lengths"))
        if "text_lengths" in inputs:  # the masked reference is the row's own 4-token forward
            own = load_transformer(ckpt, dtype="fp32").forward(
                inputs["x"][1:], inputs["sigma"][1:], inputs["context"][1:, :4], inputs["pooled"][1:],
                None if inputs.get("guidance") is None else inputs["guidance"][1:])[0]
            assert float((ref[1:] - own).norm() / own.norm()) <= 1e-5
        assert votes is None
        for degree in (2, 4):
            outs = [results[r][family, degree][0] for r in range(degree)]
            for r in range(1, degree):
                assert torch.equal(outs[r], outs[0]), "every rank must hold the same gathered output"
            err = float((outs[0] - ref).norm() / ref.norm())
            assert err <= 1e-6, (family, degree, err)
            # The piggy-backed vote: rank 1 voted 1, the others 0, and every rank sees all votes.
            assert results[0][family, degree][1].tolist() == [0.0, 1.0] + [0.0] * (degree - 2)
