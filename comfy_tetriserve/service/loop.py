"""The engine loop: the service's background task that drives the round engine on the wall clock.

Event driven, as the engine wants: it plans whenever something changed (a job arrived, an
assignment ended, a job was cancelled) and devices are free, starts each assignment of the plan
as its own task on the executor, and applies the result when it returns. It is also the one
place that moves a job's API status and writes its events:

    queued -> placed (k GPUs) -> step i/n ... -> waiting | placed ... -> finished | failed | cancelled

Measured step times go to the cost model's ``observe`` (when it has one) and to the drift
metrics. A housekeeping task expires leases (cancelling their jobs) and forgets ended jobs once
their results expired. Shutdown ends every unfinished job with a ``failed`` event saying so
(none stays silently pending), stops the work in flight and closes the executor.

Device faults (recovery.py): an assignment that comes back ``lost`` (a worker died under it)
puts its jobs back in the queue with the steps of their last checkpoint and a ``requeued``
event saying why; a job that was on failing devices ``max_job_faults`` times fails instead,
with the reason. Every job accepted and ended is written to the job history (history.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from ..core.engine import Engine
from ..core.executor import DevicesUnavailable, Executor, MovingExecutor
from ..sampling.latents import process_latent_out
from ..errors import Conflict, ServiceUnavailable, TetriServeError
from ..types import Assignment, AssignmentResult, GenRequest, RequestSnapshot, RequestStatus
from .catalog import ModelCost
from .events import EventLog
from .jobs import Clock, Job, JobStatus, JobStore, Placement
from .metrics import ServiceMetrics
from .recovery import ExecutorRecovery, RecoveryState
from .schemas import encode_result
from .settings import ServiceConfig
from .wiring import ForecastFn, estimate_finish

log = logging.getLogger(__name__)

SAFETY_WAKE_S = 1.0  # plan at least this often even without events (policies waiting for time)
PREDICTION_REFRESH_S = 0.5  # re-forecast open jobs after assignments end, at most this often
#: The forecast replays every open job through the planner: about 3 ms with 8 open jobs, 30 ms with 64 and
#: 200 ms with 256 (h200 profile, tetriserve). It runs in the forecast thread, never on the event loop. A
#: submit waits for one (shared by every submit that arrives meanwhile) only while it costs less than this;
#: beyond, the receipt carries the simple estimate and a refresh follows shortly.
FORECAST_SYNC_BUDGET_S = 0.05
#: Refreshes (after assignments end, and the ones that follow submits) are spaced so that they take at most
#: this share of the event loop's time; submit-time forecasts, each under the budget above, come on top.
FORECAST_DUTY = 0.1


def result_body(job: Job, latent) -> bytes:
    """A finished job's result: its latent in the space asked for, as safetensors with the job's metadata."""
    space = job.settings.result_space or job.settings.latent_space
    if space == "vae":
        latent = process_latent_out(job.family, latent)
    meta = {"job_id": job.job_id, "model": job.request.model, "space": space,
            "simulated": "true" if job.simulated else "false", "num_steps": str(job.request.num_steps)}
    return encode_result(latent.detach().to("cpu").float(), meta)


class EngineLoop:
    def __init__(self, engine: Engine, executor: Executor, cost: ModelCost, store: JobStore,
                 metrics: ServiceMetrics, hub: EventLog, clock: Clock, config: ServiceConfig,
                 forecast: ForecastFn | None = None) -> None:
        self.engine = engine
        self.executor = executor
        self.cost = cost
        self.store = store
        self.metrics = metrics
        self.hub = hub
        self.clock = clock
        self.config = config
        self.forecast = forecast
        self.simulated = bool(getattr(executor, "simulated", False))
        self._moving = isinstance(executor, MovingExecutor)  # cluster mode: assignments may move jobs first
        self.accepting = False
        self._wake = asyncio.Event()
        self._flight: dict[tuple[str, ...], asyncio.Task] = {}
        self._finalizers: set[asyncio.Task] = set()
        self._tasks: list[asyncio.Task] = []
        self._forecast_failures = 0
        self._forecast_cost_s = 0.0  # what a forecast of every open job costs now (seconds, smoothed)
        self._forecast_done_at = float("-inf")  # time.monotonic() at the end of the last one
        self._refresh_handle: asyncio.TimerHandle | None = None
        # refreshes of every prediction run here, off the event loop (the loop takes the view, applies the answer)
        self._forecaster = ThreadPoolExecutor(1, thread_name_prefix="tetriserve-forecast")
        self._forecast_running = False
        self._forecast_again = False
        # submits waiting for their receipt's forecast: one forecast in the thread answers all that wait
        self._receipts: list[tuple[GenRequest, asyncio.Future]] = []
        self._receipt_running = False
        self._stopping = False
        self._closed = False
        self.recovery = ExecutorRecovery(executor, engine, config, clock, hub, self.wake, self._stop_inflight)
        self._progress_at: dict[tuple[str, ...], float] = {}  # in-flight assignment -> its last step (or start)
        self._stalled: set[tuple[str, ...]] = set()

    # ------------------------------------------------------------ life cycle
    async def start(self) -> None:
        await self.executor.start()
        self.accepting = True
        self._tasks = [asyncio.ensure_future(self._run()), asyncio.ensure_future(self._housekeeping())]

    def wake(self) -> None:
        self._wake.set()

    async def begin_shutdown(self) -> None:
        """Stop accepting, end every unfinished job (reported failed) and stop the work in flight."""
        if self._stopping:
            return
        self._stopping = True
        self.accepting = False
        now = self.clock.now()
        for job in self.store.open_jobs():
            with contextlib.suppress(TetriServeError):
                self.engine.cancel(job.job_id, now)
            self._end(job, JobStatus.FAILED, now, error="the service shut down before the job finished; submit it again",
                      code="service_stopped")
        with contextlib.suppress(Exception):
            await self._stop_inflight()
        self.hub.append({"type": "service_stopping"})
        self.hub.close()

    async def _stop_inflight(self) -> None:
        """Ask every running assignment to end after its current step."""
        inflight = tuple(rid for a in self.engine.inflight() for rid in a.request_ids)
        if inflight:
            await self.executor.stop(inflight)

    async def close(self) -> None:
        await self.begin_shutdown()
        pending = list(self._flight.values()) + list(self._finalizers)
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.config.shutdown_grace_s)
            for task in late:
                task.cancel()
        self._closed = True
        if self._refresh_handle is not None:
            self._refresh_handle.cancel()
        self._forecaster.shutdown(wait=False, cancel_futures=True)
        self.wake()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks + pending:
            with contextlib.suppress(BaseException):
                await task
        self._tasks = []
        await self.recovery.close()
        await self.executor.close()
        self.store.history.close()

    # -------------------------------------------------------------- admission
    def executor_fault(self) -> str | None:
        """Why the executor cannot run work any more, or None.

        An executor that recovers (the worker pool) only gets here when rebuilding it failed
        ``max_restart_attempts`` times in a row; one that does not, as soon as it reports itself
        broken. Such a service fails the jobs it holds with this reason and refuses new ones
        (503): nothing waits on devices that will not come back.
        """
        if self.recovery.supported:
            reason = self.recovery.broken_reason
            return f"{reason}; restart the service" if reason else None
        broken = getattr(self.executor, "broken", None)
        return f"the worker pool is broken ({broken}); restart the service" if broken else None

    async def admit(self, job: Job, sampling_job) -> Job:
        """Hand the job to the executor and the engine; the caller has validated everything."""
        if not self.accepting:
            raise ServiceUnavailable("the service is shutting down")
        fault = self.executor_fault()
        if fault:
            raise ServiceUnavailable(fault)
        predicted = None
        if self.forecast is not None and self._forecast_cost_s <= FORECAST_SYNC_BUDGET_S:
            predicted = await self._receipt_forecast(job.request)  # in the forecast thread; None if it failed
        await self.executor.admit(sampling_job)
        if not self.accepting:
            await self.executor.release(job.job_id)
            raise ServiceUnavailable("the service is shutting down")
        try:  # again, with no await until the job is stored: concurrent submits cannot all pass the limits
            self.store.check_capacity(job.tenant)
            self.store.add(job)  # before the engine has it: every request the engine plans has its job
        except TetriServeError:
            await self.executor.release(job.job_id)
            raise
        self.engine.submit(job.request)
        r = job.request
        self.store.history.accepted(job.job_id, job.tenant, job.settings.job_key, model=r.model, height=r.height,
                                    width=r.width, batch=r.batch, num_steps=r.num_steps, priority=r.priority,
                                    submitted_at=self.clock.to_wall(job.submitted_at),
                                    deadline_at=self.clock.to_wall(job.deadline_at))
        self.metrics.on_submit(job.tenant)
        if predicted is not None:  # forecast a moment ago, with the job as if it had arrived then
            job.predicted_finish_at = predicted
        elif self.forecast is None:
            job.predicted_finish_at = estimate_finish(self.engine.view(self.clock.now()), job.job_id, self.cost)
        else:  # too many open jobs to forecast on every submit (or it failed): estimate now, forecast soon
            job.predicted_finish_at = estimate_finish(self.engine.view(self.clock.now()), job.job_id, self.cost)
            self._schedule_refresh()
        self._emit(job, "queued", predicted_finish_at=self.clock.to_wall(job.predicted_finish_at),
                   deadline_at=self.clock.to_wall(job.deadline_at), feasible=job.feasible)
        self.wake()
        return job

    async def _receipt_forecast(self, request: GenRequest) -> float | None:
        """The forecast finish of a job about to be admitted (None if the forecast failed or did not cover it)."""
        future = asyncio.get_running_loop().create_future()
        self._receipts.append((request, future))
        if not self._receipt_running:
            self._start_receipt_forecast()
        return await future

    def _start_receipt_forecast(self) -> None:
        batch, self._receipts = self._receipts, []
        self._receipt_running = True
        view = self.engine.view(self.clock.now())
        known = {s.request_id for s in view.requests}
        view = dataclasses.replace(view, requests=view.requests + tuple(
            RequestSnapshot(request=r, steps_done=0) for r, _ in batch if r.request_id not in known))
        try:
            future = asyncio.get_running_loop().run_in_executor(self._forecaster, self._timed_forecast, view)
        except RuntimeError:  # the forecast thread is shut down (the service is closing): no forecast
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            self._receipt_forecast_done(future, batch)
            return
        future.add_done_callback(lambda f: self._receipt_forecast_done(f, batch))

    def _receipt_forecast_done(self, future, batch: list[tuple[GenRequest, asyncio.Future]]) -> None:
        self._receipt_running = False
        finish = self._take_forecast(future) or {}
        for request, waiter in batch:
            if not waiter.done():
                waiter.set_result(finish.get(request.request_id))
        if self._receipts and not self._closed:
            self._start_receipt_forecast()

    def _take_forecast(self, future) -> dict[str, float] | None:
        """A threaded forecast's answer applied to the open jobs (and its cost noted); None if it failed
        (logged) or was cancelled."""
        if future.cancelled():
            return None
        exc = future.exception()
        if exc is not None:
            self._forecast_failures += 1
            log.log(logging.ERROR if self._forecast_failures == 1 else logging.DEBUG,
                    "forecast failed (%d times); using the simple estimate", self._forecast_failures,
                    exc_info=exc if self._forecast_failures == 1 else None)
            return None
        finish, took = future.result()
        self._forecast_cost_s = took if self._forecast_cost_s == 0.0 else 0.5 * (self._forecast_cost_s + took)
        self._forecast_done_at = time.monotonic()
        for rid, at in finish.items():
            job = self.store.jobs.get(rid)
            if job is not None and not job.status.is_terminal:
                job.predicted_finish_at = at
        return finish

    def _refresh_interval_s(self) -> float:
        return max(PREDICTION_REFRESH_S, self._forecast_cost_s / FORECAST_DUTY)

    def _schedule_refresh(self) -> None:
        """A refresh of every prediction as soon as the forecast's share of the loop allows."""
        if self._refresh_handle is not None or self._closed:
            return
        delay = max(0.0, self._forecast_done_at + self._refresh_interval_s() - time.monotonic())
        self._refresh_handle = asyncio.get_running_loop().call_later(delay, self._scheduled_refresh)

    def _scheduled_refresh(self) -> None:
        self._refresh_handle = None
        if self._closed or not self.store.open_jobs():
            return
        if time.monotonic() - self._forecast_done_at < self._refresh_interval_s():
            self._schedule_refresh()  # one ran meanwhile (an assignment ended): keep them spaced
        else:
            self._refresh_predictions()

    def _refresh_predictions(self) -> None:
        """Refresh every open job's predicted finish: the forecast in the forecast thread (the predictions
        change when it answers), or the simple estimate where there is no forecast."""
        if self.forecast is not None:
            self._start_background_forecast()
            return
        view = self.engine.view(self.clock.now())
        for job in self.store.open_jobs():
            job.predicted_finish_at = estimate_finish(view, job.job_id, self.cost)
        self._forecast_done_at = time.monotonic()

    def _start_background_forecast(self) -> None:
        if self._forecast_running:  # one at a time; another follows when this one answers
            self._forecast_again = True
            return
        self._forecast_running = True
        view = self.engine.view(self.clock.now())  # an immutable snapshot: the thread reads nothing else of the engine
        future = asyncio.get_running_loop().run_in_executor(self._forecaster, self._timed_forecast, view)
        future.add_done_callback(self._background_forecast_done)

    def _timed_forecast(self, view) -> tuple[dict[str, float], float]:
        t0 = time.perf_counter()
        finish = self.forecast(view, self.engine.policy, self.cost)
        return finish, time.perf_counter() - t0

    def _background_forecast_done(self, future) -> None:
        self._forecast_running = False
        if self._closed or future.cancelled():
            return
        if self._take_forecast(future) is None:  # failed: the simple estimate for every open job
            view = self.engine.view(self.clock.now())
            for job in self.store.open_jobs():
                job.predicted_finish_at = estimate_finish(view, job.job_id, self.cost)
        self._forecast_done_at = time.monotonic()
        if self._forecast_again:
            self._forecast_again = False
            self._schedule_refresh()

    # ------------------------------------------------------------------ cancel
    async def cancel(self, job: Job, reason: str) -> Job:
        if job.status.is_terminal:
            raise Conflict(f"job {job.job_id} already {job.status.value}")
        if job.cancel_reason is not None:
            raise Conflict(f"job {job.job_id} is being cancelled already")
        now = self.clock.now()
        state = self.engine.cancel(job.job_id, now)  # Conflict if it has just finished
        job.cancel_reason = reason
        if state.status is RequestStatus.CANCELLED:
            self._end(job, JobStatus.CANCELLED, now)
            await self.executor.release(job.job_id)
        else:  # in flight: the executor stops it after the current step; the result ends the job
            for a in self.engine.inflight():
                if job.job_id in a.request_ids:
                    await self.executor.stop(a.request_ids)
            self._emit(job, "cancelling", reason=reason)
        self.wake()
        return job

    # -------------------------------------------------------------------- loop
    async def _run(self) -> None:
        # A flag, not only task.cancel(): on Python 3.11 wait_for can swallow a cancel that
        # coincides with the event it waits for, and the loop must end all the same.
        while not self._closed:
            self._wake.clear()
            if self.accepting:
                try:
                    self._plan_once()
                except Exception:  # noqa: BLE001 - the loop must survive anything a round throws
                    log.exception("round failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), SAFETY_WAKE_S)

    def _plan_once(self) -> None:
        now = self.clock.now()
        fault = self.executor_fault()
        if fault:
            self._fail_plannable(now, fault)
            return
        if not self.recovery.tick(now):  # draining or rebuilding the pool: jobs wait
            return
        t0 = time.perf_counter()
        try:
            plan = self.engine.plan(now)
        except TetriServeError as exc:
            if self.recovery.state is RecoveryState.DEGRADED:  # what is left cannot serve: rebuild now
                self.recovery.request_rebuild(f"the policy cannot place the waiting jobs on the "
                                              f"{len(self.engine.healthy_gpu_ids)} healthy devices ({exc})")
                self.wake()
                return
            if self.recovery.lift_quarantine(f"the policy cannot place the waiting jobs without them ({exc})"):
                self.wake()
                return
            # PlanError: a policy bug; fail what it could not plan, loudly
            self.metrics.plan_errors_total += 1
            log.error("policy produced an invalid plan: %s", exc)
            self._fail_plannable(now, f"scheduler error: {exc}")
            return
        if plan is None:
            return
        self.metrics.on_decision(time.perf_counter() - t0)
        if plan.is_empty:
            if not self.engine.inflight() and self.recovery.lift_quarantine(
                    "the policy places none of the waiting jobs on the devices left"):
                self.wake()  # nothing runs and nothing was placed: without them the jobs would wait forever
            return
        move_s = self._move_s(plan)
        self.engine.apply_plan(plan, now, {a.request_ids: now + self.engine.predict_s(a) + s
                                           for a, s in zip(plan.assignments, move_s) if s > 0})
        for load in plan.loads:  # planned model loads (core/live_placement.py): devices busy until they end
            self._background(self._run_load(load))
        for a, s in zip(plan.assignments, move_s):
            moved = {"move_s": s} if s > 0 else {}
            for rid in a.request_ids:
                job = self.store.jobs[rid]
                job.gpu_ids = a.gpu_ids
                job.first_step_at = job.first_step_at or now
                self._emit(job, "placed", gpu_ids=list(a.gpu_ids), sp_degree=a.sp_degree, num_steps=a.num_steps,
                           round=plan.round_index, steps_done=job.steps_done, **moved)
            self._flight[a.request_ids] = asyncio.ensure_future(self._run_assignment(a))

    async def _run_load(self, load) -> None:
        error, lasting = None, False
        try:
            await self.executor.ensure_resident(load.model, load.gpu_ids)
        except Exception as exc:  # noqa: BLE001 - a failed load frees its devices; jobs needing it fail there
            error = str(exc) or type(exc).__name__
            # memory held by work in flight passes: re-planned; a file that cannot load does not
            lasting = not isinstance(exc, Conflict) or bool(getattr(exc, "permanent", False))
            log.warning("planned load of %s on %s failed: %s", load.model, list(load.gpu_ids), error)
        now = self.clock.now()
        self.engine.finish_load(load, now, error)
        self.hub.append({"type": "model_resident" if error is None else "model_load_failed", "model": load.model,
                         "gpu_ids": list(load.gpu_ids), **({"error": error} if error else {})})
        if lasting:  # the jobs that need this model fail with the reason; others go on
            self._fail_plannable(now, f"loading model {load.model!r} failed: {error}", model=load.model)
        self.wake()

    def _fail_plannable(self, now: float, error: str, model: str | None = None) -> None:
        """End every job that waits for devices with ``error`` (jobs in flight end with their assignment);
        with ``model``, only the jobs of that model."""
        for snap in self.engine.view(now).plannable:
            if model is not None and snap.request.model != model:
                continue
            job = self.store.jobs.get(snap.request_id)
            with contextlib.suppress(TetriServeError):
                self.engine.cancel(snap.request_id, now)
            if job is not None:
                self._end(job, JobStatus.FAILED, now, error=error)
                self._background(self._release(snap.request_id))

    def _move_s(self, plan) -> list[float]:
        """Per assignment, the priced time of moving its requests to another box first (cluster mode;
        0 elsewhere): the engine's expected end includes it, as in the cluster simulation."""
        if not self._moving:
            return [0.0] * len(plan.assignments)
        return [self.executor.move_s(a) for a in plan.assignments]

    async def _run_assignment(self, a: Assignment) -> None:
        first = self.engine.state(a.request_ids[0]).request
        batch = first.batch * len(a.request_ids)
        predicted_step_s = self.cost.step_time_s(first.model, first.height, first.width, batch, a.sp_degree)
        started_at = self.clock.now()
        start_steps = self.engine.state(a.request_ids[0]).steps_done
        counted = True  # the fault counts against the jobs (they were on the devices)
        self._progress_at[a.request_ids] = started_at
        try:
            result = await self.executor.execute(a, self._on_step)
        except DevicesUnavailable as exc:  # planned on a device that failed a moment ago: nothing ran
            counted = False
            result = AssignmentResult(a, started_at, self.clock.now(), 0, error=str(exc), lost=True)
        except Exception as exc:  # noqa: BLE001 - an executor that raises still must not hang the job
            log.exception("executor failed on %s", a)
            done = max(self.store.jobs[a.request_ids[0]].steps_done - start_steps, 0) if a.request_ids[0] in self.store.jobs else 0
            result = AssignmentResult(a, started_at, self.clock.now(), min(done, a.num_steps),
                                      error=f"executor error: {type(exc).__name__}: {exc}")
        finally:
            self._flight.pop(a.request_ids, None)
            self._progress_at.pop(a.request_ids, None)
            self._stalled.discard(a.request_ids)
        if result.lost:
            self._requeue(a, result, counted)
        else:
            self._apply(a, result, predicted_step_s, first)
        self.wake()

    def _on_step(self, request_id: str, step_index: int, step_s: float) -> None:
        job = self.store.jobs.get(request_id)
        if job is None or job.status.is_terminal:
            return
        for ids in self._progress_at:
            if request_id in ids:
                self._progress_at[ids] = self.clock.now()
        job.steps_done = step_index
        self._emit(job, "step", step=step_index, num_steps=job.request.num_steps, step_s=step_s)

    def _apply(self, a: Assignment, result: AssignmentResult, predicted_step_s: float, first) -> None:
        now = self.clock.now()
        states = self.engine.apply_result(result, now)
        self.metrics.on_assignment_end(a.gpu_ids, result.elapsed_s, result.steps_done)
        self._account(a, result, now)
        observe = getattr(self.cost, "observe", None)
        batch = first.batch * len(a.request_ids)
        for measured in result.step_times_s:
            self.metrics.on_step_time(first.model, a.sp_degree, measured, predicted_step_s)
            if observe is not None and result.error is None:
                observe(first.model, first.height, first.width, batch, a.sp_degree, measured)
        for state in states:
            job = self.store.jobs.get(state.request_id)
            if job is None or job.status.is_terminal:
                continue
            job.steps_done = state.steps_done
            if state.status is RequestStatus.FINISHED:
                self._finish_later(job, state.finished_at)
            elif state.status is RequestStatus.FAILED:
                self._end(job, JobStatus.FAILED, now, error=state.error)
                self._background(self._release(job.job_id))
            elif state.status is RequestStatus.CANCELLED:
                self._end(job, JobStatus.CANCELLED, now)
                self._background(self._release(job.job_id))
            else:
                job.status = JobStatus.WAITING
                self._emit(job, "waiting", steps_done=state.steps_done)
        # Predictions made at submit go stale as rounds run; refresh them (throttled) so the board,
        # job status and the nodes' phase text show what the planner now expects.
        if self.store.open_jobs() and time.monotonic() - self._forecast_done_at >= self._refresh_interval_s():
            self._refresh_predictions()

    def _account(self, a: Assignment, result: AssignmentResult, now: float) -> None:
        """Device-seconds (shared equally among the assignment's jobs) and each job's placement history."""
        share_s = result.elapsed_s * len(a.gpu_ids) / max(len(a.request_ids), 1)
        for request_id in a.request_ids:
            job = self.store.jobs.get(request_id)
            if job is None:
                continue
            job.gpu_s += share_s
            job.placements.append(Placement(tuple(a.gpu_ids), now - result.elapsed_s, now, result.steps_done,
                                            result.lost))
            self.metrics.on_gpu_seconds(job.tenant, share_s)

    def _requeue(self, a: Assignment, result: AssignmentResult, counted: bool) -> None:
        """A lost assignment: its jobs resume from their checkpoint, or fail after too many faults."""
        now = self.clock.now()
        states = self.engine.requeue(a, result.steps_done, now, reason=result.error)
        self.metrics.on_assignment_end(a.gpu_ids, result.elapsed_s, result.steps_done)
        self._account(a, result, now)
        limit = self.config.max_job_faults
        for state in states:
            job = self.store.jobs.get(state.request_id)
            if job is None or job.status.is_terminal:
                continue
            steps_lost = max(job.steps_done - state.steps_done, 0)
            job.steps_done = state.steps_done
            if counted:
                job.num_faults += 1
                job.last_fault = result.error
            if state.status is RequestStatus.FINISHED:
                self._finish_later(job, state.finished_at if state.finished_at is not None else now)
            elif state.status is RequestStatus.CANCELLED:
                self._end(job, JobStatus.CANCELLED, now)
                self._background(self._release(job.job_id))
            elif job.num_faults >= limit:
                with contextlib.suppress(TetriServeError):
                    self.engine.cancel(job.job_id, now)
                self._end(job, JobStatus.FAILED, now, error=(
                    f"the job was on the devices when they failed {job.num_faults} times (last: {result.error}); "
                    f"it is not tried again (a job that keeps taking workers down must not take the service "
                    f"with it; limit --max-job-faults {limit})"))
                self._background(self._release(job.job_id))
            else:
                job.status = JobStatus.WAITING
                self.metrics.jobs_requeued_total += 1
                self._emit(job, "requeued", reason=result.error, steps_done=state.steps_done, steps_lost=steps_lost,
                           num_faults=job.num_faults, max_faults=limit,
                           message=f"resumes from step {state.steps_done} after a device fault")
                self._emit(job, "waiting", steps_done=state.steps_done)

    def _finish_later(self, job: Job, finished_at: float) -> None:
        self._background(self._finalize(job, finished_at))

    def _background(self, coro) -> None:
        """Run ``coro`` as a task that ``close`` waits for (a reference is kept until it ends)."""
        task = asyncio.ensure_future(coro)
        self._finalizers.add(task)
        task.add_done_callback(self._finalizers.discard)

    async def _finalize(self, job: Job, finished_at: float) -> None:
        """Collect a finished job's latent, turn it into the result body, end the job."""
        try:
            latent = await self.executor.fetch_result(job.job_id)

            body = await asyncio.to_thread(result_body, job, latent)  # a few ms for a large latent: off the loop
        except Exception as exc:  # noqa: BLE001
            log.exception("collecting the result of %s failed", job.job_id)
            if not job.status.is_terminal:
                self._end(job, JobStatus.FAILED, self.clock.now(), error=f"collecting the result failed: {exc}")
        else:
            if not job.status.is_terminal:
                job.result = body
                self._end(job, JobStatus.FINISHED, finished_at)
        finally:
            await self._release(job.job_id)

    async def _release(self, job_id: str) -> None:
        try:
            await self.executor.release(job_id)
        except Exception:  # noqa: BLE001
            log.warning("releasing %s on the executor failed", job_id, exc_info=True)

    # ------------------------------------------------------------ housekeeping
    async def _housekeeping(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.config.housekeeping_s)
            try:
                await self.expire(self.clock.now())
            except Exception:  # noqa: BLE001
                log.exception("housekeeping (expiry) failed")
            try:  # on its own: a failing expiry must not switch the stall watchdog off
                self.check_stalls(self.clock.now())
            except Exception:  # noqa: BLE001
                log.exception("housekeeping (stall watchdog) failed")

    def check_stalls(self, now: float) -> None:
        """Kill the workers of an assignment that completed no step for ``stall_timeout_s`` (a hang:
        a process that is alive but stuck, which no sentinel reports); its jobs then resume elsewhere."""
        limit = self.config.stall_timeout_s
        kill = getattr(self.executor, "kill_workers", None)
        if not limit or kill is None:
            return
        for a in self.engine.inflight():
            since = self._progress_at.get(a.request_ids)
            if since is None or a.request_ids in self._stalled or now - since < limit:
                continue
            self._stalled.add(a.request_ids)
            reason = f"the assignment on devices {list(a.gpu_ids)} completed no step for {now - since:.0f} s (hung)"
            log.error("%s; killing its workers", reason)
            self.hub.append({"type": "executor_stalled", "gpu_ids": list(a.gpu_ids), "job_ids": list(a.request_ids),
                             "error": reason})
            kill(a.gpu_ids, reason)

    async def expire(self, now: float) -> None:
        for lease in self.store.expired_leases(now):
            self.store.drop_lease(lease.lease_id)
            self.hub.append({"type": "lease_expired", "lease": lease.lease_id, "tenant": lease.tenant})
            for job_id in sorted(lease.job_ids):
                job = self.store.jobs.get(job_id)
                if job is not None and not job.status.is_terminal and job.cancel_reason is None:
                    with contextlib.suppress(Conflict):
                        await self.cancel(job, "lease expired")
        for job_id, reason in self.store.expired_jobs(now):
            with contextlib.suppress(TetriServeError):
                self.engine.forget(job_id)
            self.store.forget(job_id, reason)

    # ------------------------------------------------------------------ events
    def _end(self, job: Job, status: JobStatus, at: float, error: str | None = None, code: str | None = None) -> None:
        """End a job; ``code`` (failed only) tells clients why in a word: ``service_stopped`` (submit again)."""
        if job.status.is_terminal:
            return
        job.status = status
        job.ended_at = at
        job.error = error
        job.error_code = code
        fields: dict = {"ended_at": self.clock.to_wall(at), "steps_done": job.steps_done}
        if status is JobStatus.FINISHED:
            fields["met_deadline"] = job.met_deadline
        elif status is JobStatus.FAILED:
            fields["error"] = error
            if code is not None:
                fields["code"] = code
        else:
            fields["reason"] = job.cancel_reason
        self._emit(job, status.value, **fields)
        self.metrics.on_job_end(job.tenant, status.value, job.deadline_at is not None, job.met_deadline)
        if status is JobStatus.FINISHED:
            r = job.request
            self.metrics.on_job_finished(r.model, r.height, r.width, at - job.submitted_at,
                                         None if job.deadline_at is None else job.deadline_at - at)
        wall = self.clock.to_wall
        self.store.history.ended(
            job.job_id, status.value, error, code, ended_at=wall(at), met_deadline=job.met_deadline,
            steps_done=job.steps_done, gpu_s=job.gpu_s,
            placements=[(list(p.gpu_ids), wall(p.started_at), wall(p.ended_at), p.steps_done, p.lost)
                        for p in job.placements])

    def _emit(self, job: Job, event_type: str, **fields) -> None:
        if event_type == "placed":
            job.status = JobStatus.RUNNING
        event = job.events.append({"type": event_type, "job_id": job.job_id, **fields})
        if event_type != "step":
            self.hub.append({**{k: v for k, v in event.items() if k != "seq"}, "tenant": job.tenant})
        if event_type in ("finished", "failed", "cancelled"):
            job.events.close()
