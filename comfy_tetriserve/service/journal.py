"""The job journal: a small append-only file, so a restarted service can say what became of the
jobs an earlier run accepted.

One JSON object per line:

    {"e": "boot", "boot": B, "at": T}                                     a run started
    {"e": "acc", "id": J, "boot": B, "tenant": N, "key": K, "at": T}      a job was accepted
    {"e": "end", "id": J, "status": S, "error": E, "code": C, "at": T}    it ended (finished, failed, cancelled)
    {"e": "stop", "boot": B, "at": T}                                     the run stopped cleanly
    {"e": "past", "id": J, "boot": B, "tenant": N, "key": K, "status": S, "reason": E, "at": T}

When a run starts it reads the file: a job accepted with no end line was **lost** (the service
stopped before the job finished: it was killed, crashed, or the machine went down). A graceful
stop writes a ``failed`` end line with code ``service_stopped`` for every unfinished job first;
such a job counts as lost too (it did not fail: the service went away under it). A job with any
other end line ended as recorded, and its result (kept in memory only) is gone. The file is rewritten with those as
``past`` lines (the newest ``max_past``) and the new run's ``boot`` line. Asking the new run
for such a job answers 410: code ``job_lost`` for a lost job, ``gone`` for an ended one, with a
message saying so. A client that submits the job again under the same job key gets a fresh
run: job keys are remembered per run, and a lost job has no result to return.

Every line is flushed when written, so a killed service loses nothing (the kernel has it);
``fsync`` is not called per job, so a power loss may lose the last lines. The file is compacted
when it grows past ``max_lines``: the past lines plus the lines of jobs this run accepted
(all unfinished ones, the newest ``max_past`` ended ones). A journal that cannot be written is
switched off with one error in the log; the service goes on without it.

One service owns a journal at a time: ``open`` takes an exclusive lock on ``<journal>.lock``
(held until ``close`` or the process ends; the kernel drops it when a service is killed). A
second service given the same file (a second ``serve`` on the same port, which fails to bind
only after the app started) runs without a journal rather than rewrite the live one. Where the
platform has no ``fcntl`` (Windows), the lock is not taken.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one service per journal is then up to the user
    fcntl = None
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAX_PAST = 10_000
MAX_LINES = 200_000


@dataclass(frozen=True)
class PastJob:
    """What became of a job of an earlier run (``status`` ``lost`` or its end status)."""

    job_id: str
    boot_id: str
    tenant: str
    job_key: str | None
    status: str
    reason: str | None
    at: float
    code: str | None = None  # the end line's code (service_stopped: a graceful stop under the job)

    @property
    def lost(self) -> bool:
        return self.status == "lost" or self.code == "service_stopped"

    def message(self) -> str:
        if self.code == "service_stopped":
            return (f"job {self.job_id} was accepted by an earlier run of the service (boot {self.boot_id}) that "
                    "shut down before the job finished; the job is lost: submit it again (the same job key starts "
                    "a fresh run)")
        if self.lost:
            return (f"job {self.job_id} was accepted by an earlier run of the service (boot {self.boot_id}) that "
                    "stopped before the job finished (it was killed or crashed); the job is lost: submit it again "
                    "(the same job key starts a fresh run)")
        reason = f" ({self.reason})" if self.reason else ""
        return (f"job {self.job_id} {self.status} in an earlier run of the service (boot {self.boot_id}){reason}; "
                "results do not outlive a restart")

    def to_line(self) -> dict:
        return {"e": "past", "id": self.job_id, "boot": self.boot_id, "tenant": self.tenant, "key": self.job_key,
                "status": self.status, "reason": self.reason, "at": self.at, "code": self.code}


class JobJournal:
    """See the module docstring. ``path`` None: a journal that keeps nothing (and answers nothing)."""

    def __init__(self, path: str | os.PathLike | None, boot_id: str, *, max_past: int = MAX_PAST,
                 max_lines: int = MAX_LINES) -> None:
        self.path = Path(path) if path else None
        self.boot_id = boot_id
        self.max_past = max_past
        self.max_lines = max_lines
        self._past: OrderedDict[str, PastJob] = OrderedDict()
        self._mine: OrderedDict[str, list[dict]] = OrderedDict()  # job id -> its acc (and end) lines, this run
        self._num_open = 0
        self._file = None
        self._lock = None  # the open lock file while this journal is owned
        self._lines = 0
        self.num_lost_found = 0  # jobs of earlier runs found lost at open

    @property
    def enabled(self) -> bool:
        return self._file is not None

    # ------------------------------------------------------------------ start
    def open(self) -> list[PastJob]:
        """Read what earlier runs left, rewrite the file compacted, start this run. Returns the lost jobs."""
        if self.path is None:
            return []
        found: list[PastJob] = []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self._take_lock():
                log.error("the job journal %s belongs to another running service; going on without it: a restart "
                          "of this one will not be able to tell clients which jobs it lost", self.path)
                return []
            if self.path.exists():
                found = self._read(self.path)
            self._rewrite()
        except OSError as exc:
            self._disable(exc)
            return []
        lost = [p for p in found if p.lost]
        self.num_lost_found = len(lost)
        if lost:
            log.warning("the journal %s has %d jobs an earlier run accepted and never finished; they are reported "
                        "lost to their clients", self.path, len(lost))
        return lost

    def _take_lock(self) -> bool:
        if fcntl is None:
            return True
        lock = open(self.path.with_name(self.path.name + ".lock"), "a")  # noqa: SIM115 - held for the run
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by another service (any other error: the journal cannot be used)
            lock.close()
            return False
        except OSError:
            lock.close()
            raise
        self._lock = lock
        return True

    def _read(self, path: Path) -> list[PastJob]:
        accepted: dict[str, dict] = {}
        ended: dict[str, dict] = {}
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("id", ""), str):
                    continue
                kind = rec.get("e")
                try:
                    if kind == "past":
                        self._remember(PastJob(rec["id"], str(rec["boot"]), str(rec.get("tenant", "")), rec.get("key"),
                                               str(rec["status"]), rec.get("reason"), float(rec["at"]), rec.get("code")))
                    elif kind == "acc":
                        accepted[rec["id"]] = rec
                    elif kind == "end":
                        ended[rec["id"]] = rec
                except (KeyError, TypeError, ValueError):
                    continue
        found = []
        for job_id, acc in accepted.items():
            end = ended.get(job_id)
            try:
                past = PastJob(job_id, str(acc.get("boot", "?")), str(acc.get("tenant", "")), acc.get("key"),
                               str(end["status"]) if end else "lost", end.get("error") if end else None,
                               float((end or acc).get("at", 0.0)), end.get("code") if end else None)
            except (TypeError, ValueError):
                continue
            self._remember(past)
            found.append(past)
        return found

    def _remember(self, past: PastJob) -> None:
        self._past[past.job_id] = past
        self._past.move_to_end(past.job_id)
        while len(self._past) > self.max_past:
            self._past.popitem(last=False)

    def _rewrite(self) -> None:
        """Replace the file by its compacted form (atomically) and keep it open for appends."""
        if self._file is not None:
            self._file.close()
            self._file = None
        tmp = self.path.with_name(self.path.name + ".tmp")
        lines = [p.to_line() for p in self._past.values()]
        lines.append({"e": "boot", "boot": self.boot_id, "at": time.time()})
        lines.extend(rec for recs in self._mine.values() for rec in recs)
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in lines:
                f.write(json.dumps(rec, separators=(",", ":")) + "\n")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._lines = len(lines)

    def _disable(self, exc: BaseException) -> None:
        log.error("the job journal %s cannot be written (%s); going on without it: a restart will not be able to "
                  "tell clients which jobs it lost", self.path, exc)
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        self._file = None

    # ------------------------------------------------------------------ writes
    def _write(self, rec: dict) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(rec, separators=(",", ":")) + "\n")
            self._file.flush()
            self._lines += 1
            if self._lines > self.max_lines:
                self._rewrite()  # compacted: ``ended`` keeps only the newest max_past ended jobs of this run
        except OSError as exc:
            self._disable(exc)

    def accepted(self, job_id: str, tenant: str, job_key: str | None) -> None:
        if self._file is None:
            return
        rec = {"e": "acc", "id": job_id, "boot": self.boot_id, "tenant": tenant, "key": job_key, "at": time.time()}
        self._mine[job_id] = [rec]
        self._num_open += 1
        self._write(rec)

    def ended(self, job_id: str, status: str, error: str | None, code: str | None = None) -> None:
        recs = self._mine.get(job_id)
        if self._file is None or recs is None or len(recs) != 1:
            return
        rec = {"e": "end", "id": job_id, "status": status, "error": error, "code": code, "at": time.time()}
        recs.append(rec)
        self._num_open -= 1
        while len(self._mine) - self._num_open > self.max_past:
            oldest = next((j for j, r in self._mine.items() if len(r) == 2), None)
            if oldest is None:
                break
            del self._mine[oldest]
        self._write(rec)

    def close(self) -> None:
        """A clean stop (jobs still unfinished now count as lost at the next start)."""
        self._write({"e": "stop", "boot": self.boot_id, "at": time.time()})
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if self._lock is not None:
            self._lock.close()  # releases the lock
            self._lock = None

    # ------------------------------------------------------------------ reads
    def past(self, job_id: str) -> PastJob | None:
        return self._past.get(job_id)
