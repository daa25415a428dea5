"""Job history in SQLite: every job the service accepted, what it asked for and what came of it.

One row per job: tenant, model, size, steps, deadline, the devices it ran on (placement history),
device-seconds, when and how it ended and whether it met its deadline. ``/v1/usage`` (usage.py)
aggregates it; a restarted service reads it to tell clients what became of an earlier run's jobs:
a job accepted and never ended (the service was killed, crashed, or the machine went down) is
**lost**, and so is one that a graceful stop ended with code ``service_stopped``; asking the new
run for an earlier run's job answers 410 (``job_lost`` or ``gone``) with a message saying so.

Durability: the database runs in WAL mode and each accept and each end is its own transaction, so
a killed service loses nothing it wrote (the kernel has it); with ``synchronous=NORMAL`` a power
loss may lose the last transactions. Rows older than ``retention_days`` are deleted at start and
once a day. A history that cannot be written is switched off with one error in the log; the
service goes on without it.

One service owns a history at a time: ``open`` takes an exclusive lock on ``<file>.lock`` (held
until ``close`` or the process ends). A second service given the same file runs without one.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one service per history is then up to the user
    fcntl = None

log = logging.getLogger(__name__)

DEFAULT_RETENTION_DAYS = 90.0
PRUNE_EVERY_S = 86400.0
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    boot_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    job_key TEXT,
    model TEXT NOT NULL DEFAULT '',
    height INTEGER NOT NULL DEFAULT 0,
    width INTEGER NOT NULL DEFAULT 0,
    batch INTEGER NOT NULL DEFAULT 1,
    num_steps INTEGER NOT NULL DEFAULT 0,
    priority INTEGER NOT NULL DEFAULT 0,
    submitted_at REAL NOT NULL,          -- unix seconds
    deadline_at REAL,                    -- unix seconds; NULL: best effort
    ended_at REAL,                       -- NULL while open
    status TEXT,                         -- finished | failed | cancelled | lost; NULL while open
    error TEXT,
    code TEXT,
    met_deadline INTEGER,                -- 1 / 0; NULL without a deadline, or cancelled
    steps_done INTEGER NOT NULL DEFAULT 0,
    gpu_s REAL NOT NULL DEFAULT 0,       -- device-seconds
    placements TEXT NOT NULL DEFAULT '[]',  -- JSON: [[gpu_ids, started_at, ended_at, steps_done, lost], ...]
    reported INTEGER NOT NULL DEFAULT 0  -- 1 once a later run has counted it (lost or not)
);
-- covers the usage queries (usage.py): a report reads this index only, never the rows
CREATE INDEX IF NOT EXISTS jobs_for_usage ON jobs
    (submitted_at, tenant, model, status, ended_at, gpu_s, deadline_at, met_deadline);
CREATE INDEX IF NOT EXISTS jobs_unreported ON jobs (reported) WHERE reported = 0;
"""


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
    code: str | None = None  # the end's code (service_stopped: a graceful stop under the job)

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


def connect(path: str | os.PathLike, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection to a history file (WAL, autocommit); ``readonly`` for queries from other threads."""
    if readonly:
        conn = sqlite3.connect(f"{Path(path).as_uri()}?mode=ro", uri=True, check_same_thread=False,
                               isolation_level=None)
    else:
        conn = sqlite3.connect(str(path), isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=2000")
    return conn


class JobHistory:
    """See the module docstring. ``path`` None: a history that keeps nothing (and answers nothing)."""

    def __init__(self, path: str | os.PathLike | None, boot_id: str, *,
                 retention_days: float = DEFAULT_RETENTION_DAYS) -> None:
        self.path = Path(path) if path else None
        self.boot_id = boot_id
        self.retention_days = retention_days
        self._db: sqlite3.Connection | None = None
        self._lock = None
        self._pruned_at = 0.0
        self.num_lost_found = 0  # jobs of earlier runs found lost at open

    @property
    def enabled(self) -> bool:
        return self._db is not None

    # ------------------------------------------------------------------ start
    def open(self) -> list[PastJob]:
        """Start this run: earlier runs' unended jobs become ``lost``. Returns the jobs lost since the last run."""
        if self.path is None:
            return []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self._take_lock():
                log.error("the job history %s belongs to another running service; going on without it: a restart "
                          "of this one will not be able to tell clients which jobs it lost", self.path)
                return []
            self._db = connect(self.path)
            self._db.executescript(SCHEMA)
            lost = self._settle_earlier_runs()
            self.prune()
        except (OSError, sqlite3.Error) as exc:
            self._disable(exc)
            return []
        self.num_lost_found = len(lost)
        if lost:
            log.warning("the job history %s has %d jobs an earlier run accepted and never finished; they are "
                        "reported lost to their clients", self.path, len(lost))
        return lost

    def _settle_earlier_runs(self) -> list[PastJob]:
        db = self._db
        assert db is not None
        with _transaction(db):
            db.execute("UPDATE jobs SET status = 'lost', ended_at = submitted_at "
                       "WHERE status IS NULL AND boot_id != ?", (self.boot_id,))
            rows = db.execute("SELECT job_id, boot_id, tenant, job_key, status, error, COALESCE(ended_at, 0), code "
                              "FROM jobs WHERE reported = 0 AND boot_id != ? "
                              "AND (status = 'lost' OR code = 'service_stopped') ORDER BY submitted_at",
                              (self.boot_id,)).fetchall()
            db.execute("UPDATE jobs SET reported = 1 WHERE reported = 0 AND boot_id != ?", (self.boot_id,))
        return [PastJob(*row) for row in rows]

    def _take_lock(self) -> bool:
        if fcntl is None:
            return True
        lock = open(self.path.with_name(self.path.name + ".lock"), "a")  # noqa: SIM115 - held for the run
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by another service (any other error: the history cannot be used)
            lock.close()
            return False
        except OSError:
            lock.close()
            raise
        self._lock = lock
        return True

    def _disable(self, exc: BaseException) -> None:
        log.error("the job history %s cannot be written (%s); going on without it: a restart will not be able to "
                  "tell clients which jobs it lost", self.path, exc)
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
        self._db = None

    def prune(self, now: float | None = None) -> int:
        """Delete jobs that ended more than ``retention_days`` ago; returns how many."""
        if self._db is None or self.retention_days <= 0:
            return 0
        now = time.time() if now is None else now
        self._pruned_at = now
        cur = self._db.execute("DELETE FROM jobs WHERE submitted_at < ? AND status IS NOT NULL",
                               (now - self.retention_days * 86400.0,))
        return cur.rowcount

    # ------------------------------------------------------------------ writes
    def _write(self, sql: str, args: tuple) -> None:
        if self._db is None:
            return
        try:
            self._db.execute(sql, args)
            if time.time() - self._pruned_at > PRUNE_EVERY_S:
                self.prune()
        except sqlite3.Error as exc:
            self._disable(exc)

    def accepted(self, job_id: str, tenant: str, job_key: str | None, *, model: str = "", height: int = 0,
                 width: int = 0, batch: int = 1, num_steps: int = 0, priority: int = 0,
                 submitted_at: float | None = None, deadline_at: float | None = None) -> None:
        """A job was accepted (times in unix seconds; default now)."""
        self._write(
            "INSERT OR REPLACE INTO jobs (job_id, boot_id, tenant, job_key, model, height, width, batch, num_steps, "
            "priority, submitted_at, deadline_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, self.boot_id, tenant, job_key, model, height, width, batch, num_steps, priority,
             time.time() if submitted_at is None else submitted_at, deadline_at))

    def ended(self, job_id: str, status: str, error: str | None, code: str | None = None, *,
              ended_at: float | None = None, met_deadline: bool | None = None, steps_done: int = 0,
              gpu_s: float = 0.0, placements: list | tuple = ()) -> None:
        """A job of this run ended; ``placements``: (gpu_ids, started_at, ended_at, steps_done, lost) in unix seconds."""
        self._write(
            "UPDATE jobs SET status = ?, error = ?, code = ?, ended_at = ?, met_deadline = ?, steps_done = ?, "
            "gpu_s = ?, placements = ? WHERE job_id = ? AND boot_id = ? AND status IS NULL",
            (status, error, code, time.time() if ended_at is None else ended_at,
             None if met_deadline is None else int(met_deadline), steps_done, gpu_s,
             json.dumps([list(p) for p in placements], separators=(",", ":")), job_id, self.boot_id))

    def close(self) -> None:
        """A clean stop (jobs still unended now are lost for the next run)."""
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None
        if self._lock is not None:
            self._lock.close()  # releases the lock
            self._lock = None

    # ------------------------------------------------------------------ reads
    def past(self, job_id: str) -> PastJob | None:
        """An earlier run's job, once ended or lost (None for this run's jobs and unknown ones)."""
        if self._db is None:
            return None
        try:
            row = self._db.execute("SELECT job_id, boot_id, tenant, job_key, status, error, COALESCE(ended_at, 0), code "
                                   "FROM jobs WHERE job_id = ? AND boot_id != ? AND status IS NOT NULL",
                                   (job_id, self.boot_id)).fetchone()
        except sqlite3.Error:
            return None
        return PastJob(*row) if row else None


class _transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, exc, tb) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
