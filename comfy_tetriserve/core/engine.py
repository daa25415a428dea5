"""The round loop's state machine, shared by the simulator and the live service.

The engine holds every request's state and which GPUs are in flight; it knows no clock and runs
nothing itself. A driver (the simulator on a virtual clock, the service on the wall clock) calls:

    plan = engine.plan(now)            # view -> policy -> validate_plan, or None if nothing to do
    engine.apply_plan(plan, now, ...)  # assignments start: requests RUNNING, GPUs busy
    ... the executor runs them ...
    engine.apply_result(result, now)   # one assignment ended: steps counted, GPUs free

Planning is event driven: the driver asks for a plan whenever something changed (an arrival, an
assignment ending, a cancel, a GPU coming back) and GPUs are free. An assignment may span many
of those planning rounds (a fixed-degree baseline holds its GPUs from first to last step), and
GPUs in flight are simply not plannable. A policy that wants synchronous rounds returns an
empty plan until enough GPUs are free; the engine only insists that a plan is non-empty when
nothing at all is running (validate_plan), so it can never stall.

This module imports neither torch nor any I/O: the simulator needs neither.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ..cost import CostModel
from ..errors import Conflict, InvalidRequest, NotFound
from ..plan import aligned_groups, validate_plan
from .warmup import cold_warmup_s
from ..types import (
    Assignment,
    AssignmentResult,
    GenRequest,
    RequestSnapshot,
    RequestState,
    RequestStatus,
    RoundPlan,
    SchedulerView,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssignmentRecord:
    """One assignment as the board draws it (GPUs x time)."""

    round_index: int
    request_ids: tuple[str, ...]
    gpu_ids: tuple[int, ...]
    num_steps: int
    started_at: float
    expected_end_at: float
    finished_at: float | None = None
    steps_done: int | None = None
    error: str | None = None


@dataclass
class _InFlight:
    assignment: Assignment
    record_index: int  # position in Engine._records_seq, for updating the record at the end


class Engine:
    """Request states, GPU occupancy and the planning round counter.

    ``policy`` is any object with ``plan_round(view, cost) -> RoundPlan``; ``groups`` the
    placements the executor can run (default: aligned power-of-two blocks of ``gpu_ids``).
    ``warm_keys``: a callable returning the executor's warm keys (core/warmup.py), put in every
    view; predictions add the warm-up of an assignment whose key is cold on its group.
    """

    def __init__(
        self,
        policy,
        cost: CostModel,
        gpu_ids: Sequence[int],
        groups: Iterable[tuple[int, ...]] | None = None,
        *,
        record_limit: int = 10_000,
        timer: Callable[[], float] = time.perf_counter,
        warm_keys: Callable[[], frozenset] | None = None,
    ) -> None:
        if not gpu_ids:
            raise InvalidRequest("an engine needs at least one GPU")
        self.policy = policy
        self.cost = cost
        self.all_gpu_ids: tuple[int, ...] = tuple(sorted(gpu_ids))
        self.groups: tuple[tuple[int, ...], ...] = (
            tuple(tuple(sorted(g)) for g in groups) if groups is not None else aligned_groups(self.all_gpu_ids)
        )
        self._healthy: set[int] = set(self.all_gpu_ids)
        self._states: dict[str, RequestState] = {}
        self._open_ids: dict[str, None] = {}  # insertion-ordered set of unfinished requests
        self._busy: dict[int, tuple[str, ...]] = {}  # gpu -> request ids in flight on it
        self._inflight: dict[tuple[str, ...], _InFlight] = {}
        self._records: deque[AssignmentRecord] = deque(maxlen=record_limit)
        self._records_base = 0  # number of records dropped off the left of the deque
        self.round_index = 0
        self.decision_times_s: deque[float] = deque(maxlen=100_000)
        self._timer = timer
        self.warm_keys = warm_keys

    # ----------------------------------------------------------------- requests
    def submit(self, request: GenRequest) -> RequestState:
        if request.request_id in self._states:
            raise Conflict(f"request {request.request_id} exists already")
        state = RequestState(request=request)
        self._states[request.request_id] = state
        self._open_ids[request.request_id] = None
        return state

    def state(self, request_id: str) -> RequestState:
        try:
            return self._states[request_id]
        except KeyError:
            raise NotFound(f"unknown request {request_id}") from None

    def states(self) -> tuple[RequestState, ...]:
        return tuple(self._states.values())

    def open_states(self) -> tuple[RequestState, ...]:
        return tuple(self._states[i] for i in self._open_ids)

    def cancel(self, request_id: str, now: float) -> RequestState:
        """Cancel a request. Returns its new state.

        Not running: cancelled at once. Running: marked, and cancelled when its assignment
        returns (the driver may ask the executor to stop that assignment at its next step).
        Raises Conflict for a request that already ended.
        """
        st = self.state(request_id)
        if st.status.is_terminal:
            raise Conflict(f"request {request_id} already {st.status.value}")
        if st.status is RequestStatus.RUNNING:
            st = dataclasses.replace(st, cancel_requested=True)
            self._states[request_id] = st
            return st
        return self._close(st, RequestStatus.CANCELLED, now)

    def forget(self, request_id: str) -> None:
        """Drop an ended request's state (the service does this once results expire)."""
        st = self.state(request_id)
        if not st.status.is_terminal:
            raise Conflict(f"request {request_id} has not ended")
        del self._states[request_id]

    def _close(self, st: RequestState, status: RequestStatus, now: float, error: str | None = None) -> RequestState:
        st = dataclasses.replace(st, status=status, finished_at=now, busy_until_at=None, error=error)
        self._states[st.request_id] = st
        self._open_ids.pop(st.request_id, None)
        return st

    # --------------------------------------------------------------------- GPUs
    @property
    def healthy_gpu_ids(self) -> tuple[int, ...]:
        return tuple(g for g in self.all_gpu_ids if g in self._healthy)

    @property
    def busy_gpu_ids(self) -> frozenset[int]:
        return frozenset(self._busy)

    @property
    def free_gpu_ids(self) -> tuple[int, ...]:
        busy = self.busy_gpu_ids  # subclasses add devices that are loading models
        return tuple(g for g in self.healthy_gpu_ids if g not in busy)

    def set_gpu_health(self, gpu_id: int, healthy: bool) -> None:
        if gpu_id not in self.all_gpu_ids:
            raise NotFound(f"unknown GPU {gpu_id}")
        (self._healthy.add if healthy else self._healthy.discard)(gpu_id)

    def inflight(self) -> tuple[Assignment, ...]:
        return tuple(f.assignment for f in self._inflight.values())

    # ------------------------------------------------------------------ planning
    def view(self, now: float) -> SchedulerView:
        snaps = []
        in_flight = {rid: f.assignment.num_steps for f in self._inflight.values() for rid in f.assignment.request_ids}
        for rid in self._open_ids:
            st = self._states[rid]
            snaps.append(RequestSnapshot(
                request=st.request,
                steps_done=st.steps_done,
                gpu_ids=st.gpu_ids,
                running_until_at=st.busy_until_at if st.status is RequestStatus.RUNNING else None,
                steps_in_flight=in_flight.get(rid, 0),
            ))
        return SchedulerView(
            now=now,
            round_index=self.round_index,
            gpu_ids=self.healthy_gpu_ids,
            groups=self.groups,
            requests=tuple(snaps),
            busy_gpu_ids=frozenset(self._busy),
            warm=self.warm_keys() if self.warm_keys is not None else None,
        )

    def plan(self, now: float) -> RoundPlan | None:
        """Ask the policy for a plan if GPUs are free and some request can use them."""
        view = self.view(now)
        if not view.free_gpu_ids or not view.plannable:
            return None
        t0 = self._timer()
        plan = self.policy.plan_round(view, self.cost)
        self.decision_times_s.append(self._timer() - t0)
        validate_plan(view, plan, self.cost.allowed_degrees)
        return plan

    def apply_plan(self, plan: RoundPlan, now: float, expected_end_at: dict[tuple[str, ...], float] | None = None) -> None:
        """Start the plan's assignments at ``now``.

        ``expected_end_at`` (by request_ids) overrides the cost model's prediction of when
        each assignment ends; the planner sees it as ``running_until_at``.
        """
        if plan.is_empty:
            return
        if plan.round_index != self.round_index:
            raise Conflict(f"plan for round {plan.round_index}, engine at round {self.round_index}")
        for a in plan.assignments:
            if expected_end_at and a.request_ids in expected_end_at:
                end = expected_end_at[a.request_ids]
            else:
                end = now + self.predict_s(a)
            for rid in a.request_ids:
                st = self._states[rid]
                self._states[rid] = dataclasses.replace(
                    st,
                    status=RequestStatus.RUNNING,
                    gpu_ids=a.gpu_ids,
                    busy_until_at=end,
                    first_step_at=st.first_step_at if st.first_step_at is not None else now,
                )
            for g in a.gpu_ids:
                self._busy[g] = a.request_ids
            if len(self._records) == self._records.maxlen:
                self._records_base += 1  # the oldest record falls off the left
            self._records.append(AssignmentRecord(
                round_index=plan.round_index, request_ids=a.request_ids, gpu_ids=a.gpu_ids,
                num_steps=a.num_steps, started_at=now, expected_end_at=end,
            ))
            self._inflight[a.request_ids] = _InFlight(a, self._records_base + len(self._records) - 1)
        self.round_index += 1

    def predict_s(self, a: Assignment) -> float:
        """Cost-model time of an assignment (all members share the shape, so ask for the batch)."""
        st = self._states[a.request_ids[0]]
        r = st.request
        batch = r.batch * len(a.request_ids)
        run = a.num_steps * self.cost.step_time_s(r.model, r.height, r.width, batch, a.sp_degree)
        if self.warm_keys is not None:  # the first step at a cold key pays its capture
            run += cold_warmup_s(self.cost, self.warm_keys(), a.gpu_ids, r.model, r.height, r.width, batch)
        return run

    def apply_result(self, result: AssignmentResult, now: float) -> tuple[RequestState, ...]:
        """An assignment ended. Frees its GPUs and advances (or closes) its requests."""
        a = result.assignment
        flight = self._inflight.pop(a.request_ids, None)
        if flight is None or flight.assignment != a:
            raise Conflict(f"no assignment {a} in flight")
        for g in a.gpu_ids:
            self._busy.pop(g, None)
        self._update_record(flight.record_index, result)
        elapsed = max(result.finished_at - result.started_at, 0.0)
        gpu_s_each = elapsed * a.sp_degree / len(a.request_ids)
        out = []
        for rid in a.request_ids:
            st = self._states[rid]
            done = min(st.steps_done + result.steps_done, st.request.num_steps)
            st = dataclasses.replace(st, steps_done=done, gpu_seconds=st.gpu_seconds + gpu_s_each, busy_until_at=None)
            if result.error is not None:
                st = self._close(st, RequestStatus.FAILED, result.finished_at, result.error)
            elif st.cancel_requested:
                st = self._close(st, RequestStatus.CANCELLED, now)
            elif done >= st.request.num_steps:
                st = self._close(st, RequestStatus.FINISHED, result.finished_at)
            else:
                st = dataclasses.replace(st, status=RequestStatus.WAITING)
                self._states[rid] = st
            out.append(st)
        return tuple(out)

    def requeue(self, assignment: Assignment, steps_done: int, result_at: float,
                reason: str | None = None) -> tuple[RequestState, ...]:
        """An assignment was lost (its worker died): its requests keep ``steps_done`` steps and wait.

        ``reason`` is kept on the assignment's record (the board shows it). Returns the new states.
        """
        flight = self._inflight.get(assignment.request_ids)
        states = self.apply_result(AssignmentResult(assignment, result_at, result_at, steps_done), result_at)
        if reason is not None and flight is not None:
            pos = flight.record_index - self._records_base
            if 0 <= pos < len(self._records):
                self._records[pos] = dataclasses.replace(self._records[pos], error=reason)
        return states

    # ------------------------------------------------------------------- records
    def _update_record(self, index: int, result: AssignmentResult) -> None:
        pos = index - self._records_base
        if 0 <= pos < len(self._records):
            rec = self._records[pos]
            self._records[pos] = dataclasses.replace(
                rec, finished_at=result.finished_at, steps_done=result.steps_done, error=result.error
            )

    def records(self, since_at: float | None = None) -> tuple[AssignmentRecord, ...]:
        """Assignments for the board, oldest first; ``since_at`` keeps those still open or ended after it."""
        if since_at is None:
            return tuple(self._records)
        return tuple(r for r in self._records if r.finished_at is None or r.finished_at >= since_at)
