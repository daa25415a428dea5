"""LoRA per job: every key format against models loaded from merged weights, stacks, quantised bases,
the cache, errors, and the service's parsing and name resolution."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_tetriserve.errors import InvalidRequest, NotFound
from comfy_tetriserve.service.loras import adapter_key, parse_stack, resolve_lora, resolve_stack
from comfy_tetriserve.worker.lora import LoraCache, applied, check_lora, targets_of_config, targets_of_model
from comfy_tetriserve.worker.lora_files import lora_tensors, merge_lora, write_random_lora
from comfy_tetriserve.worker.models import load_transformer
from comfy_tetriserve.worker.tiny import tiny_state_dict, write_tiny_checkpoint

from test_models import inputs, run

ORIG = {"flux": "bfl", "sd3": "sd3_single"}
#: two stacks per family cover the four formats (ComfyUI's test strengths in the first)
STACKS = [(("kohya", 0.8), ("peft", -0.4)), (("bfl", 1.0), ("diff", 0.5))]


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    out = {}
    for family in ("flux", "sd3"):
        config, sd = tiny_state_dict(family)
        model = load_transformer(str(write_tiny_checkpoint(family, ORIG[family], d / family)), dtype="fp32")
        files = {fmt: write_random_lora(family, sd, fmt, d / f"{family}-{fmt}.safetensors", seed=i + 1)
                 for i, fmt in enumerate(("kohya", "peft", "bfl", "diff"))}
        out[family] = {"config": config, "sd": sd, "model": model, "files": files, "dir": d}
    return out


def merged_output(t, family, stack, tmp_path, sd=None):
    merged = merge_lora(family, sd if sd is not None else t["sd"],
                        [(load_file(str(t["files"][fmt])), s) for fmt, s in stack])
    path = tmp_path / f"{family}-merged.safetensors"
    save_file(merged, str(path))
    return run(load_transformer(str(path), dtype="fp32"), inputs(family))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_unfused_stack_equals_merged_weights_in_every_format(tiny, family, tmp_path):
    t = tiny[family]
    model, cache = t["model"], LoraCache()
    base = run(model, inputs(family))
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    for stack in STACKS:
        with applied(model.module, [(cache.get(model, str(t["files"][fmt])), s) for fmt, s in stack]):
            out = run(model, inputs(family))
        ref = merged_output(t, family, stack, tmp_path)
        assert rel(ref, base) > 1e-2, stack  # the LoRAs change the output ...
        assert rel(out, ref) < 1e-5, stack  # ... exactly as merging them into the weights does
    # the shared weights are untouched and the hooks are gone
    assert all(torch.equal(v, before[k]) for k, v in model.module.state_dict().items())
    assert torch.equal(run(model, inputs(family)), base)


def test_back_to_back_stacks_read_each_file_once(tiny):
    t = tiny["flux"]
    model, cache = t["model"], LoraCache()
    outs = []
    for stack in [("kohya", 1.0)], [("peft", 1.0)], [("kohya", 1.0), ("peft", 0.5)], [("kohya", 1.0)]:
        with applied(model.module, [(cache.get(model, str(t["files"][f])), s) for f, s in stack]):
            outs.append(run(model, inputs("flux")))
    assert cache.num_reads == 2
    assert torch.equal(outs[0], outs[3]) and rel(outs[0], outs[1]) > 1e-2 and rel(outs[2], outs[0]) > 1e-3
    strong = cache.get(model, str(t["files"]["kohya"]))
    with applied(model.module, [(strong, 0.0)]):  # strength 0 adds nothing
        assert torch.equal(run(model, inputs("flux")), run(model, inputs("flux")))


def test_cache_limit_follows_the_memory_the_budget_leaves_outside_the_weights(tiny):
    from comfy_tetriserve.worker.memory import lora_cache_bytes

    gb = 10**9
    assert lora_cache_bytes(80 * gb, 1, 64 * gb) == 4 * gb  # default budget on 80 GB: a quarter of 16 GB
    assert lora_cache_bytes(141 * gb, 1, int(0.8 * 141 * gb)) == 4 << 30  # an H200: the 4 GiB cap
    assert lora_cache_bytes(24 * gb, 1, 19_200_000_000) == 1_200_000_000  # a 24 GB card: 1.2 GB
    assert lora_cache_bytes(80 * gb, 1, int(0.95 * 80 * gb)) == 1 * gb  # a 95 % budget leaves 4 GB: 1 GB
    assert lora_cache_bytes(80 * gb, 2, 32 * gb) == 2 * gb  # two ranks on one GPU: each its half
    assert lora_cache_bytes(8 * gb, 1, 9 * gb) == 0  # a budget beyond the device: no cache to speak of
    assert lora_cache_bytes(0, 1, 1) == 4 << 30  # device size unknown
    # the cache honours a lower limit at once, keeping the most recently used file (a job needs it)
    t = tiny["flux"]
    model, cache = t["model"], LoraCache()
    kohya = cache.get(model, str(t["files"]["kohya"]))
    peft = cache.get(model, str(t["files"]["peft"]))
    assert cache.nbytes() == kohya.nbytes() + peft.nbytes()
    cache.set_limit(peft.nbytes())
    assert cache.nbytes() == peft.nbytes() and cache.get(model, str(t["files"]["peft"])) is peft
    assert cache.num_reads == 2
    cache.set_limit(0)
    assert cache.nbytes() == peft.nbytes()  # the newest stays even over the limit
    cache.get(model, str(t["files"]["kohya"]))  # read again: it was dropped
    assert cache.num_reads == 3 and cache.nbytes() == kohya.nbytes()


def test_lora_on_fp8_weights_applies_on_top(tiny, tmp_path):
    """The LoRA adds to the dequantised fp8 weights (the base stays fp8 in memory)."""
    t = tiny["sd3"]
    path = write_tiny_checkpoint("sd3", "sd3_single", tmp_path / "sd3")
    model = load_transformer(str(path), dtype="fp8_e4m3fn")
    stack = STACKS[0]
    with applied(model.module, [(LoraCache().get(model, str(t["files"][f])), s) for f, s in stack]):
        out = run(model, inputs("sd3"))
    rounded = {k: v.to(torch.float8_e4m3fn).float() for k, v in t["sd"].items()}
    ref = merged_output(t, "sd3", stack, tmp_path, sd=rounded)
    assert rel(out, ref) < 1e-5 and rel(out, run(model, inputs("sd3"))) > 1e-2


def test_errors_name_the_problem(tiny, tmp_path, caplog):
    flux, sd3 = tiny["flux"], tiny["sd3"]
    with pytest.raises(InvalidRequest, match=r"is for FLUX models .* the model is SD3"):
        LoraCache().get(sd3["model"], str(flux["files"]["kohya"]))
    bogus = tmp_path / "bogus.safetensors"
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_nothing_here.lora_up.weight": torch.zeros(4, 2)}, str(bogus))
    with pytest.raises(InvalidRequest, match=r"none of its 1 modules match .* \(0 matched"):
        check_lora(str(bogus), targets_of_config(flux["config"]))
    # a partly matching LoRA applies what it can and lists the rest
    partial = dict(lora_tensors("flux", flux["sd"], "kohya", seed=3))
    partial["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(2, 4)
    partial["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(4, 2)
    key = next(k for k in partial if k.endswith("qkv.lora_up.weight"))
    partial[key] = partial[key][:-1].contiguous()  # wrong row count for the fused q/k/v
    path = tmp_path / "partial.safetensors"
    save_file(partial, str(path))
    with caplog.at_level(logging.WARNING):
        matched, total, skipped = check_lora(str(path), targets_of_config(flux["config"]))
    assert (matched, total) == (15, 17) and len(skipped) == 2  # 16 layers + 1 bogus; one broken
    assert any("not_a_layer" in s for s in skipped) and any("rows" in s for s in skipped)
    assert "not applied" in caplog.text
    # the check from shapes alone agrees with the real mapping
    patch = LoraCache().get(flux["model"], str(path))
    assert (patch.matched, patch.total, len(patch.skipped)) == (matched, total, 2)


def test_targets_cover_original_and_diffusers_names(tiny):
    targets = targets_of_model(tiny["flux"]["model"])
    qkv = targets.names["double_blocks.0.img_attn.qkv"]
    assert [s.module for s in qkv] == ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                      "transformer_blocks.0.attn.to_v"]
    linear1 = targets.names["single_blocks.1.linear1"]
    assert [s.module.rsplit(".", 1)[-1] for s in linear1] == ["to_q", "to_k", "to_v", "proj_mlp"]
    assert targets.underscored["single_blocks_1_linear1"] == linear1
    assert "transformer_blocks.0.ff.net.2" in targets.names
    sd3 = targets_of_config(tiny["sd3"]["config"])
    assert [s.module for s in sd3.names["joint_blocks.0.x_block.attn2.qkv"]][0] == "transformer_blocks.0.attn2.to_q"


def test_service_parses_and_resolves_stacks(tmp_path):
    assert parse_stack([{"name": "a.safetensors", "strength": 0.8}, ["sub/b.safetensors", -0.4]]) == \
        (("a.safetensors", 0.8), ("sub/b.safetensors", -0.4))
    for bad, msg in [({"name": "a"}, "list"), ([{"name": "/etc/x"}], "not an absolute path"),
                     ([{"name": "a", "strength": 101}], r"\[-100, 100\]"), ([{"name": "a", "w": 1}], "unknown key"),
                     ([{"name": "a", "strength": "1"}], "must be a number"), ([["a"] * 3], "loras\\[0\\]"),
                     ([{"name": "../x"}], r"'\.\.'")]:
        with pytest.raises(InvalidRequest, match=msg):
            parse_stack(bad)
    d1, d2 = tmp_path / "loras1", tmp_path / "loras2"
    (d2 / "sub").mkdir(parents=True)
    d1.mkdir()
    (d2 / "sub" / "b.safetensors").write_bytes(b"x")
    assert resolve_lora("sub/b.safetensors", (str(d1), str(d2))) == str((d2 / "sub" / "b.safetensors").resolve())
    with pytest.raises(NotFound, match=f"unknown LoRA 'c.safetensors'.*{d1}, {d2}"):
        resolve_lora("c.safetensors", (str(d1), str(d2)))
    with pytest.raises(NotFound, match="--lora-dir"):
        resolve_lora("c.safetensors", ())
    stack = resolve_stack((("sub/b.safetensors", 0.5), ("sub/b.safetensors", 0.0)), (str(d2),))
    assert len(stack) == 1 and adapter_key(stack) != adapter_key(()) == ""


def test_only_jobs_with_equal_stacks_share_a_batched_step():
    from comfy_tetriserve.types import GenRequest

    def req(rid, adapter=""):
        return GenRequest(rid, "flux", 512, 512, 20, 0.0, adapter=adapter)

    a = adapter_key((("/l/a.safetensors", 0.8),))
    assert req("1").shape_key == req("2").shape_key != req("3", a).shape_key
    assert req("3", a).shape_key == req("4", a).shape_key
    assert req("5", adapter_key((("/l/a.safetensors", 0.5),))).shape_key != req("3", a).shape_key
