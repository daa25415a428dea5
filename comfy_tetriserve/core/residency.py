"""What lives in each worker's memory, under a budget: the bookkeeping behind model eviction.

Torch-free and clock-free: the worker pool (and the simulator) own a ``Residency`` and feed it
measured byte counts and use times; it answers what must go for something new to fit.

An *entry* is anything that holds device memory for a while: a model's weights (key
``"model:NAME"``... any string does; the pool uses the model name) or a cached adapter (another
engineer's LoRA cache charges its bytes here under its own keys, e.g. ``"lora:NAME"``). Entries are
per worker. ``pinned`` entries never leave by eviction (models given at start); ``in_use`` ones are
held by an assignment in flight and skipped too. Eviction order: least recently used first.

Bytes are what the worker measured after it loaded (its tensors' storage), not what a file says;
a load is first *reserved* at its predicted size so two loads in flight cannot both fit the same
free space, then settled to the measured size.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from ..errors import InsufficientMemory, InvalidRequest


@dataclass(frozen=True)
class Entry:
    key: str
    num_bytes: int
    last_used_at: float
    pinned: bool = False
    loading: bool = False  # reserved for a load in flight (at its predicted size)


@dataclass
class _Worker:
    budget_bytes: int
    entries: dict[str, Entry] = field(default_factory=dict)

    @property
    def used_bytes(self) -> int:
        return sum(e.num_bytes for e in self.entries.values())


class Residency:
    """Entries per worker under per-worker budgets (see the module docstring)."""

    def __init__(self, budgets: dict[int, int]) -> None:
        for rank, budget in budgets.items():
            if budget <= 0:
                raise InvalidRequest(f"memory budget of worker {rank} must be > 0, got {budget}")
        self._workers = {rank: _Worker(int(b)) for rank, b in budgets.items()}

    # ------------------------------------------------------------ queries
    def budget_bytes(self, rank: int) -> int:
        return self._workers[rank].budget_bytes

    def used_bytes(self, rank: int) -> int:
        return self._workers[rank].used_bytes

    def free_bytes(self, rank: int) -> int:
        return self._workers[rank].budget_bytes - self._workers[rank].used_bytes

    def entry(self, rank: int, key: str) -> Entry | None:
        return self._workers[rank].entries.get(key)

    def holds(self, rank: int, key: str) -> bool:
        e = self._workers[rank].entries.get(key)
        return e is not None and not e.loading

    def ranks_holding(self, key: str) -> tuple[int, ...]:
        return tuple(r for r in sorted(self._workers) if self.holds(r, key))

    def ranks_loading(self, key: str) -> tuple[int, ...]:
        return tuple(r for r in sorted(self._workers) if (e := self._workers[r].entries.get(key)) and e.loading)

    def keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for w in self._workers.values() for k in w.entries))

    # ------------------------------------------------------------ decisions
    def evictions_for(self, rank: int, key: str, num_bytes: int, *, in_use: frozenset[str] = frozenset(),
                      what: str = "") -> tuple[str, ...]:
        """Keys to evict on ``rank`` (least recently used first) so ``num_bytes`` more fit for ``key``.

        Raises InsufficientMemory naming ``what`` and the numbers when even evicting every unpinned,
        unused entry is not enough (or ``num_bytes`` exceeds the whole budget).
        """
        w = self._workers[rank]
        have = w.entries.get(key)
        need = num_bytes - (have.num_bytes if have else 0)
        free = w.budget_bytes - w.used_bytes
        if need <= free:
            return ()
        label = what or key
        if num_bytes > w.budget_bytes:
            raise InsufficientMemory(f"{label}: needs {_gib(num_bytes)} on worker {rank}, more than its whole "
                                     f"memory budget of {_gib(w.budget_bytes)}", permanent=True)
        victims: list[str] = []
        for e in sorted(w.entries.values(), key=lambda e: e.last_used_at):
            if e.key == key or e.pinned or e.loading or e.key in in_use:
                continue
            victims.append(e.key)
            free += e.num_bytes
            if need <= free:
                return tuple(victims)
        held = ", ".join(f"{e.key} {_gib(e.num_bytes)}{' pinned' if e.pinned else ''}"
                         f"{' in use' if e.key in in_use else ''}{' loading' if e.loading else ''}"
                         for e in w.entries.values())
        raise InsufficientMemory(f"{label}: needs {_gib(num_bytes)} on worker {rank}; budget "
                                 f"{_gib(w.budget_bytes)}, and what it holds cannot be evicted ({held})")

    # ------------------------------------------------------------ changes
    def reserve(self, rank: int, key: str, num_bytes: int, now: float, *, pinned: bool = False) -> None:
        """Book ``num_bytes`` for a load in flight (evict first: this does not check the budget)."""
        w = self._workers[rank]
        old = w.entries.get(key)
        w.entries[key] = Entry(key, max(num_bytes, old.num_bytes if old else 0), now,
                               pinned=pinned or bool(old and old.pinned), loading=old is None or old.loading)

    def settle(self, rank: int, key: str, measured_bytes: int, now: float) -> None:
        """A load finished: the entry holds what the worker measured."""
        w = self._workers[rank]
        old = w.entries.get(key)
        w.entries[key] = Entry(key, int(measured_bytes), now, pinned=bool(old and old.pinned))

    def remove(self, rank: int, key: str) -> Entry | None:
        return self._workers[rank].entries.pop(key, None)

    def touch(self, rank: int, key: str, now: float) -> None:
        e = self._workers[rank].entries.get(key)
        if e is not None and now > e.last_used_at:
            self._workers[rank].entries[key] = replace(e, last_used_at=now)

    def set_pinned(self, key: str, pinned: bool) -> None:
        for w in self._workers.values():
            e = w.entries.get(key)
            if e is not None:
                w.entries[key] = replace(e, pinned=pinned)

    def describe(self, key: str) -> dict:
        """Per key, for GET /v1/models: where it lives, bytes, last use, pinned, loads in progress."""
        held = {r: w.entries[key] for r, w in sorted(self._workers.items()) if key in w.entries}
        done = {r: e for r, e in held.items() if not e.loading}
        return {
            "resident_on": sorted(done),
            "bytes_per_worker": max((e.num_bytes for e in done.values()), default=0),
            "last_used_at": max((e.last_used_at for e in done.values()), default=None),
            "pinned": any(e.pinned for e in held.values()),
            "loading_on": sorted(r for r, e in held.items() if e.loading),
        }

    def memory(self) -> list[dict]:
        """Per worker: budget, bytes used, and its entries (the ``bytes resident`` API)."""
        return [{"gpu_id": r, "budget_bytes": w.budget_bytes, "used_bytes": w.used_bytes,
                 "entries": {k: e.num_bytes for k, e in w.entries.items()}}
                for r, w in sorted(self._workers.items())]


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10 ** 3, "kib": 1 << 10, "m": 1 << 20, "mb": 10 ** 6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10 ** 9, "gib": 1 << 30, "t": 1 << 40, "tb": 10 ** 12, "tib": 1 << 40}


def parse_budget(text: str | int | None) -> tuple[int | None, float | None]:
    """``--memory-budget``: "24GiB", "600MB", "123456" (bytes) or "60%" (of the device's memory).

    Returns (bytes, None) or (None, fraction); (None, None) for an empty value (the default).
    """
    if text is None or text == "":
        return None, None
    if isinstance(text, int):
        if text <= 0:
            raise InvalidRequest(f"memory budget must be > 0, got {text}")
        return text, None
    s = str(text).strip().lower().replace(" ", "")
    if s.endswith("%"):
        try:
            pct = float(s[:-1])
        except ValueError:
            raise InvalidRequest(f"memory budget {text!r}: bad percentage") from None
        if not 0 < pct <= 100:
            raise InvalidRequest(f"memory budget {text!r}: a percentage must be in (0, 100]")
        return None, pct / 100
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", s)
    if not m or m.group(2) not in _UNITS:
        raise InvalidRequest(f"memory budget {text!r}: expected bytes with a unit (24GiB, 600MB) or a percentage")
    value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise InvalidRequest(f"memory budget {text!r} must be > 0")
    return value, None


def _gib(num_bytes: int) -> str:
    if num_bytes >= 1 << 30:
        return f"{num_bytes / (1 << 30):.2f} GiB"
    return f"{num_bytes / (1 << 20):.1f} MiB"


class LoadTimeModel:
    """Predicted seconds to load ``num_bytes`` onto one device: bytes / bandwidth, the bandwidth
    corrected online from measured loads (an EWMA of measured bandwidths, weight ``alpha``, each
    clipped to [``clip_lo``, ``clip_hi``] x the current estimate so one stalled read cannot swing it)."""

    def __init__(self, bytes_per_s: float, *, alpha: float = 0.3, clip_lo: float = 0.25, clip_hi: float = 4.0) -> None:
        if not bytes_per_s > 0:
            raise InvalidRequest(f"load bandwidth must be > 0, got {bytes_per_s}")
        self.bytes_per_s = float(bytes_per_s)
        self.alpha, self.clip_lo, self.clip_hi = alpha, clip_lo, clip_hi
        self.num_observed = 0

    def predict_s(self, num_bytes: int) -> float:
        return num_bytes / self.bytes_per_s

    def observe(self, num_bytes: int, seconds: float) -> None:
        if num_bytes <= 0 or not seconds > 0:
            return
        measured = min(max(num_bytes / seconds, self.clip_lo * self.bytes_per_s), self.clip_hi * self.bytes_per_s)
        weight = 1.0 if self.num_observed == 0 else self.alpha
        self.bytes_per_s += weight * (measured - self.bytes_per_s)
        self.num_observed += 1
