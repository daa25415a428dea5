"""The GPU path's CPU-testable parts: the capture flag's plumbing, the cache keys, the eager fallback,
replay's copy-in / clone-out, and the planner's price of a first step at a new shape."""
from __future__ import annotations

import types

import pytest
import torch

from comfy_tetriserve.cost import ProfileCostModel, ProfileTable, load_profile, warmup_time_s, PROFILES_DIR
from comfy_tetriserve.worker.graphs import GraphKey, ModelForwards, graph_key
from comfy_tetriserve.worker.models import LoadedModel
from comfy_tetriserve.worker.runner import Conditioning, StepRunner
from comfy_tetriserve.worker.samplers import compute_sigmas, start_trajectory
from comfy_tetriserve.worker.tiny import TINY_CONFIGS, random_model

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def model():
    config = dict(TINY_CONFIGS["flux"])
    return LoadedModel(name="tiny-flux", family="flux", config=config, module=random_model(config, seed=1),
                       dtype=torch.float32, device=torch.device("cpu"), source="random:tiny-flux")


def inputs(b=1, h=8, w=10, text=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(b, 16, h, w, generator=g), sigma=torch.full((b,), 0.6),
                context=torch.randn(b, text, 32, generator=g), pooled=torch.randn(b, 16, generator=g),
                guidance=torch.full((b,), 3.5))


def test_flag_is_a_no_op_on_cpu(model):
    fwd = ModelForwards(True, torch.device("cpu"))
    assert fwd.enabled and not fwd.active
    inp = inputs()
    out, votes = fwd(model, **inp)
    ref, _ = model.forward(**inp)
    assert torch.equal(out, ref) and votes is None
    assert len(fwd.graphs) == 0 and fwd.num_captures == 0
    assert not ModelForwards(False, torch.device("cuda", 0)).active  # off unless asked for


def test_keys_separate_everything_that_changes_the_graph(model):
    comm2 = types.SimpleNamespace(ranks=(0, 1), degree=2)
    comm2b = types.SimpleNamespace(ranks=(2, 3), degree=2)
    base = inputs()
    k = graph_key(model, base["x"], base["context"], base["guidance"], None, None)
    assert k == GraphKey("tiny-flux", 1, 8, 10, 5, None, True, ()) and k.degree == 1
    variants = [
        graph_key(model, inputs(b=2)["x"], inputs(b=2)["context"], base["guidance"], None, None),  # batch
        graph_key(model, inputs(h=10, w=8)["x"], base["context"], base["guidance"], None, None),  # shape
        graph_key(model, base["x"], inputs(text=6)["context"], base["guidance"], None, None),  # text length
        graph_key(model, base["x"], base["context"], None, None, None),  # no guidance
        graph_key(model, base["x"], base["context"], base["guidance"], comm2, None),  # degree 2
        graph_key(model, base["x"], base["context"], base["guidance"], comm2b, None),  # another group
        graph_key(model, inputs(b=2)["x"], base["context"], base["guidance"], None, [5, 3]),  # masked rows
    ]
    assert len({k, *variants}) == len(variants) + 1
    assert variants[4].degree == 2
    # the same shape with other values is the same graph
    assert graph_key(model, inputs(seed=7)["x"], inputs(seed=7)["context"], base["guidance"], None, None) == k


class _FakeCuda(ModelForwards):
    """ModelForwards as on a GPU, with the capture replaced: replay is the eager forward on the
    static inputs (what a captured graph computes), so the cache and the copy-in logic run on CPU."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__(True, torch.device("cpu"))
        self.fail = fail
        self.attempts = 0

    @property
    def active(self) -> bool:
        return True

    def capture(self, model, key, inputs, comm, text_lengths, ref_method="offset"):
        self.attempts += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        static = {k: (None if v is None else v.clone()) for k, v in inputs.items()}
        static["vote"] = torch.zeros(())
        entry = types.SimpleNamespace(inputs=static, out=None, votes=None)

        def replay():
            entry.out, entry.votes = model.forward(static["x"], static["sigma"], static["context"],
                                                   static["pooled"], static["guidance"], text_lengths=text_lengths)
        entry.graph = types.SimpleNamespace(replay=replay)
        replay()
        self.num_captures += 1
        return entry


def test_one_capture_per_key_and_replays_see_new_inputs(model):
    fwd = _FakeCuda()
    a, b = inputs(seed=1), inputs(seed=2)
    out_a, _ = fwd(model, **a)
    out_b, _ = fwd(model, **b)  # same key: replayed with b's values copied in
    assert fwd.attempts == 1 and len(fwd.graphs) == 1
    assert torch.equal(out_b, model.forward(**b)[0]) and torch.equal(out_a, model.forward(**a)[0])
    assert not torch.equal(out_a, out_b)
    out_a2, _ = fwd(model, **a)
    assert torch.equal(out_a2, out_a) and out_a2.data_ptr() != out_a.data_ptr()  # outputs are clones
    fwd(model, **inputs(h=10, w=8))
    assert fwd.attempts == 2 and len(fwd.graphs) == 2


def test_failed_capture_falls_back_to_eager_once(model, caplog):
    fwd = _FakeCuda(fail=True)
    inp = inputs()
    for _ in range(3):
        out, _ = fwd(model, **inp)
        assert torch.equal(out, model.forward(**inp)[0])
    assert fwd.attempts == 1 and len(fwd.failed) == 1 and len(fwd.graphs) == 0
    assert "running it eagerly" in caplog.text
    comm = types.SimpleNamespace(ranks=(0, 1), degree=2, index=0)
    with pytest.raises(RuntimeError, match="capturing"):  # a group must not split into captured and eager ranks
        fwd(model, **inputs(h=10, w=8), comm=comm)


def test_step_runner_uses_the_forwards(model):
    fwd = _FakeCuda()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 16, 8, 10, generator=g)
    traj = start_trajectory(torch.zeros_like(noise), noise, compute_sigmas("flux", "simple", 3), "euler")
    cond = Conditioning("r", model.name, torch.randn(1, 5, 32, generator=g), torch.randn(1, 16, generator=g),
                        cfg=2.0, guidance=3.5, neg_context=torch.randn(1, 3, 32, generator=g),
                        neg_pooled=torch.randn(1, 16, generator=g))
    captured = StepRunner(model, None, fwd, max_pad_fraction=float("inf")).step([traj], [cond], 0.0)[0][0]
    eager = StepRunner(model, None, max_pad_fraction=float("inf")).step([traj], [cond], 0.0)[0][0]
    assert fwd.attempts == 1 and torch.equal(captured.x, eager.x)
    (key,) = fwd.graphs.keys()
    assert key.batch == 2 and key.text_lengths == (5, 3)  # cond and uncond, one masked graph


def test_flag_reaches_the_pool_from_the_service_settings():
    from comfy_tetriserve.service.settings import ServiceConfig
    from comfy_tetriserve.service.wiring import build_executor
    from comfy_tetriserve.worker.runner import WorkerConfig

    assert ServiceConfig().cuda_graphs is False and WorkerConfig(0, 1, "cpu", "gloo", "s", ((0,),)).cuda_graphs is False
    pool = build_executor(ServiceConfig(devices="cpu:1", cuda_graphs=True), None)
    assert pool.cuda_graphs is True
    assert build_executor(ServiceConfig(devices="cpu:1"), None).cuda_graphs is False


def test_warmup_is_priced_from_the_profile():
    table = load_profile(PROFILES_DIR / "h200.json")
    eager = ProfileCostModel(table)
    assert eager.capture_steps == 0.0 and warmup_time_s(eager, "flux-dev", 1024, 1024, 1, 1) == 0.0
    captured = ProfileCostModel(ProfileTable(**{**table.__dict__, "extra": {**table.extra, "capture_steps": 2.5}}))
    step = captured.step_time_s("flux-dev", 1024, 1024, 1, 2)
    assert warmup_time_s(captured, "flux-dev", 1024, 1024, 1, 2) == pytest.approx(2.5 * step)
    from comfy_tetriserve.cost import OnlineCostModel

    assert OnlineCostModel(captured).capture_steps == 2.5  # wrappers forward it
    assert warmup_time_s(object.__new__(type("Bare", (), {})), "m", 1, 1, 1, 1) == 0.0  # a cost model without it
