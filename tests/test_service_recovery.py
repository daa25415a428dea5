"""Device faults at the service, on the simulated executor: degrade at once, resume from the checkpoint,
rebuild at a quiet moment, fail a poison job, give up (503) when the pool cannot come back.

The same logic runs on real worker processes in test_service_workers.py and test_reliability.py.
"""
from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from comfy_tetriserve.client import JobFailed, TetriServeClient
from comfy_tetriserve.core.executor import WorkerFault
from comfy_tetriserve.core.sim_executor import SimulatedExecutor
from comfy_tetriserve.service.app import create_app
from comfy_tetriserve.service.state import SERVICE
from comfy_tetriserve.types import Assignment, RoundPlan
from factories import PowerLawCost
from service_helpers import FifoPolicy, job_body, make_config, running_service

#: 512 px steps of 10 ms at degree 1
COST = PowerLawCost(base_s=0.04)


def make_app(num_gpus: int = 4, *, policy=None, restart_delay_s: float = 0.2, **config):
    executor = SimulatedExecutor(num_gpus, COST, restart_delay_s=restart_delay_s)
    app = create_app(make_config(devices=f"sim:{num_gpus}", **config), executor=executor,
                     policy=policy or FifoPolicy(round_steps=5), cost=COST)
    return app, executor


async def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition"):
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


def test_a_dead_device_is_taken_out_at_once_and_its_job_resumes_from_its_checkpoint():
    async def body():
        app, executor = make_app(rebuild_after_s=60.0)
        svc = app[SERVICE]
        async with running_service(app) as url, TetriServeClient(url) as client:
            # four jobs of 60 steps in rounds of 5 (50 ms each): all four devices busy
            jobs = [await client.submit(job_body({"steps": 60, "seed": i}, res=512)) for i in range(4)]
            events = {j["job_id"]: [] for j in jobs}
            waiters = [asyncio.ensure_future(client.wait(j["job_id"], on_event=events[j["job_id"]].append))
                       for j in jobs]
            victim = svc.store.jobs[jobs[2]["job_id"]]
            # mid-round: some steps past its last completed round (rounds of 5)
            await wait_for(lambda: len(svc.engine.busy_gpu_ids) == 4 and victim.status.value == "running"
                           and victim.steps_done >= 7 and victim.steps_done % 5 in (2, 3), what="steps")
            steps_before = svc.engine.state(victim.job_id).steps_done  # its last completed round
            gpu = victim.gpu_ids[0]
            executor.fail_device(gpu, f"worker {gpu} (sim) died (killed by SIGKILL)")
            # the planner sees three devices at once (before any await)
            assert svc.engine.healthy_gpu_ids == tuple(g for g in range(4) if g != gpu)
            assert (await client.health())["executor_state"] == "degraded"
            statuses = await asyncio.gather(*waiters)
            return jobs, events, statuses, victim.job_id, steps_before

    jobs, events, statuses, victim, steps_before = asyncio.run(body())
    assert all(s["status"] == "finished" and s["steps_done"] == 60 for s in statuses)
    requeued = [e for e in events[victim] if e["type"] == "requeued"]
    assert len(requeued) == 1 and "killed by SIGKILL" in requeued[0]["reason"]
    assert requeued[0]["steps_done"] == steps_before and requeued[0]["steps_lost"] >= 1
    assert requeued[0]["num_faults"] == 1 and "resumes from step" in requeued[0]["message"]
    after = events[victim][events[victim].index(requeued[0]):]
    assert [e["type"] for e in after[:2]] == ["requeued", "waiting"]
    placed_after = [e for e in after if e["type"] == "placed"]
    assert placed_after and placed_after[0]["steps_done"] == steps_before
    status = next(s for s in statuses if s["job_id"] == victim)
    assert status["num_faults"] == 1 and "SIGKILL" in status["last_fault"]
    # the other jobs never noticed
    assert all(not [e for e in events[j["job_id"]] if e["type"] == "requeued"] for j in jobs if j["job_id"] != victim)


def test_a_job_in_one_long_assignment_resumes_from_its_latest_checkpoint_inside_it():
    """The executor checkpoints inside an assignment every checkpoint_every_s: a fault loses only the steps since."""
    async def body():
        app, executor = make_app(num_gpus=2, policy=FifoPolicy(round_steps=100), rebuild_after_s=60.0)
        executor.checkpoint_every_s = 0.05  # 5 steps of 10 ms
        svc = app[SERVICE]
        async with running_service(app) as url, TetriServeClient(url) as client:
            job = await client.submit(job_body({"steps": 100, "seed": 1}, res=512))
            events = []
            waiter = asyncio.ensure_future(client.wait(job["job_id"], on_event=events.append))
            victim = svc.store.jobs[job["job_id"]]
            await wait_for(lambda: victim.steps_done >= 30, what="steps")
            at_fault = victim.steps_done
            gpu = victim.gpu_ids[0]
            executor.fail_device(gpu, f"worker {gpu} (sim) died (killed by SIGKILL)")
            status = await waiter
            return events, status, at_fault

    events, status, at_fault = asyncio.run(body())
    assert status["status"] == "finished" and status["steps_done"] == 100
    (requeued,) = [e for e in events if e["type"] == "requeued"]
    # one assignment held all 100 steps: without the checkpoints inside it the job would restart at step 0
    assert [e["num_steps"] for e in events if e["type"] == "placed"][0] == 100
    assert 20 <= requeued["steps_done"] <= at_fault + 2 and requeued["steps_lost"] <= 10, requeued


def test_the_pool_is_rebuilt_when_nothing_runs_and_serves_on_every_device_again():
    async def body():
        app, executor = make_app(rebuild_after_s=60.0)
        svc = app[SERVICE]
        hub_types = []
        async with running_service(app) as url, TetriServeClient(url) as client:
            job = await client.submit(job_body({"steps": 40}, res=512))
            await wait_for(lambda: svc.engine.busy_gpu_ids, what="placement")
            gpu = svc.store.jobs[job["job_id"]].gpu_ids[0]
            executor.fail_device(gpu)
            # nothing else runs: a quiet moment, so the pool is rebuilt at once
            await wait_for(lambda: executor.num_restarts == 1, what="restart")
            assert (await client.wait(job["job_id"]))["status"] == "finished"
            async with aiohttp.ClientSession() as s, s.get(url + "/v1/executor") as resp:
                executor_json = await resp.json()
            hub_types = [e["type"] for e in svc.hub.after(0)]
            # every device is planned again
            more = [await client.submit(job_body({"steps": 30, "seed": i}, res=512)) for i in range(4)]
            await wait_for(lambda: len(svc.engine.busy_gpu_ids) == 4, what="four devices busy")
            for j in more:
                await client.wait(j["job_id"])
            metrics = await client.metrics()
        return executor_json, hub_types, metrics

    executor_json, hub_types, metrics = asyncio.run(body())
    assert executor_json["state"] == "ok" and executor_json["num_restarts"] == 1 and executor_json["num_faults"] == 1
    assert executor_json["healthy_gpu_ids"] == [0, 1, 2, 3] and executor_json["last_restart_s"] >= 0.2
    order = [t for t in hub_types if t.startswith("executor_")]
    assert order == ["executor_fault", "executor_draining", "executor_restarting", "executor_restarted"], order
    assert "tetriserve_pool_restarts_total 1" in metrics and "tetriserve_worker_faults_total 1" in metrics
    assert 'tetriserve_executor_state{state="ok"} 1' in metrics and "tetriserve_jobs_requeued_total 1" in metrics


def test_under_load_the_rebuild_waits_for_rebuild_after_s_then_drains_without_losing_steps():
    async def body():
        # each job in one long assignment (120 steps of 10 ms): no quiet moment comes before rebuild_after_s
        # (with short rounds that all end together, a busy machine can see one and rebuild at once, as it should)
        app, executor = make_app(rebuild_after_s=0.3, policy=FifoPolicy())
        svc = app[SERVICE]
        async with running_service(app) as url, TetriServeClient(url) as client:
            jobs = [await client.submit(job_body({"steps": 120, "seed": i}, res=512)) for i in range(6)]
            await wait_for(lambda: len(svc.engine.busy_gpu_ids) == 4, what="busy")
            executor.fail_device(0)
            t0 = time.monotonic()
            await wait_for(lambda: svc.loop.recovery.state.value == "draining", what="draining")
            drained_after = time.monotonic() - t0
            steps_at_drain = {j["job_id"]: svc.store.jobs[j["job_id"]].steps_done for j in jobs}
            await wait_for(lambda: executor.num_restarts == 1, what="restart")
            statuses = [await client.wait(j["job_id"]) for j in jobs]
            events = {j["job_id"]: [e for e in svc.store.jobs[j["job_id"]].events.after(0)] for j in jobs}
        return drained_after, statuses, events, steps_at_drain

    drained_after, statuses, events, _ = asyncio.run(body())
    assert 0.25 <= drained_after < 2.0, drained_after  # degraded first: the three others kept serving
    assert all(s["status"] == "finished" for s in statuses)
    requeued = [e for evs in events.values() for e in evs if e["type"] == "requeued"]
    assert len(requeued) == 1  # only the job on the dead device lost anything; draining stopped the rest cleanly


def test_a_poison_job_fails_after_max_job_faults_and_the_others_finish():
    async def body():
        app, executor = make_app(max_job_faults=2, rebuild_after_s=0.0)
        svc = app[SERVICE]
        async with running_service(app) as url, TetriServeClient(url) as client:
            poison = await client.submit(job_body({"steps": 200}, res=512))
            good = [await client.submit(job_body({"steps": 20, "seed": i}, res=512)) for i in range(1, 6)]
            kills = 0

            async def killer():  # every time the poison job is on a device, that device dies
                nonlocal kills
                while not svc.store.jobs[poison["job_id"]].status.is_terminal:
                    job = svc.store.jobs[poison["job_id"]]
                    if job.status.value == "running" and job.gpu_ids and svc.loop.recovery.state.value == "ok":
                        await asyncio.sleep(0.03)
                        if job.status.value == "running":
                            executor.fail_device(job.gpu_ids[0], "worker died (segfault in a kernel)")
                            kills += 1
                    await asyncio.sleep(0.005)

            kill_task = asyncio.ensure_future(killer())
            with pytest.raises(JobFailed) as failed:
                await asyncio.wait_for(client.wait(poison["job_id"]), 20)
            await kill_task
            statuses = [await client.wait(j["job_id"]) for j in good]
            health = await client.health()
        return failed.value, kills, statuses, health

    failed, kills, statuses, health = asyncio.run(body())
    assert kills == 2
    assert "failed 2 times" in str(failed) and "segfault" in str(failed) and "max-job-faults 2" in str(failed)
    assert all(s["status"] == "finished" for s in statuses)
    assert health["executor_state"] == "ok"


def test_a_pool_that_cannot_be_rebuilt_fails_waiting_jobs_with_the_reason_and_refuses_new_ones():
    async def body():
        app, executor = make_app(num_gpus=2, max_restart_attempts=2, rebuild_after_s=0.0, restart_delay_s=0.01)
        svc = app[SERVICE]
        executor.fail_restarts = 5
        from comfy_tetriserve.service import recovery
        recovery.RESTART_BACKOFF_S, saved = (0.05,), recovery.RESTART_BACKOFF_S
        try:
            async with running_service(app) as url, TetriServeClient(url) as client:
                job = await client.submit(job_body({"steps": 100}, res=512))
                await wait_for(lambda: svc.engine.busy_gpu_ids, what="placement")
                executor.fail_device(0)
                executor.fail_device(1)
                with pytest.raises(JobFailed) as failed:
                    await asyncio.wait_for(client.wait(job["job_id"]), 10)
                async with aiohttp.ClientSession() as s:
                    async with s.post(url + "/v1/jobs", data=job_body({"steps": 3})) as resp:
                        refused = resp.status, (await resp.json())["error"]["message"]
                health = await client.health()
                types = [e["type"] for e in svc.hub.after(0)]
        finally:
            recovery.RESTART_BACKOFF_S = saved
        return failed.value, refused, health, types

    failed, refused, health, types = asyncio.run(body())
    assert "could not be restarted (2 attempts; last: WorkerError: simulated restart failure)" in str(failed)
    assert refused[0] == 503 and "could not be restarted" in refused[1]
    assert health["executor_state"] == "broken" and "restart the service" in health["executor_error"]
    assert types.count("executor_restart_failed") == 2 and "executor_broken" in types


class WidePolicy:
    """Only ever uses all four devices (as a fixed sp4 baseline would), ``round_steps`` at a time."""
    name = "wide"

    def __init__(self, round_steps: int = 5) -> None:
        self.round_steps = round_steps

    def plan_round(self, view, cost):
        if view.busy_gpu_ids or len(view.gpu_ids) < 4:
            return RoundPlan(view.round_index, 0.0, ())
        snap = view.plannable[0]
        return RoundPlan(view.round_index, 0.0, (Assignment((snap.request_id,), tuple(view.gpu_ids),
                                                            min(self.round_steps, snap.steps_left)),))


def test_a_policy_that_cannot_place_on_the_degraded_devices_triggers_a_rebuild_not_a_failure():
    async def body():
        app, executor = make_app(policy=WidePolicy(), rebuild_after_s=60.0)
        svc = app[SERVICE]
        async with running_service(app) as url, TetriServeClient(url) as client:
            a = await client.submit(job_body({"steps": 30}, res=512))
            b = await client.submit(job_body({"steps": 30, "seed": 1}, res=512))
            await wait_for(lambda: svc.engine.busy_gpu_ids, what="placement")
            executor.fail_device(3)
            statuses = [await client.wait(j["job_id"]) for j in (a, b)]
            return statuses, executor.num_restarts, svc.metrics.plan_errors_total

    statuses, restarts, plan_errors = asyncio.run(body())
    assert all(s["status"] == "finished" for s in statuses)
    assert restarts == 1 and plan_errors == 0


def test_a_hung_device_is_found_by_the_stall_watchdog_and_its_job_resumes():
    async def body():
        app, executor = make_app(stall_timeout_s=0.3, rebuild_after_s=0.0)
        svc = app[SERVICE]
        async with running_service(app) as url, TetriServeClient(url) as client:
            job = await client.submit(job_body({"steps": 40}, res=512))
            await wait_for(lambda: svc.store.jobs[job["job_id"]].steps_done >= 6, what="steps")
            gpu = svc.store.jobs[job["job_id"]].gpu_ids[0]
            executor.stalled.add(gpu)  # alive, but makes no progress: no sentinel would ever fire
            events = []
            status = await client.wait(job["job_id"], on_event=events.append, timeout_s=20)
            stalled = [e for e in svc.hub.after(0) if e["type"] == "executor_stalled"]
        return status, events, stalled, executor.num_restarts

    status, events, stalled, restarts = asyncio.run(body())
    assert status["status"] == "finished" and status["num_faults"] == 1
    assert "completed no step for" in status["last_fault"] and "hung" in status["last_fault"]
    requeued = [e for e in events if e["type"] == "requeued"]
    assert len(requeued) == 1 and requeued[0]["steps_done"] == 5  # its last completed round (rounds of 5)
    assert len(stalled) == 1 and restarts == 1


def test_a_device_that_keeps_dying_under_different_jobs_is_quarantined_and_a_poison_job_quarantines_none():
    async def body():
        app, executor = make_app(max_device_faults=3, rebuild_after_s=0.0)
        svc = app[SERVICE]
        recovery = svc.loop.recovery
        async with running_service(app) as url, TetriServeClient(url) as client:
            # one job on device 2 three times (a poison job): one cause, no quarantine
            for _ in range(3):
                recovery.on_fault(WorkerFault(gpu_ids=(2,), reason="worker 2 died", request_ids=("j-poison",)))
            assert not recovery.quarantined
            # three deaths of its own (no job on it): quarantined at the third
            for n in range(3):
                executor.fail_device(1, f"worker 1 (sim) died (killed by SIGKILL) #{n}")
                if n < 2:
                    await wait_for(lambda: executor.num_restarts == n + 1, what=f"restart {n + 1}")
            await asyncio.sleep(0.3)
            # its death alone asks for no rebuild: the pool stays as it is, serving on the other three
            assert executor.num_restarts == 2 and recovery.state.value == "ok"
            async with aiohttp.ClientSession() as s, s.get(url + "/v1/executor") as resp:
                executor_json = await resp.json()
            executor.history.clear()
            jobs = [await client.submit(job_body({"steps": 20, "seed": i}, res=512)) for i in range(6)]
            statuses = [await client.wait(j["job_id"]) for j in jobs]
            used = {g for _, gpus, _ in executor.history for g in gpus}
            metrics = await client.metrics()
            events = [e for e in svc.hub.after(0) if e["type"] == "executor_device_quarantined"]
        return executor_json, statuses, used, metrics, events

    executor_json, statuses, used, metrics, events = asyncio.run(body())
    assert executor_json["healthy_gpu_ids"] == [0, 2, 3] and list(executor_json["quarantined"]) == ["1"]
    assert "died 3 times" in executor_json["quarantined"]["1"] and "--max-device-faults 3" in executor_json["quarantined"]["1"]
    assert all(s["status"] == "finished" for s in statuses) and 1 not in used and used
    assert "tetriserve_quarantined_devices 1" in metrics
    assert len(events) == 1 and events[0]["gpu_id"] == 1


def test_the_last_device_that_is_not_quarantined_never_is():
    async def body():
        app, executor = make_app(num_gpus=2, max_device_faults=1, rebuild_after_s=0.0)
        svc = app[SERVICE]
        async with running_service(app) as url, TetriServeClient(url) as client:
            executor.fail_device(0)
            await asyncio.sleep(0.1)
            executor.fail_device(1)
            await wait_for(lambda: executor.num_restarts >= 1 and not executor.dead, what="rebuild")
            job = await client.submit(job_body({"steps": 10}, res=512))
            status = await client.wait(job["job_id"])
            return dict(svc.loop.recovery.quarantined), status

    quarantined, status = asyncio.run(body())
    assert list(quarantined) == [0] and status["status"] == "finished"


def test_a_quarantine_the_policy_cannot_work_around_is_lifted_not_left_to_stall_the_jobs():
    async def body():
        app, executor = make_app(policy=WidePolicy(round_steps=1000), max_device_faults=3)
        svc = app[SERVICE]
        recovery = svc.loop.recovery
        async with running_service(app) as url, TetriServeClient(url) as client:
            for n in range(3):  # three deaths of device 3 with nothing on it: quarantined
                recovery.on_fault(WorkerFault(gpu_ids=(3,), reason=f"worker 3 died #{n}"))
            assert list(recovery.quarantined) == [3] and svc.engine.healthy_gpu_ids == (0, 1, 2)
            job = await client.submit(job_body({"steps": 10}, res=512))
            status = await asyncio.wait_for(client.wait(job["job_id"]), 10)
            events = [e["type"] for e in svc.hub.after(0) if e["type"].startswith("executor_")]
            return status, dict(recovery.quarantined), events, svc.metrics.plan_errors_total

    status, quarantined, events, plan_errors = asyncio.run(body())
    assert status["status"] == "finished" and status["gpu_ids"] == [0, 1, 2, 3]
    assert not quarantined and plan_errors == 0
    assert events[-2:] == ["executor_device_quarantined", "executor_quarantine_lifted"], events


def test_deaths_that_follow_a_peers_fault_in_the_same_assignment_quarantine_nothing():
    async def body():
        app, executor = make_app(num_gpus=2, policy=FifoPolicy(sp_degree=2, round_steps=200), max_device_faults=2,
                                 rebuild_after_s=0.0)
        svc = app[SERVICE]
        async with running_service(app) as url, TetriServeClient(url) as client:
            for n in range(2):
                job = await client.submit(job_body({"steps": 200, "seed": n}, res=512))
                # running on the devices: the executor holds the assignment (the job's status turns "running"
                # when the loop dispatches it, a moment before)
                await wait_for(lambda: any(job["job_id"] in ids for ids in executor._running), what="running")
                group = svc.store.jobs[job["job_id"]].gpu_ids
                # as the stall watchdog does: every rank of the assignment, first one way round, then the other,
                # so each device dies once first (under a job) and once after its peer (collateral)
                executor.kill_workers(group if n == 0 else group[::-1], "hung")
                await wait_for(lambda: executor.num_restarts == n + 1, what=f"restart {n + 1}")
                await client.cancel(job["job_id"])
            faults = [e for e in svc.hub.after(0) if e["type"] == "executor_fault"]
            return dict(svc.loop.recovery.quarantined), faults, group

    quarantined, faults, group = asyncio.run(body())
    # the first rank of each killed pair counts (once, under its job), its peer's death is collateral:
    # counted as causes, the collateral deaths would have quarantined both devices (2 each, limit 2)
    assert tuple(group) == (0, 1) and len(faults) == 4 and not quarantined, (quarantined, faults)
    assert [f["job_ids"] != [] for f in faults] == [True, False, True, False]
