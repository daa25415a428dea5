"""Warm step shapes: which (device group, step shape) an executor has captured, and what a cold one costs.

On GPU workers with CUDA graphs on (worker/graphs.py) the first step of a shape on a device group
pays warm-up runs and the capture; later steps replay. A *warm key* is

    (group, model, height, width, batch)     # group: sorted device ids (its size is the degree)

with height and width in pixels and batch the sequences per forward (as ``GenRequest.batch``
counts them, summed over batched members). A key is warm on a group when every member device
holds a captured graph for it. Each device keeps at most ``max_keys_per_device`` graphs, least
recently used out first (``graphs.MAX_GRAPHS``), so a key can go cold again.

Executors that report warm keys have a ``warm_keys()`` method (core/executor.py,
``WarmKeysReporter``); the engine puts them in ``SchedulerView.warm`` and prices the first step of
an assignment at a cold key with ``cost.warmup_time_s`` (``capture_steps`` x the step time; zero
for profiles without ``capture_steps``: eager engines warm up for free).

``WarmTracker`` keeps the per-device caches: the simulated executor and the simulator model the
workers with it (``use``), and the worker pool fills it from the workers' reports (``set_device``).
Torch-free.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Optional

from ..cost import CostModel, warmup_time_s

Group = tuple[int, ...]
#: (group, model, height, width, batch)
WarmKey = tuple[Group, str, int, int, int]

#: graphs one worker keeps (worker/graphs.py uses the same number)
MAX_GRAPHS = 16


def warm_key(group: Iterable[int], model: str, height: int, width: int, batch: int) -> WarmKey:
    return (tuple(sorted(group)), model, int(height), int(width), int(batch))


def capture_steps(cost: CostModel) -> float:
    """The cost model's ``capture_steps`` (0 when it has none)."""
    return float(getattr(cost, "capture_steps", 0.0) or 0.0)


def cold_warmup_s(cost: CostModel, warm: Optional[frozenset], group: Iterable[int], model: str, height: int,
                  width: int, batch: int) -> float:
    """Seconds the first step at this key adds on ``group``: 0 when the cost model has no capture
    cost, when nothing is known of warm keys (``warm`` None) or when the key is warm."""
    if warm is None or capture_steps(cost) <= 0:
        return 0.0
    group = tuple(sorted(group))
    if (group, model, int(height), int(width), int(batch)) in warm:
        return 0.0
    return warmup_time_s(cost, model, height, width, batch, len(group))


class WarmTracker:
    """Per-device LRU caches of warm keys, as graphs.ModelForwards keeps them (see the module docstring)."""

    def __init__(self, max_keys_per_device: int = MAX_GRAPHS) -> None:
        if max_keys_per_device < 1:
            raise ValueError("max_keys_per_device must be >= 1")
        self.max_keys_per_device = max_keys_per_device
        self._devices: dict[int, OrderedDict[WarmKey, None]] = {}
        self._snapshot: frozenset[WarmKey] | None = frozenset()
        self.num_captures = 0  # keys that went warm on a group (a capture on every member)

    def is_warm(self, key: WarmKey) -> bool:
        return all(key in self._devices.get(g, ()) for g in key[0])

    def use(self, key: WarmKey) -> bool:
        """A step at ``key`` runs on its group: the key is captured where it was missing and becomes
        the most recently used on every member. Returns whether it was warm before."""
        was_warm = self.is_warm(key)
        for g in key[0]:
            cache = self._devices.setdefault(g, OrderedDict())
            if key in cache:
                cache.move_to_end(key)
            else:
                cache[key] = None
                while len(cache) > self.max_keys_per_device:
                    cache.popitem(last=False)
        if not was_warm:
            self.num_captures += 1
            self._snapshot = None
        return was_warm

    def set_device(self, device: int, keys: Iterable[WarmKey]) -> None:
        """What one device reports it holds now (the worker pool); replaces what was known."""
        new = OrderedDict((warm_key(k[0], k[1], k[2], k[3], k[4]), None) for k in keys)
        if new != self._devices.get(device):
            self._devices[device] = new
            self._snapshot = None

    def forget_device(self, device: int) -> None:
        """The device lost its graphs (its worker restarted or died)."""
        if self._devices.pop(device, None):
            self._snapshot = None

    def clear(self) -> None:
        self._devices.clear()
        self._snapshot = None

    def keys(self) -> frozenset[WarmKey]:
        """Keys warm on their whole group (cached until something changes)."""
        if self._snapshot is None:
            seen: set[WarmKey] = set()
            for cache in self._devices.values():
                seen.update(cache)
            self._snapshot = frozenset(k for k in seen if self.is_warm(k))
        return self._snapshot
