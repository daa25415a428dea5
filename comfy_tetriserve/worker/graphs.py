"""Captured model evaluations: one CUDA graph per (model, step shape, group, batch), behind a flag.

A DiT step on a GPU launches thousands of small kernels; at 256-512 px their launch cost is a
large part of the step (an H200 runs FLUX-dev at 256 px in about 31 ms replayed, about 53 ms
eager). ``ModelForwards`` runs ``LoadedModel.forward`` eagerly, or, with ``cuda_graphs`` on and
on a CUDA device, from a CUDA graph captured at the first evaluation of each ``GraphKey``:

- the key is everything that fixes the graph's kernels and shapes: model, batch, latent size,
  text length (padded) and the rows' valid lengths (the attention mask), guidance or not, Fill
  channels or not, the Kontext references' shapes and layout, and the device group (degree and member ranks: its collectives are inside the graph, NCCL
  collectives being capturable);
- capture: ``WARMUP_RUNS`` eager evaluations on a side stream (they fill the RoPE cache and
  let NCCL and cuDNN settle; every rank of a group runs them, in the same order, so their
  collectives meet), then one evaluation under ``torch.cuda.graph``; inputs are copied into the
  graph's static tensors before each replay and the outputs cloned after it;
- the stop vote rides in the graph's end-of-step gather as a static one-element tensor;
- graphs of one model share one memory pool (replays never overlap); at most ``max_graphs``
  are kept (least recently used first out);
- a key whose capture fails is remembered and runs eagerly from then on (``failed``), so a
  kernel that cannot be captured costs one failed attempt, not one per step.

Elsewhere (CPU, or the flag off) it is the plain eager call: a no-op wrapper. The flag defaults to
off until a GPU run has measured it (``scripts/gpu_check.py``, docs/engine.md). The first step at a
new key pays the warm-up and capture; ``warm_keys`` names the keys held as the planner sees them
(core/warmup.py), the worker reports them to the pool, and the planner prices a cold key's first step
through ``cost.warmup_time_s`` (the profile's ``extra["capture_steps"]``).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.warmup import MAX_GRAPHS, WarmKey
from .stepcache import LruCache

log = logging.getLogger(__name__)

WARMUP_RUNS = 2


@dataclass(frozen=True)
class GraphKey:
    model: str
    batch: int
    height: int
    width: int
    num_text: int
    text_lengths: tuple[int, ...] | None
    guidance: bool
    group: tuple[int, ...]  # the device group's member ranks; () for one device
    concat: bool = False  # FLUX Fill's extra channels
    refs: tuple = ()  # Kontext reference latents' shapes
    ref_method: str | None = None

    @property
    def degree(self) -> int:
        return max(1, len(self.group))


def graph_key(model, x: torch.Tensor, context: torch.Tensor, guidance: torch.Tensor | None, comm,
              text_lengths: Sequence[int] | None, concat: torch.Tensor | None = None, refs: tuple = (),
              ref_method: str = "offset") -> GraphKey:
    b, _, h, w = x.shape
    lengths = tuple(int(n) for n in text_lengths) if text_lengths is not None else None
    return GraphKey(model=model.name, batch=int(b), height=int(h), width=int(w), num_text=int(context.shape[1]),
                    text_lengths=lengths, guidance=guidance is not None,
                    group=tuple(comm.ranks) if comm is not None else (), concat=concat is not None,
                    refs=tuple(tuple(r.shape) for r in refs), ref_method=ref_method if refs else None)


@dataclass
class _Captured:
    graph: object
    inputs: dict[str, torch.Tensor]
    out: torch.Tensor
    votes: torch.Tensor | None


class ModelForwards:
    """``LoadedModel.forward``, captured per ``GraphKey`` when enabled on CUDA (see the module docstring)."""

    def __init__(self, enabled: bool, device: torch.device, max_graphs: int = MAX_GRAPHS) -> None:
        self.enabled = bool(enabled)
        self.device = torch.device(device)
        self.graphs = LruCache(max_graphs)
        self.failed: set[GraphKey] = set()
        self.num_captures = 0
        self._pools: dict[str, object] = {}

    @property
    def version(self) -> int:
        """Changes whenever the set of captured (or given-up) keys may have changed."""
        return self.num_captures + len(self.failed)

    def warm_keys(self, rank: int) -> tuple[WarmKey, ...]:
        """The keys held here as the planner names them (core/warmup.py): (group, model, height,
        width, batch) in pixels; one device's group is (rank,). Keys whose capture failed count as
        warm: they run eagerly and cost no further warm-up."""
        out = {}
        for key in list(self.graphs.keys()) + list(self.failed):
            group = tuple(sorted(key.group)) or (rank,)
            out[(group, key.model, key.height * 8, key.width * 8, key.batch)] = None
        return tuple(out)

    @property
    def active(self) -> bool:
        """Whether evaluations are captured here (the flag is on and the device is a GPU)."""
        return self.enabled and self.device.type == "cuda"

    def __call__(self, model, x, sigma, context, pooled, guidance=None, comm=None, vote: float = 0.0,
                 concat: torch.Tensor | None = None, refs: tuple = (), ref_method: str = "offset",
                 text_lengths: Sequence[int] | None = None):
        inputs = {"x": x, "sigma": sigma, "context": context, "pooled": pooled, "guidance": guidance,
                  "concat": concat, **{f"ref{i}": r for i, r in enumerate(refs)}}

        def eager():
            return model.forward(x, sigma, context, pooled, guidance, comm=comm, vote=vote, concat=concat, refs=refs,
                                 ref_method=ref_method, text_lengths=text_lengths)

        if not self.active:
            return eager()
        key = graph_key(model, x, context, guidance, comm, text_lengths, concat, refs, ref_method)
        if key in self.failed:
            return eager()
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self.capture(model, key, inputs, comm, text_lengths, ref_method)
            except Exception as exc:  # noqa: BLE001 - this key runs eagerly from now on
                if comm is not None and comm.degree > 1:
                    raise  # peers may have captured: running on differently would desynchronise the group
                log.warning("CUDA graph capture failed for %s, running it eagerly: %s", key, exc)
                self.failed.add(key)
                return eager()
            self.graphs.put(key, entry)
        return self.replay(entry, inputs, vote)

    # -- capture and replay (CUDA only)
    def capture(self, model, key: GraphKey, inputs: dict, comm, text_lengths, ref_method: str = "offset") -> _Captured:
        static = {k: (None if v is None else v.detach().clone()) for k, v in inputs.items()}
        vote = torch.zeros((), device=self.device)
        refs = tuple(static[f"ref{i}"] for i in range(len(key.refs)))

        def run():
            return model.forward(static["x"], static["sigma"], static["context"], static["pooled"],
                                 static["guidance"], comm=comm, vote=vote, concat=static["concat"], refs=refs,
                                 ref_method=ref_method, text_lengths=text_lengths)

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        pool = self._pools.get(key.model)
        if pool is None:
            pool = self._pools[key.model] = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out, votes = run()
        self.num_captures += 1
        static["vote"] = vote
        return _Captured(graph=graph, inputs=static, out=out, votes=votes)

    @staticmethod
    def replay(entry: _Captured, inputs: dict, vote: float):
        for name, value in inputs.items():
            if value is not None:
                entry.inputs[name].copy_(value)
        entry.inputs["vote"].fill_(vote)
        entry.graph.replay()
        return entry.out.clone(), (None if entry.votes is None else entry.votes.clone())
