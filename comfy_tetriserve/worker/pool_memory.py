"""The worker pool's model memory: budgets, loads on chosen workers, LRU eviction, unloads.

A mixin of ``WorkerPool`` (pool.py holds the processes and the message loop; this holds what
lives in each worker's memory). Each worker has a budget (``--memory-budget``: bytes, or a
percentage of its device; default ``memory.default_budget_bytes``). The bookkeeping is a
``core.residency.Residency`` keyed by model name, fed with the bytes each worker *measured*
after loading (its tensors' storages), and with use times from every assignment.

A model is *known* to the pool once loaded anywhere (``models()``, jobs may be admitted for it);
where its weights are is separate: ``load_model(..., ranks=)`` puts it on some workers, an
assignment on workers that lack it loads it there first (``ensure_resident``), and making room
evicts the least recently used model on that worker that is neither pinned, nor in an assignment
in flight, nor loading. A load that cannot fit (the file alone exceeds the budget, or everything
held is pinned or busy) raises ``InsufficientMemory`` naming the file and the numbers, before any
weight is read; a file that cannot be read raises ``InvalidRequest`` naming it. Loads and
unloads queue on the workers they address only, so a load on workers 0-1 never delays work on 2-3.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable

from ..core.executor import ModelInfo
from ..core.residency import LoadTimeModel, Residency
from ..errors import Conflict, InsufficientMemory, InvalidRequest, WorkerError
from .memory import default_budget_bytes, lora_cache_bytes, parse_budget, predicted_bytes

log = logging.getLogger(__name__)

LoadProgress = Callable[[int, int], None]
#: first guess of a worker's load bandwidth (file to device), before any load was measured
DEFAULT_LOAD_BYTES_PER_S = 2e9


class PoolMemory:
    """Mixin: see the module docstring. Needs the pool's ``_send``, ``_loop``, ``_ids``, ``_tasks``,
    ``_requests``, ``_models``, ``devices``, ``worker_info``, ``clock``."""

    def _init_memory(self, memory_budget: str | int | None) -> None:
        self._budget_bytes, self._budget_fraction = parse_budget(memory_budget)
        self.residency: Residency | None = None
        self._loads: dict[int, tuple[asyncio.Future, dict[int, tuple], LoadProgress | None, int]] = {}
        self._unloads: dict[int, tuple[asyncio.Future, dict[int, int], int]] = {}
        self._inflight: dict[tuple[str, int], asyncio.Future] = {}
        self._pinned: set[str] = set()
        #: rank -> bytes of weights the worker measured it holds (its latest report)
        self.measured_bytes: dict[int, int] = {}
        self.lora_cache_limits: dict[int, int] = {}
        #: predicted seconds of a load (bytes / bandwidth), corrected by every load the workers finish
        self.load_time = LoadTimeModel(DEFAULT_LOAD_BYTES_PER_S)
        self._load_log: deque[dict] = deque(maxlen=1000)

    def _setup_budgets(self) -> None:
        """After the workers reported ready: each worker's budget, an empty residency."""
        sharing: dict[str, int] = {}
        for d in self.devices:
            sharing[d] = sharing.get(d, 0) + 1
        budgets = {}
        #: rank -> the LoRA cache's limit there (memory.lora_cache_bytes), sent with every assignment
        self.lora_cache_limits: dict[int, int] = {}
        for rank, device in enumerate(self.devices):
            total = int(self.worker_info[rank].get("total_memory_bytes") or 0)
            if self._budget_bytes is not None:
                budgets[rank] = self._budget_bytes
            else:
                budgets[rank] = default_budget_bytes(device, total, sharing[device], self._budget_fraction)
            self.lora_cache_limits[rank] = lora_cache_bytes(total, sharing[device], budgets[rank])
        self.residency = Residency(budgets)
        self.measured_bytes = {rank: 0 for rank in range(len(self.devices))}
        self._inflight = {}

    # ------------------------------------------------------------ worker replies
    def _on_loaded(self, rank: int, key: int, info, error, resident_bytes: int) -> None:
        self.measured_bytes[rank] = int(resident_bytes)
        if key not in self._loads:
            return
        fut, replies, on_progress, expected = self._loads[key]
        replies[rank] = (info, error)
        if on_progress is not None and not error:
            try:
                on_progress(sum(1 for _, e in replies.values() if not e), expected)
            except Exception:  # noqa: BLE001 - a progress callback must not break loading
                log.exception("load progress callback failed")
        if len(replies) == expected and not fut.done():
            fut.set_result(replies)

    def _on_unloaded(self, rank: int, key: int, resident_bytes: int) -> None:
        self.measured_bytes[rank] = int(resident_bytes)
        if key in self._unloads:
            fut, replies, expected = self._unloads[key]
            replies[rank] = int(resident_bytes)
            if len(replies) == expected and not fut.done():
                fut.set_result(replies)

    def _fail_memory_waiters(self, reason: str) -> None:
        for fut, *_ in list(self._loads.values()) + list(self._unloads.values()):
            if not fut.done():
                fut.set_exception(WorkerError(reason))

    # ------------------------------------------------------------ queries
    def models_in_use(self, rank: int) -> frozenset[str]:
        """Models of the assignments in flight on ``rank`` (never evicted from under them)."""
        out = set()
        for task in self._tasks.values():
            if rank in task.assignment.gpu_ids:
                req = self._requests.get(task.assignment.request_ids[0])
                if req is not None:
                    out.add(req.job.model)
        return frozenset(out)

    def residency_of(self, name: str) -> dict:
        """For GET /v1/models: resident_on, bytes_per_worker, last_used_at, pinned, loading_on."""
        if self.residency is None:
            return {"resident_on": [], "bytes_per_worker": 0, "last_used_at": None,
                    "pinned": name in self._pinned, "loading_on": []}
        out = self.residency.describe(name)
        out["pinned"] = name in self._pinned
        if name in self._models and self._models[name][2].num_bytes:
            out["load_s_predicted"] = round(self.load_time.predict_s(self._models[name][2].num_bytes), 3)
        return out

    def memory(self) -> list[dict]:
        """Per worker: budget, bytes booked, bytes the worker measured, entries (bytes resident API)."""
        if self.residency is None:
            return []
        out = self.residency.memory()
        for row in out:
            row["measured_bytes"] = self.measured_bytes.get(row["gpu_id"], 0)
        return out

    def load_records(self, since: float | None = None) -> list[dict]:
        """Loads on the pool's clock (model, gpu_ids, started_at, expected_end_at, finished_at, error)."""
        return [dict(r) for r in self._load_log
                if since is None or r["finished_at"] is None or r["finished_at"] >= since]

    # ------------------------------------------------------------ loads
    @property
    def pinned_models(self) -> frozenset[str]:
        return frozenset(self._pinned)

    def loads_in_progress(self) -> dict[int, str]:
        """rank -> model being loaded there now."""
        return {rank: name for (name, rank) in self._inflight}

    def evict(self, name: str, ranks: Iterable[int]) -> tuple[int, ...]:
        """A planned eviction (the placement stage chose it): free ``name`` on ``ranks`` now, in the
        books at once and on the workers in queue order. Conflict when pinned or in use there."""
        if name in self._pinned:
            raise Conflict(f"model {name!r} is pinned")
        ranks = tuple(r for r in ranks if self.residency is not None and self.residency.holds(r, name))
        busy = [r for r in ranks if name in self.models_in_use(r) or (name, r) in self._inflight]
        if busy:
            raise Conflict(f"model {name!r} is in use on workers {busy}")
        if ranks:
            log.info("evicting %s from workers %s (planned)", name, list(ranks))
            self._send_unload(name, ranks)
        return ranks

    def set_pinned(self, name: str, pinned: bool) -> None:
        (self._pinned.add if pinned else self._pinned.discard)(name)
        if self.residency is not None:
            self.residency.set_pinned(name, pinned)

    async def ensure_resident(self, name: str, ranks: Iterable[int], on_progress: LoadProgress | None = None) -> ModelInfo:
        """Load known model ``name`` on those of ``ranks`` that lack it (evicting LRU models there)."""
        if name not in self._models:
            raise InvalidRequest(f"model {name!r} is not known to the worker pool")
        source, dtype, info = self._models[name]
        await self._load_on(name, source, dtype, tuple(ranks), on_progress)
        return info

    async def _load_on(self, name: str, source: str, dtype: str, ranks: tuple[int, ...],
                       on_progress: LoadProgress | None = None) -> ModelInfo | None:
        assert self.residency is not None
        res = self.residency
        waits = [self._inflight[(name, r)] for r in ranks if (name, r) in self._inflight]
        todo = tuple(r for r in ranks if not res.holds(r, name) and (name, r) not in self._inflight)
        info = None
        if todo:
            what = f"model {name!r} ({source})"
            need = await asyncio.to_thread(predicted_bytes, source, dtype)
            todo = tuple(r for r in todo if not res.holds(r, name) and (name, r) not in self._inflight)
            plans = {r: res.evictions_for(r, name, need, in_use=self.models_in_use(r), what=what) for r in todo}
            pinned = name in self._pinned
            now = self.clock()
            for r in todo:
                res.reserve(r, name, need, now, pinned=pinned)
            fut = self._loop.create_future()
            for r in todo:
                self._inflight[(name, r)] = fut
            try:
                for r, victims in plans.items():
                    for victim in victims:
                        log.info("evicting %s from worker %d (least recently used) to make room for %s",
                                 victim, r, name)
                        self._send_unload(victim, (r,))
                info = await self._load_ranks(name, source, dtype, todo, on_progress)
            except BaseException as exc:
                for r in todo:
                    if not res.holds(r, name):
                        res.remove(r, name)
                if not fut.done():
                    fut.set_exception(exc)
                    fut.exception()  # retrieved: waiters re-raise it themselves
                raise
            else:
                if not fut.done():
                    fut.set_result(info)
            finally:
                for r in todo:
                    if self._inflight.get((name, r)) is fut:
                        del self._inflight[(name, r)]
        for w in waits:
            got = await asyncio.shield(w)
            info = info or got
        return info

    async def _load_ranks(self, name: str, source: str, dtype: str, ranks: tuple[int, ...],
                          on_progress: LoadProgress | None) -> ModelInfo:
        key = next(self._ids)
        fut = self._loop.create_future()
        self._loads[key] = (fut, {}, on_progress, len(ranks))
        started = self.clock()
        source_bytes = self.residency.entry(ranks[0], name)
        record = {"model": name, "gpu_ids": tuple(ranks), "started_at": started, "finished_at": None, "error": None,
                  "expected_end_at": started + self.load_time.predict_s(source_bytes.num_bytes if source_bytes else 0)}
        self._load_log.append(record)
        try:
            for rank in ranks:
                self._send(rank, "load", key, name, source, dtype)
            replies = await fut
        except BaseException as exc:
            record["finished_at"], record["error"] = self.clock(), str(exc) or type(exc).__name__
            raise
        finally:
            self._loads.pop(key, None)
        res = self.residency
        now = self.clock()
        errors = {r: e for r, (_, e) in replies.items() if e}
        record["finished_at"] = now
        record["error"] = "; ".join(errors.values()) if errors else None
        if not errors:  # the slowest worker's time: what the load occupied its devices for
            self.load_time.observe(replies[ranks[0]][0].num_bytes, now - started)
        for r, (info, e) in replies.items():
            if not e:
                res.settle(r, name, info.num_bytes, now)
        if errors:
            for r in replies:
                if r not in errors:  # all or nothing: a partly loaded model helps no group
                    res.remove(r, name)
                    self._send_unload(name, (r,))
            detail = "; ".join(f"worker {r}: {e}" for r, e in sorted(errors.items()))
            raise WorkerError(f"loading model {name!r} from {source} failed: {detail}")
        over = [r for r in ranks if res.used_bytes(r) > res.budget_bytes(r)]
        if over:  # measured more than predicted and more than the budget: undo rather than exceed it
            for r in ranks:
                res.remove(r, name)
                self._send_unload(name, (r,))
            raise InsufficientMemory(f"model {name!r} ({source}) measured {replies[over[0]][0].num_bytes} bytes on "
                                     f"worker {over[0]}: over its budget of {res.budget_bytes(over[0])} bytes")
        return replies[ranks[0]][0]

    def _send_unload(self, name: str, ranks: tuple[int, ...]) -> asyncio.Future:
        """Drop ``name`` from ``ranks`` now in the books; the workers free it in queue order."""
        for r in ranks:
            self.residency.remove(r, name)
        key = next(self._ids)
        fut = self._loop.create_future()
        self._unloads[key] = (fut, {}, len(ranks))
        fut.add_done_callback(lambda f, key=key: (self._unloads.pop(key, None), f.exception() if not f.cancelled()
                                                  else None))
        for r in ranks:
            try:
                self._send(r, "unload", key, name)
            except OSError:  # a dead worker holds nothing
                self._on_unloaded(r, key, 0)
        return fut

    async def unload_model(self, name: str, ranks: Iterable[int] | None = None) -> tuple[int, ...]:
        """Free ``name``'s weights on ``ranks`` (default: everywhere); it stays known, and a later job
        loads it again. Conflict while an assignment in flight uses it there. Returns the ranks freed."""
        if name not in self._models:
            raise InvalidRequest(f"model {name!r} is not loaded")
        res = self.residency
        targets = tuple(range(len(self.devices))) if ranks is None else tuple(ranks)
        busy = [r for r in targets if name in self.models_in_use(r) or (name, r) in self._inflight]
        if busy:
            raise Conflict(f"model {name!r} is in use (running or loading) on workers {busy}; unload it when idle")
        freed = tuple(r for r in targets if res.holds(r, name))
        if freed:
            await self._send_unload(name, freed)
        return freed
