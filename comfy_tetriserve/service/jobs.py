"""Jobs and leases: what was asked, by whom, until when, and what came of it.

A ``Job`` is the service's record of one request: its settings, its API status (``JobStatus``:
the service's state machine, which the engine loop moves), its event log and, once finished,
its result bytes. A ``Lease`` is a client's promise to stay alive: it heartbeats, and when it
stops for ``lease_s`` the loop cancels the lease's unfinished jobs. The ``JobStore`` holds both,
the idempotency index ((tenant, job key) -> job), the per-tenant and overall limits, and
tombstones of forgotten jobs (so a late reader gets 410 Gone, not 404); with a history
(history.py), jobs of earlier runs answer 410 too, saying whether they were lost.

Times here are on the engine's clock (``Clock.now``: monotonic seconds); the API shows unix
seconds (``Clock.to_wall``).
"""
from __future__ import annotations

import enum
import itertools
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from ..errors import Conflict, Gone, JobLost, NotFound, TooManyRequests
from ..types import GenRequest
from .events import EventLog
from .history import JobHistory
from .schemas import JobSettings
from .settings import ServiceConfig

MAX_TOMBSTONES = 20_000  # forgotten jobs that still answer 410 (about 3 MB)
MAX_LEASES = 10_000


class Clock:
    """The engine's clock (monotonic) and its conversion to unix time for the API."""

    def __init__(self) -> None:
        self._offset = time.time() - time.monotonic()

    def now(self) -> float:
        return time.monotonic()

    def to_wall(self, t: float | None) -> float | None:
        return None if t is None else t + self._offset


class JobStatus(enum.Enum):
    QUEUED = "queued"  # admitted, not yet on devices
    RUNNING = "running"  # an assignment of it is in flight (or its result is being collected)
    WAITING = "waiting"  # some steps done, off the devices until the planner places it again
    FINISHED = "finished"  # result ready
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL  # a set of members: this runs for every stored job on every submit


_TERMINAL = frozenset((JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELLED))


@dataclass(frozen=True)
class Placement:
    """One assignment a job was part of: its devices, when (engine clock), steps done, lost to a fault."""

    gpu_ids: tuple[int, ...]
    started_at: float
    ended_at: float
    steps_done: int
    lost: bool = False


@dataclass(eq=False)
class Job:
    """One job's record (mutable: the engine loop advances it; see the module docstring)."""

    job_id: str
    settings: JobSettings
    request: GenRequest
    tenant: str
    lease_id: str | None
    body_digest: str
    submitted_at: float
    simulated: bool
    family: str  # the model's family (latent format of the result)
    status: JobStatus = JobStatus.QUEUED
    predicted_finish_at: float | None = None
    steps_done: int = 0
    gpu_ids: tuple[int, ...] = ()
    first_step_at: float | None = None
    ended_at: float | None = None
    error: str | None = None
    error_code: str | None = None  # a failed job's reason in a word: service_stopped (submit it again)
    cancel_reason: str | None = None  # set when a cancel was asked (the job ends at its next step boundary)
    result: bytes | None = None
    fetched_at: float | None = None
    events: EventLog = field(default_factory=EventLog)
    num_faults: int = 0  # times it was on devices that failed (a worker died, ran out of memory)
    last_fault: str | None = None
    gpu_s: float = 0.0  # device-seconds of its assignments (an assignment's shared equally among its jobs)
    placements: list[Placement] = field(default_factory=list)

    @property
    def deadline_at(self) -> float | None:
        return self.request.deadline_at

    @property
    def feasible(self) -> bool | None:
        """Whether the predicted finish meets the deadline (None for best effort)."""
        if self.deadline_at is None or self.predicted_finish_at is None:
            return None
        return self.predicted_finish_at <= self.deadline_at

    @property
    def met_deadline(self) -> bool | None:
        if self.deadline_at is None or not self.status.is_terminal or self.status is JobStatus.CANCELLED:
            return None
        return self.status is JobStatus.FINISHED and self.ended_at is not None and self.ended_at <= self.deadline_at + 1e-9

    def to_json(self, clock: Clock, boot_id: str) -> dict:
        r = self.request
        return {
            "job_id": self.job_id,
            "job_key": self.settings.job_key,
            "boot_id": boot_id,
            "status": self.status.value,
            "model": r.model,
            "tenant": self.tenant,
            "lease": self.lease_id,
            "height": r.height,
            "width": r.width,
            "batch": r.batch,
            "priority": r.priority,
            "steps_done": self.steps_done,
            "num_steps": r.num_steps,
            "gpu_ids": list(self.gpu_ids),
            "sp_degree": len(self.gpu_ids),
            "submitted_at": clock.to_wall(self.submitted_at),
            "deadline_at": clock.to_wall(self.deadline_at),
            "predicted_finish_at": clock.to_wall(self.predicted_finish_at),
            "feasible": self.feasible,
            "first_step_at": clock.to_wall(self.first_step_at),
            "ended_at": clock.to_wall(self.ended_at),
            "met_deadline": self.met_deadline,
            "error": self.error,
            "error_code": self.error_code,
            "cancel_reason": self.cancel_reason,
            "simulated": self.simulated,
            "result_ready": self.result is not None,
            "last_event_seq": self.events.last_seq,
            "num_faults": self.num_faults,
            "last_fault": self.last_fault,
        }


@dataclass(eq=False)
class Lease:
    lease_id: str
    tenant: str
    ttl_s: float
    renewed_at: float
    job_ids: set[str] = field(default_factory=set)

    def expires_at(self) -> float:
        return self.renewed_at + self.ttl_s

    def to_json(self, clock: Clock) -> dict:
        return {"lease": self.lease_id, "tenant": self.tenant, "ttl_s": self.ttl_s,
                "expires_at": clock.to_wall(self.expires_at()), "num_jobs": len(self.job_ids)}


class JobStore:
    """Jobs, leases, idempotency keys, limits and tombstones (see the module docstring)."""

    def __init__(self, config: ServiceConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.jobs: dict[str, Job] = {}
        self.leases: dict[str, Lease] = {}
        self._by_key: dict[tuple[str, str], str] = {}
        self._tombstones: OrderedDict[str, str] = OrderedDict()
        self._counter = itertools.count(1)
        self.boot_id = secrets.token_hex(4)
        self.history = JobHistory(None, self.boot_id)  # create_app replaces it when the config names a file

    # ------------------------------------------------------------------ jobs
    def new_job_id(self) -> str:
        return f"j-{self.boot_id}-{next(self._counter):06d}"

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is not None:
            return job
        if job_id in self._tombstones:
            raise Gone(f"job {job_id} ended and was forgotten ({self._tombstones[job_id]})")
        past = self.history.past(job_id)
        if past is not None:
            raise (JobLost if past.lost else Gone)(past.message())
        if job_id.startswith("j-") and not job_id.startswith(f"j-{self.boot_id}-"):
            raise NotFound(f"unknown job {job_id}: it belongs to an earlier run of the service (restarted since)")
        raise NotFound(f"unknown job {job_id}")

    def find_by_key(self, tenant: str, job_key: str | None) -> Job | None:
        if job_key is None:
            return None
        job_id = self._by_key.get((tenant, job_key))
        return self.jobs.get(job_id) if job_id else None

    def open_jobs(self) -> list[Job]:
        return [j for j in self.jobs.values() if not j.status.is_terminal]

    def check_capacity(self, tenant: str) -> None:
        open_jobs = self.open_jobs()
        if len(open_jobs) >= self.config.max_open_jobs:
            raise TooManyRequests(f"the service holds {len(open_jobs)} unfinished jobs, its limit; retry later")
        mine = sum(1 for j in open_jobs if j.tenant == tenant)
        if mine >= self.config.max_open_jobs_per_tenant:
            raise TooManyRequests(f"tenant {tenant!r} has {mine} unfinished jobs, the per-tenant limit; retry later")

    def add(self, job: Job) -> None:
        """Store an admitted job (raises NotFound, storing nothing, if its lease ended meanwhile)."""
        lease = self.lease(job.lease_id) if job.lease_id is not None else None
        self.jobs[job.job_id] = job
        if job.settings.job_key is not None:
            self._by_key[(job.tenant, job.settings.job_key)] = job.job_id
        if lease is not None:
            lease.job_ids.add(job.job_id)

    def forget(self, job_id: str, reason: str) -> None:
        job = self.jobs.pop(job_id)
        if job.settings.job_key is not None:
            self._by_key.pop((job.tenant, job.settings.job_key), None)
        if job.lease_id in self.leases:
            self.leases[job.lease_id].job_ids.discard(job_id)
        self._tombstones[job_id] = reason
        while len(self._tombstones) > MAX_TOMBSTONES:
            self._tombstones.popitem(last=False)

    def expired_jobs(self, now: float) -> list[tuple[str, str]]:
        """(job id, reason) of ended jobs whose time is up (results fetched or abandoned)."""
        out = []
        for job in self.jobs.values():
            if not job.status.is_terminal or job.ended_at is None:
                continue
            if job.fetched_at is not None and now - job.fetched_at >= self.config.fetched_ttl_s:
                out.append((job.job_id, "result fetched and expired"))
            elif now - job.ended_at >= self.config.result_ttl_s:
                out.append((job.job_id, "ended and expired"))
        return out

    # ---------------------------------------------------------------- leases
    def create_lease(self, tenant: str, ttl_s: float | None = None) -> Lease:
        if len(self.leases) >= MAX_LEASES:
            raise TooManyRequests("too many open leases")
        mine = sum(1 for lease in self.leases.values() if lease.tenant == tenant)
        if mine >= self.config.max_leases_per_tenant:
            raise TooManyRequests(f"tenant {tenant!r} has {mine} open leases, the per-tenant limit; "
                                  "release some or let them expire")
        ttl = self.config.lease_s if ttl_s is None else ttl_s
        lease = Lease(f"l-{self.boot_id}-{secrets.token_hex(8)}", tenant, ttl, self.clock.now())
        self.leases[lease.lease_id] = lease
        return lease

    def lease(self, lease_id: str) -> Lease:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise NotFound(f"unknown or expired lease {lease_id}")
        return lease

    def renew(self, lease_id: str) -> Lease:
        lease = self.lease(lease_id)
        lease.renewed_at = self.clock.now()
        return lease

    def drop_lease(self, lease_id: str) -> Lease:
        lease = self.lease(lease_id)
        del self.leases[lease_id]
        return lease

    def expired_leases(self, now: float) -> list[Lease]:
        return [lease for lease in self.leases.values() if now >= lease.expires_at()]

    def check_key_reuse(self, job: Job, body_digest: str) -> None:
        if job.body_digest != body_digest:
            raise Conflict(f"job key {job.settings.job_key!r} was used for job {job.job_id} with a different body")
