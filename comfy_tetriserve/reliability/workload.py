"""The fault drill and the soak: many jobs from several clients against a real service.

Every job is followed to its end through the public client (events, status, result). A job
counts as **lost** if it was accepted and did not end as its client asked: a job meant to finish
that failed, or one that never ended within the time limit. Finished results are compared with
``Reference`` (direct one-device sampling) for every fault-drill job and a sample of soak jobs,
and repeated inputs must give the same latent.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..client import JobCancelled, JobFailed, TetriServeClient, decode_result
from ..errors import Conflict, Gone, TetriServeError, TooManyRequests
from .harness import ServiceProcess
from .reference import REL_TOL, JobSpec, Reference, make_spec, rel_err

log = logging.getLogger(__name__)

#: how the drill takes workers down: the OOM killer's SIGKILL, a plain SIGTERM, and SIGSTOP (a hang: the
#: process lives on, stuck, until the service's stall watchdog kills it). No core-dumping signals.
KILL_SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP)


@dataclass
class Outcome:
    """What became of one drill job."""

    spec: JobSpec
    action: str  # "fetch" | "cancel" | "abandon" | "vanish"
    job_id: str | None = None
    status: str | None = None  # finished | failed | cancelled | gone (ended, forgotten) | None (never ended)
    error: str | None = None
    num_requeued: int = 0
    resumed_from: list[int] = field(default_factory=list)  # steps_done of each ``requeued`` event
    latent: torch.Tensor | None = None

    @property
    def as_asked(self) -> bool:
        """Ended the way its client asked: finished, or cancelled when it cancelled or vanished."""
        if self.action in ("fetch", "abandon"):
            return self.status == "finished"
        if self.action == "cancel":
            return self.status in ("cancelled", "finished")  # a cancel may come after the last step
        return self.status in ("cancelled", "finished", "gone")  # vanished: its lease expired (or it was quick)


async def wait_job(client: TetriServeClient, job_id: str, on_event: Callable[[dict], None], timeout_s: float) -> dict:
    """Follow the job's events to its end; when the service refuses a stream (429), poll its status."""
    deadline = time.monotonic() + timeout_s
    try:
        return await client.wait(job_id, on_event, timeout_s=timeout_s)
    except TooManyRequests:
        while time.monotonic() < deadline:
            status = await client.status(job_id)
            if status["status"] in ("finished", "failed", "cancelled"):
                if status["status"] == "failed":
                    raise JobFailed(job_id, status.get("error") or "", status) from None
                if status["status"] == "cancelled":
                    raise JobCancelled(job_id, status.get("cancel_reason"), status) from None
                return status
            await asyncio.sleep(0.2)
        raise asyncio.TimeoutError(f"job {job_id} did not end within {timeout_s:g} s") from None


async def submit_retrying(client: TetriServeClient, body: bytes, job_key: str, lease: str | None = None,
                          timeout_s: float = 60.0) -> dict:
    """Submit; a 429 (the service is full) or a 409 for a model still loading (a service that has just
    started) is retried after a pause, as a well-behaved client does."""
    deadline = time.monotonic() + timeout_s
    pause = 0.05
    while True:
        try:
            return await client.submit(body, job_key=job_key, lease=lease)
        except (TooManyRequests, Conflict) as exc:
            if time.monotonic() > deadline or (isinstance(exc, Conflict) and "loading" not in str(exc)):
                raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)


async def run_job(client: TetriServeClient, spec: JobSpec, action: str, *, tenant: str, timeout_s: float,
                  keep_latent: bool = False) -> Outcome:
    out = Outcome(spec, action)
    key = f"{tenant}-{spec.index}-{uuid.uuid4().hex[:8]}"
    try:
        receipt = await submit_retrying(client, spec.body(tenant=tenant, job_key=key), key)
        out.job_id = receipt["job_id"]
        events: list[dict] = []
        cancel_task = None

        def on_event(event: dict) -> None:
            nonlocal cancel_task
            events.append(event)
            if event["type"] == "requeued":
                out.num_requeued += 1
                out.resumed_from.append(event["steps_done"])
            if action == "cancel" and cancel_task is None and (
                    spec.index % 2 == 0 or event["type"] == "step"):  # half at once, half after a step
                cancel_task = asyncio.ensure_future(client.cancel(out.job_id))

        try:
            await wait_job(client, out.job_id, on_event, timeout_s)
            out.status = "finished"
        except JobCancelled as exc:
            out.status, out.error = "cancelled", exc.reason
        except JobFailed as exc:
            out.status, out.error = "failed", str(exc)
        if cancel_task is not None:
            with contextlib.suppress(Conflict, asyncio.CancelledError):
                await cancel_task
        if out.status == "finished" and action != "abandon":
            tensors, _ = decode_result(await client.result(out.job_id))
            if keep_latent:
                out.latent = tensors["latent"]
    except (TetriServeError, asyncio.TimeoutError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def run_vanishing(client: TetriServeClient, spec: JobSpec, *, tenant: str) -> Outcome:
    """A client that submits under a short lease and goes away (no heartbeat, no waiting)."""
    out = Outcome(spec, "vanish")
    lease = await client.create_lease(tenant=tenant, ttl_s=0.5)
    key = f"{tenant}-vanish-{spec.index}-{uuid.uuid4().hex[:8]}"
    try:
        receipt = await submit_retrying(client, spec.body(tenant=tenant, job_key=key), key, lease=lease["lease"])
        out.job_id = receipt["job_id"]
    except TetriServeError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def settle_vanished(client: TetriServeClient, outcomes: list[Outcome], timeout_s: float) -> None:
    """What became of the vanished clients' jobs (looked up afterwards, as an operator would)."""
    deadline = time.monotonic() + timeout_s
    for out in outcomes:
        if out.job_id is None:
            continue
        while time.monotonic() < deadline:
            try:
                status = await client.status(out.job_id)
            except Gone:
                out.status = "gone"
                break
            if status["status"] in ("finished", "failed", "cancelled"):
                out.status, out.error = status["status"], status.get("cancel_reason") or status.get("error")
                break
            await asyncio.sleep(0.1)


# ------------------------------------------------------------------------------ memory
@dataclass
class RssSampler:
    """Samples the service's resident memory with the number of jobs ended so far."""

    svc: ServiceProcess
    period_s: float = 0.1
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (time, jobs ended, rss bytes)
    ended: int = 0
    _task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            rss = self.svc.rss()
            if rss is not None:
                self.samples.append((time.monotonic(), self.ended, rss))
            await asyncio.sleep(self.period_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def plateau(self, lo: float, hi: float, total: int) -> int | None:
        """Median RSS over the samples taken while ended jobs were in [lo, hi] x total."""
        window = [rss for _, ended, rss in self.samples if lo * total <= ended <= hi * total]
        return int(statistics.median(window)) if window else None


# ------------------------------------------------------------------------------ soak
@dataclass
class SoakReport:
    jobs_submitted: int = 0
    jobs_ended: int = 0
    finished: int = 0
    cancelled_as_asked: int = 0
    not_as_asked: list[str] = field(default_factory=list)
    checked_vs_direct: int = 0
    max_rel_err: float = 0.0
    determinism_pairs: int = 0
    determinism_max_rel_err: float = 0.0
    rss_early_mb: float | None = None
    rss_late_mb: float | None = None
    rss_max_mb: float | None = None
    rss_growth: float | None = None
    rss_profile_mb: list[float | None] = field(default_factory=list)  # median RSS per tenth of the jobs ended
    jobs_held_after: int | None = None
    duration_s: float = 0.0


def soak_action(index: int) -> str:
    if index % 25 in (7, 19):
        return "cancel"
    if index % 20 == 5:
        return "abandon"
    if index % 50 == 33:
        return "vanish"
    return "fetch"


def soak_spec(index: int, models: dict[str, str]) -> JobSpec:
    """Every tenth job repeats the inputs of the job five before it (determinism pairs)."""
    base = index - 5 if index % 10 == 9 and index >= 5 else index
    spec = make_spec(base, models, steps=(4, 12), resolutions=(32, 48, 64))
    return JobSpec(**{**spec.__dict__, "index": index})


async def soak(svc: ServiceProcess, reference: Reference | None, models: dict[str, str], *, num_jobs: int,
               num_clients: int, concurrency: int, check_every: int, timeout_s: float) -> SoakReport:
    report = SoakReport()
    sampler = RssSampler(svc)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(num_jobs):
        queue.put_nowait(i)
    outcomes: list[Outcome] = []
    vanished: list[Outcome] = []
    t0 = time.monotonic()
    deadline = t0 + timeout_s

    async def worker(client: TetriServeClient, tenant: str) -> None:
        while time.monotonic() < deadline:
            try:
                index = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            spec = soak_spec(index, models)
            action = soak_action(index)
            report.jobs_submitted += 1
            if action == "vanish":
                out = await run_vanishing(client, spec, tenant=tenant)
                vanished.append(out)
            else:
                keep = reference is not None and action == "fetch" and (
                    index % check_every == 0 or index % 10 in (4, 9))
                out = await run_job(client, spec, action, tenant=tenant, timeout_s=max(deadline - time.monotonic(), 1),
                                    keep_latent=keep)
                outcomes.append(out)
            sampler.ended += 1

    sampler.start()
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(TetriServeClient(svc.url, timeout_s=60)) for _ in range(num_clients)]
        await asyncio.gather(*(worker(clients[c % num_clients], f"soak{c % num_clients}")
                               for c in range(num_clients * concurrency)))
        await settle_vanished(clients[0], vanished, timeout_s=max(deadline - time.monotonic(), 5))
        await sampler.stop()
        report.duration_s = time.monotonic() - t0
        # everything expired (results fetched or abandoned): the service holds nothing any more
        await asyncio.sleep(svc.settings.result_ttl_s + 1.0)
        metrics = await clients[0].metrics()
        held = next((line for line in metrics.splitlines() if line.startswith("tetriserve_jobs_held ")), None)
        report.jobs_held_after = int(float(held.split()[-1])) if held else None
    all_outcomes = outcomes + vanished
    report.jobs_ended = sum(1 for o in all_outcomes if o.status is not None)
    report.finished = sum(1 for o in all_outcomes if o.status == "finished")
    report.cancelled_as_asked = sum(1 for o in all_outcomes if o.status in ("cancelled", "gone") and o.as_asked)
    report.not_as_asked = [f"#{o.spec.index} {o.action}: {o.status} {o.error or ''}".strip()
                           for o in all_outcomes if not o.as_asked]
    report.not_as_asked += [f"#{i}: never submitted (time limit)" for i in range(num_jobs)
                            if i not in {o.spec.index for o in all_outcomes}]
    if reference is not None:
        by_index = {o.spec.index: o for o in outcomes if o.latent is not None}
        for index, o in sorted(by_index.items()):
            if index % check_every == 0:
                err = rel_err(o.latent, await asyncio.to_thread(reference.latent, o.spec))
                report.checked_vs_direct += 1
                report.max_rel_err = max(report.max_rel_err, err)
            twin = by_index.get(index - 5) if index % 10 == 9 else None
            if twin is not None:
                report.determinism_pairs += 1
                report.determinism_max_rel_err = max(report.determinism_max_rel_err, rel_err(o.latent, twin.latent))
    early, late = sampler.plateau(0.2, 0.3, num_jobs), sampler.plateau(0.9, 1.0, num_jobs)
    mb = 1024 * 1024
    if early and late:
        report.rss_early_mb, report.rss_late_mb = early / mb, late / mb
        report.rss_growth = late / early - 1.0
    if sampler.samples:
        report.rss_max_mb = max(rss for *_, rss in sampler.samples) / mb
        for tenth in range(10):
            rss = sampler.plateau(tenth / 10, (tenth + 1) / 10, num_jobs)
            report.rss_profile_mb.append(None if rss is None else round(rss / mb, 1))
    return report


# ------------------------------------------------------------------------------ faults
@dataclass
class FaultReport:
    faults_injected: int = 0
    kills: list[dict] = field(default_factory=list)
    jobs_submitted: int = 0
    jobs_finished: int = 0
    jobs_lost: int = 0
    lost: list[str] = field(default_factory=list)
    jobs_requeued: int = 0
    resumed_from_steps: list[int] = field(default_factory=list)  # the checkpoint each requeued job resumed from
    checked_vs_direct: int = 0
    max_rel_err: float = 0.0
    pool_restarts: int = 0
    noticed_max_s: float = 0.0  # deaths (SIGKILL, SIGTERM): seen by the process sentinel
    hang_noticed_max_s: float = 0.0  # hangs (SIGSTOP): seen by the stall watchdog
    recovered_max_s: float = 0.0
    poison: dict | None = None
    duration_s: float = 0.0


async def executor_state(client: TetriServeClient) -> dict:
    return await client.executor()


async def wait_state(client: TetriServeClient, predicate, timeout_s: float) -> dict | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = await executor_state(client)
        if predicate(state):
            return state
        await asyncio.sleep(0.02)
    return None


async def kill_busy_worker(client: TetriServeClient, sig: int, prefer_gpus: tuple[int, ...] = (),
                           min_steps_done: int = 0) -> dict | None:
    """Kill a worker that runs an assignment now: one of ``prefer_gpus`` if given, else one under the
    running job with the most steps done (at least ``min_steps_done``). None if there is none."""
    state = await executor_state(client)
    if state["state"] != "ok":
        return None
    busy = set(state["busy_gpu_ids"])
    if prefer_gpus:
        candidates = [g for g in prefer_gpus if g in busy]
        job_id = None
    else:
        running = [j for j in await client.jobs() if j["status"] == "running" and j["gpu_ids"]
                   and j["steps_done"] >= min_steps_done and busy.issuperset(j["gpu_ids"])]
        running.sort(key=lambda j: j["steps_done"], reverse=True)
        candidates = running[0]["gpu_ids"][-1:] if running else []
        job_id = running[0]["job_id"] if running else None
    if not candidates:
        return None
    gpu = candidates[0]
    pid = state["workers"][gpu]["pid"]
    os.kill(pid, sig)
    return {"gpu_id": gpu, "pid": pid, "signal": signal.Signals(sig).name, "at": time.monotonic(), "job_id": job_id}


async def observe_recovery(client: TetriServeClient, kill: dict, timeout_s: float) -> None:
    """Fill in when the service noticed the kill and when every device was back."""
    noticed = await wait_state(client, lambda s: kill["gpu_id"] not in s["healthy_gpu_ids"] or s["state"] != "ok",
                               timeout_s)
    kill["noticed_s"] = time.monotonic() - kill["at"] if noticed else None
    back = await wait_state(client, lambda s: s["state"] == "ok" and len(s["healthy_gpu_ids"]) == len(s["gpu_ids"])
                            and all(w["alive"] for w in s.get("workers", [])), timeout_s)
    kill["recovered_s"] = time.monotonic() - kill["at"] if back else None


async def faults(svc: ServiceProcess, reference: Reference | None, models: dict[str, str], *, min_jobs: int,
                 num_kills: int, num_clients: int, concurrency: int, max_jobs: int, poison: bool,
                 timeout_s: float, seed: int = 0) -> FaultReport:
    report = FaultReport()
    rng = random.Random(seed)
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    outcomes: list[Outcome] = []
    next_index = 0
    kills_done = asyncio.Event()

    def more_jobs() -> bool:
        return next_index < max_jobs and time.monotonic() < deadline and (
            next_index < min_jobs or not kills_done.is_set())

    async def worker(client: TetriServeClient, tenant: str) -> None:
        nonlocal next_index
        while more_jobs():
            index = 100_000 + next_index
            next_index += 1
            spec = make_spec(index, models, steps=(8, 16), resolutions=(32, 48, 64))
            out = await run_job(client, spec, "fetch", tenant=tenant, timeout_s=max(deadline - time.monotonic(), 1),
                                keep_latent=True)
            outcomes.append(out)

    async def killer(client: TetriServeClient) -> None:
        try:
            while len(report.kills) < num_kills and time.monotonic() < deadline:
                await asyncio.sleep(rng.uniform(0.2, 0.6))  # between kills, rounds run on the whole pool
                kill = None
                while kill is None and time.monotonic() < deadline and more_jobs():
                    # under a job some rounds into its run (it has a checkpoint to resume from)
                    kill = await kill_busy_worker(client, KILL_SIGNALS[len(report.kills) % len(KILL_SIGNALS)],
                                                  min_steps_done=2)
                    if kill is None:
                        await asyncio.sleep(0.02)
                if kill is None:
                    return
                report.kills.append(kill)
                await observe_recovery(client, kill, max(deadline - time.monotonic(), 1))
        finally:
            kills_done.set()

    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(TetriServeClient(svc.url, timeout_s=60)) for _ in range(num_clients)]
        control = await stack.enter_async_context(TetriServeClient(svc.url, timeout_s=30))
        await asyncio.gather(killer(control), *(worker(clients[c % num_clients], f"fault{c % num_clients}")
                                                for c in range(num_clients * concurrency)))
        if poison:
            report.poison = await poison_drill(control, clients[0], models, deadline)
        final = await executor_state(control)
    report.duration_s = time.monotonic() - t0
    report.faults_injected = len(report.kills)
    report.pool_restarts = final["num_restarts"]
    report.jobs_submitted = len(outcomes)
    report.jobs_finished = sum(1 for o in outcomes if o.status == "finished")
    report.lost = [f"#{o.spec.index}: {o.status} {o.error or ''}".strip() for o in outcomes if o.status != "finished"]
    report.jobs_lost = len(report.lost)
    report.jobs_requeued = sum(o.num_requeued for o in outcomes)
    report.resumed_from_steps = sorted(step for o in outcomes for step in o.resumed_from)
    noticed = [(k["signal"], k["noticed_s"] if k["noticed_s"] is not None else float("inf")) for k in report.kills]
    report.noticed_max_s = max((t for sig, t in noticed if sig != "SIGSTOP"), default=0.0)
    report.hang_noticed_max_s = max((t for sig, t in noticed if sig == "SIGSTOP"), default=0.0)
    report.recovered_max_s = max((k["recovered_s"] or float("inf") for k in report.kills), default=0.0)
    if reference is not None:
        for o in outcomes:
            if o.latent is not None:
                err = rel_err(o.latent, await asyncio.to_thread(reference.latent, o.spec))
                report.checked_vs_direct += 1
                report.max_rel_err = max(report.max_rel_err, err)
                if err > REL_TOL:
                    report.lost.append(f"#{o.spec.index}: result differs from the direct run (rel err {err:.2e})")
    return report


async def poison_drill(control: TetriServeClient, client: TetriServeClient, models: dict[str, str],
                       deadline: float) -> dict:
    """A job that takes its worker down every time it runs must fail with the reason, and others finish."""
    spec = JobSpec(index=900_001, family="flux", model=models["flux"], res=64, steps=400, seed=7)
    receipt = await client.submit(spec.body(job_key="poison"), job_key="poison")
    job_id = receipt["job_id"]
    placed: list[dict] = []
    end: dict = {}

    async def follow() -> None:  # the job's own events: its end is seen as it happens
        try:
            end.update(await wait_job(client, job_id, lambda e: placed.append(e) if e["type"] == "placed" else None,
                                      max(deadline - time.monotonic(), 1)))
        except (JobFailed, JobCancelled) as exc:
            end.update(exc.status, error=str(exc))
        except (TetriServeError, asyncio.TimeoutError) as exc:
            end.update(status="unknown", error=f"{type(exc).__name__}: {exc}")

    follower = asyncio.ensure_future(follow())
    good = [asyncio.ensure_future(run_job(client, make_spec(900_100 + i, models, steps=(6, 10)), "fetch",
                                          tenant="bystander", timeout_s=max(deadline - time.monotonic(), 1)))
            for i in range(4)]
    kills, killed_placements = 0, 0
    while not follower.done() and time.monotonic() < deadline:
        if len(placed) > killed_placements:  # it is on devices again: take them down under it
            await asyncio.sleep(0.15)  # a few steps into the assignment
            kill = await kill_busy_worker(control, signal.SIGKILL, prefer_gpus=tuple(placed[-1]["gpu_ids"]))
            if kill is not None:
                killed_placements = len(placed)
                kills += 1
                await observe_recovery(control, kill, max(deadline - time.monotonic(), 1))
                continue
        await asyncio.sleep(0.01)
    await follower
    bystanders = await asyncio.gather(*good)
    error = end.get("error") or ""
    return {"kills": kills, "status": end.get("type") or end.get("status"), "error": error,
            "failed_with_reason": "times" in error and "--max-job-faults" in error,
            "bystanders_finished": sum(1 for o in bystanders if o.status == "finished"),
            "bystanders": len(bystanders)}


# ------------------------------------------------------------------------------ a killed service
@dataclass
class RestartReport:
    jobs_submitted: int = 0
    unfinished_at_kill: int = 0
    told_lost: int = 0  # clients that heard "lost in a restart" (ServiceRestarted with the journal's words)
    resubmitted: int = 0
    finished: int = 0
    silent: list[str] = field(default_factory=list)  # jobs whose client heard nothing clear
    lost_counted: int | None = None  # the new run's tetriserve_jobs_lost_in_restart_total
    down_s: float = 0.0
    duration_s: float = 0.0


async def restart_drill(svc: ServiceProcess, models: dict[str, str], *, num_jobs: int, timeout_s: float) -> RestartReport:
    """Kill the service (SIGKILL) with jobs in flight, start it again on the same port and journal:
    every client must hear that its job was lost, and its resubmit under the same key must finish."""
    from ..client import ServiceRestarted
    from ..errors import ServiceUnavailable

    report = RestartReport()
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    accepted: list[str] = []

    async def one(i: int) -> None:
        spec = make_spec(800_000 + i, models, steps=(300, 400), resolutions=(48, 64))
        key = f"restart-{i}-{uuid.uuid4().hex[:6]}"
        body = spec.body(job_key=key)
        async with TetriServeClient(svc.url, timeout_s=30, retries=2, backoff_s=0.2) as client:
            receipt = await submit_retrying(client, body, key)
            accepted.append(receipt["job_id"])
            report.jobs_submitted += 1
            job_id, resubmitted = receipt["job_id"], False
            while time.monotonic() < deadline:
                try:
                    await client.wait(job_id, timeout_s=max(deadline - time.monotonic(), 1))
                    report.finished += 1
                    report.resubmitted += resubmitted
                    return
                except ServiceRestarted as exc:
                    if "lost" in str(exc) and not resubmitted:
                        report.told_lost += 1
                        job_id, resubmitted = (await submit_retrying(client, body, key))["job_id"], True
                    else:
                        report.silent.append(f"{job_id}: {exc}")
                        return
                except ServiceUnavailable:
                    await asyncio.sleep(0.5)  # the service is away: ask again when it is back
                except (JobFailed, JobCancelled) as exc:
                    report.silent.append(f"{job_id}: {exc}")
                    return
            report.silent.append(f"{job_id}: no answer within the time limit")

    tasks = [asyncio.ensure_future(one(i)) for i in range(num_jobs)]
    async with TetriServeClient(svc.url, timeout_s=30) as control:
        while len(accepted) < num_jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # some steps run
        statuses = [await control.status(j) for j in accepted]
        report.unfinished_at_kill = sum(1 for s in statuses if s["status"] not in ("finished", "failed", "cancelled"))
    t_kill = time.monotonic()
    await asyncio.to_thread(svc.kill)
    await asyncio.to_thread(svc.start)
    report.down_s = time.monotonic() - t_kill
    await asyncio.gather(*tasks)
    async with TetriServeClient(svc.url) as control:
        metrics = await control.metrics()
    line = next((x for x in metrics.splitlines() if x.startswith("tetriserve_jobs_lost_in_restart_total ")), None)
    report.lost_counted = int(float(line.split()[-1])) if line else None
    report.duration_s = time.monotonic() - t0
    return report
