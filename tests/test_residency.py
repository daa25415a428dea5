"""core/residency.py: per-worker budgets, LRU eviction order, pinned and busy entries stay."""
from __future__ import annotations

import pytest

from comfy_tetriserve.core.residency import Residency
from comfy_tetriserve.errors import InsufficientMemory, InvalidRequest
from comfy_tetriserve.worker.memory import parse_budget


def test_lru_eviction_skips_pinned_busy_and_loading():
    res = Residency({0: 100, 1: 100})
    for i, (key, pinned) in enumerate((("a", True), ("b", False), ("c", False))):
        res.reserve(0, key, 30, float(i), pinned=pinned)
        res.settle(0, key, 30, float(i))
    assert res.used_bytes(0) == 90 and res.free_bytes(0) == 10
    assert res.evictions_for(0, "d", 10) == ()
    assert res.evictions_for(0, "d", 30) == ("b",)  # least recently used unpinned
    res.touch(0, "b", 10.0)
    assert res.evictions_for(0, "d", 30) == ("c",)
    assert res.evictions_for(0, "d", 30, in_use=frozenset({"c"})) == ("b",)
    assert res.evictions_for(0, "d", 60) == ("c", "b")
    with pytest.raises(InsufficientMemory, match=r"model d.*a 30\.0 MiB|d: needs"):
        res.evictions_for(0, "d", 80)  # a (pinned) cannot go
    with pytest.raises(InsufficientMemory, match="whole memory budget"):
        res.evictions_for(0, "d", 101, what="model d (/x/d.safetensors)")
    res.reserve(1, "d", 50, 0.0)  # loading: counted, not evictable, not yet held
    assert res.ranks_loading("d") == (1,) and res.ranks_holding("d") == ()
    with pytest.raises(InsufficientMemory, match="loading"):
        res.evictions_for(1, "e", 60)
    res.settle(1, "d", 48, 1.0)
    assert res.ranks_holding("d") == (1,) and res.used_bytes(1) == 48
    assert res.describe("b") == {"resident_on": [0], "bytes_per_worker": 30, "last_used_at": 10.0,
                                 "pinned": False, "loading_on": []}
    assert [m["used_bytes"] for m in res.memory()] == [90, 48]


def test_budget_parsing():
    assert parse_budget("24GiB") == (24 << 30, None)
    assert parse_budget("600MB") == (600_000_000, None)
    assert parse_budget("1234") == (1234, None)
    assert parse_budget("60%") == (None, 0.6)
    assert parse_budget(None) == (None, None)
    for bad in ("0", "-1GB", "12XB", "150%", "abc"):
        with pytest.raises(InvalidRequest):
            parse_budget(bad)
    with pytest.raises(InvalidRequest):
        Residency({0: 0})
