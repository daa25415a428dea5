"""Which devices each node of a cluster has, and the placements the planner may use (pure).

Global GPU ids number the devices node by node (node 0 owns 0..n0-1, node 1 the next n1 ids, ...).
A sequence-parallel group lives inside one node (its collectives need the node's NVLink), so the
planner's groups are each node's aligned power-of-two blocks (``plan.node_groups``); a job moves
between nodes only between assignments, through its checkpoint, priced by ``MoveCost``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidRequest
from ..plan import Group, node_groups


@dataclass(frozen=True)
class NodeSpec:
    """One node: its Ray node id, its address, and one device string per worker ("cuda:3", "cpu")."""

    node_id: str
    address: str
    devices: tuple[str, ...]

    @property
    def num_devices(self) -> int:
        return len(self.devices)


@dataclass(frozen=True)
class Topology:
    nodes: tuple[NodeSpec, ...]

    def __post_init__(self) -> None:
        if not self.nodes:
            raise InvalidRequest("the cluster has no node with devices")
        for n in self.nodes:
            if not n.devices:
                raise InvalidRequest(f"node {n.node_id} has no devices")

    def node_gpu_ids(self) -> tuple[tuple[int, ...], ...]:
        out, start = [], 0
        for n in self.nodes:
            out.append(tuple(range(start, start + n.num_devices)))
            start += n.num_devices
        return tuple(out)

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        return tuple(g for ids in self.node_gpu_ids() for g in ids)

    @property
    def groups(self) -> tuple[Group, ...]:
        return node_groups(self.node_gpu_ids())

    def node_of(self, gpu_ids: Sequence[int]) -> int:
        """The index of the node holding every one of ``gpu_ids`` (InvalidRequest if they span nodes)."""
        nodes = {self.node_index(g) for g in gpu_ids}
        if len(nodes) != 1:
            raise InvalidRequest(f"placement {tuple(gpu_ids)} spans nodes {sorted(nodes)}: groups never cross a node")
        return nodes.pop()

    def node_index(self, gpu_id: int) -> int:
        for i, ids in enumerate(self.node_gpu_ids()):
            if gpu_id in ids:
                return i
        raise InvalidRequest(f"unknown GPU id {gpu_id}")

    def local_ids(self, gpu_ids: Sequence[int]) -> tuple[int, ...]:
        """Global ids of one node -> that node's worker ids (0..n-1)."""
        first = self.node_gpu_ids()[self.node_of(gpu_ids)][0]
        return tuple(g - first for g in gpu_ids)


def with_spares(topology: Topology, num_spares: int) -> Topology:
    """``topology`` with ``num_spares`` placeholder nodes after the real ones, each with the first node's
    devices: GPU ids and groups a box that joins later fills (node id ``spare-K``, no address)."""
    if num_spares < 0:
        raise InvalidRequest(f"spare nodes must be >= 0, got {num_spares}")
    spares = tuple(NodeSpec(f"{SPARE_PREFIX}{k}", "", topology.nodes[0].devices) for k in range(num_spares))
    return Topology(topology.nodes + spares)


SPARE_PREFIX = "spare-"


def parse_devices_per_node(spec: str) -> tuple[str, int]:
    """"gpu": one worker per GPU of each node (nodes without GPUs take no part); "cpu:N": N CPU workers per node."""
    spec = spec.strip()
    if spec == "gpu":
        return ("gpu", 0)
    kind, _, count = spec.partition(":")
    if kind == "cpu" and count.isdigit() and int(count) >= 1:
        return ("cpu", int(count))
    raise InvalidRequest(f"--devices-per-node {spec!r}: expected 'gpu' (one worker per GPU) or cpu:N")


def node_devices(kind: str, count: int, num_gpus: int) -> tuple[str, ...]:
    """The device strings of one node's workers, as its worker pool names them."""
    if kind == "cpu":
        return ("cpu",) * count
    return tuple(f"cuda:{i}" for i in range(num_gpus))


@dataclass(frozen=True)
class MoveCost:
    """What moving a job between nodes costs: ``alpha_s + bytes / bytes_per_s`` (the latent and sampler
    state travel; conditioning goes once per node). Default 100 Gb/s (12.5 GB/s) with 1 ms latency."""

    bytes_per_s: float = 12.5e9
    alpha_s: float = 1e-3

    def __post_init__(self) -> None:
        if not self.bytes_per_s > 0 or not self.alpha_s >= 0:
            raise InvalidRequest("inter-node bandwidth must be > 0 and latency >= 0")

    def time_s(self, num_bytes: int) -> float:
        return self.alpha_s + num_bytes / self.bytes_per_s
