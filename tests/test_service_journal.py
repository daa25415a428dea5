"""The job history (SQLite): a restarted service tells clients what became of the jobs an earlier run accepted."""
from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import aiohttp

from comfy_tetriserve.client import ServiceRestarted, TetriServeClient
from comfy_tetriserve.service.history import JobHistory
from comfy_tetriserve.service.state import SERVICE
from factories import PowerLawCost
from service_helpers import job_body, make_service_app, running_service

SLOW = PowerLawCost(base_s=0.04)


def killed(history: JobHistory) -> None:
    """What a killed service leaves: its history file as the last transaction left it, its lock dropped."""
    history._db.close()
    if history._lock is not None:
        history._lock.close()


def test_jobs_accepted_and_never_ended_are_lost_at_the_next_start(tmp_path):
    path = tmp_path / "history.sqlite3"
    first = JobHistory(path, "boot1")
    assert first.open() == []
    for i in range(3):
        first.accepted(f"j-boot1-{i}", "alice", f"key{i}", model="flux", height=1024, width=1024, num_steps=28)
    first.ended("j-boot1-0", "finished", None, gpu_s=12.5, placements=[([0, 1], 1.0, 2.0, 28, False)])
    first.ended("j-boot1-1", "failed", "worker 2 died")
    # while the first run lives, a second service given the same file leaves it alone
    intruder = JobHistory(path, "intruder")
    assert intruder.open() == [] and not intruder.enabled and intruder.past("j-boot1-2") is None
    first.accepted("j-boot1-3", "alice", "key3")  # the owner still writes to the live file
    killed(first)  # no close()
    second = JobHistory(path, "boot2")
    lost = second.open()
    assert [p.job_id for p in lost] == ["j-boot1-2", "j-boot1-3"] and second.num_lost_found == 2
    assert "earlier run of the service (boot boot1)" in second.past("j-boot1-2").message()
    assert "the job is lost" in second.past("j-boot1-2").message()
    assert second.past("j-boot1-0").status == "finished" and not second.past("j-boot1-0").lost
    assert "failed in an earlier run" in second.past("j-boot1-1").message()
    assert "worker 2 died" in second.past("j-boot1-1").message()
    assert second.past("j-boot1-9") is None
    second.close()
    # the finished job's record is whole: what it asked for, where it ran, its device-seconds
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT tenant, model, height, num_steps, status, gpu_s, placements FROM jobs "
                         "WHERE job_id = 'j-boot1-0'").fetchone()
    assert row[:6] == ("alice", "flux", 1024, 28, "finished", 12.5) and json.loads(row[6]) == [[[0, 1], 1.0, 2.0, 28, False]]
    # a third run still knows boot1's jobs, and none is reported lost anew
    third = JobHistory(path, "boot3")
    assert third.open() == [] and third.past("j-boot1-2").lost


def test_the_history_keeps_jobs_for_the_retention_period(tmp_path):
    path = tmp_path / "history.sqlite3"
    h = JobHistory(path, "b", retention_days=30)
    h.open()
    now = time.time()
    h.accepted("open-1", "t", None, submitted_at=now - 90 * 86400)  # stays open: never pruned while it is open
    for i, age_days in enumerate((60, 40, 20, 1)):
        h.accepted(f"j{i}", "t", None, submitted_at=now - age_days * 86400)
        h.ended(f"j{i}", "finished", None)
    assert h.prune(now) == 2
    killed(h)
    again = JobHistory(path, "c", retention_days=30)
    assert [p.job_id for p in again.open()] == ["open-1"]  # reported lost, then pruned at open (90 days old)
    assert again.past("j0") is None and again.past("j1") is None and again.past("j2") is not None
    assert again.past("open-1") is None and again.prune(now) == 0


def test_an_unwritable_journal_is_switched_off_and_the_service_goes_on(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")

    async def body():
        app, _ = make_service_app(journal=str(blocker / "history.sqlite3"))
        async with running_service(app) as url, TetriServeClient(url) as client:
            job = await client.submit(job_body({"steps": 2}))
            return (await client.wait(job["job_id"]))["status"], app[SERVICE].store.history.enabled

    with caplog.at_level("ERROR"):
        status, enabled = asyncio.run(body())
    assert status == "finished" and not enabled
    assert any("cannot be written" in r.getMessage() for r in caplog.records)


def test_after_a_graceful_restart_old_jobs_say_what_became_of_them_and_a_resubmit_runs_afresh(tmp_path):
    path = str(tmp_path / "history.sqlite3")

    async def first_run():
        app, _ = make_service_app(cost=SLOW, num_gpus=1, journal=path)
        async with running_service(app) as url, TetriServeClient(url) as client:
            done = await client.submit(job_body({"steps": 2}), job_key="done-key")
            await client.wait(done["job_id"])
            unfinished = await client.submit(job_body({"steps": 1000, "seed": 1}, res=512), job_key="long-key")
            await asyncio.sleep(0.1)
        return done["job_id"], unfinished["job_id"]  # the runner's cleanup stopped the service gracefully

    async def second_run(done_id, unfinished_id):
        app, _ = make_service_app(cost=SLOW, num_gpus=1, journal=path)
        async with running_service(app) as url, TetriServeClient(url) as client:
            answers = {}
            async with aiohttp.ClientSession() as s:
                for job_id in (done_id, unfinished_id):
                    async with s.get(f"{url}/v1/jobs/{job_id}") as resp:
                        answers[job_id] = resp.status, (await resp.json())["error"]
            again = await client.submit(job_body({"steps": 1000, "seed": 1}, res=512), job_key="long-key")
            await client.cancel(again["job_id"])
            return answers, again

    done_id, unfinished_id = asyncio.run(first_run())
    answers, again = asyncio.run(second_run(done_id, unfinished_id))
    status, err = answers[done_id]
    assert status == 410 and err["code"] == "gone" and "finished in an earlier run" in err["message"]
    status, err = answers[unfinished_id]  # a graceful stop under it: lost, so clients submit it again
    assert status == 410 and err["code"] == "job_lost" and "shut down before the job finished" in err["message"]
    assert "submit it again" in err["message"]
    assert again["existing"] is False and again["job_id"] != unfinished_id


def test_a_lost_job_raises_service_restarted_with_the_services_words_and_generate_submits_it_again(tmp_path):
    path = tmp_path / "history.sqlite3"
    # an earlier run accepted this job and was killed before it ended
    earlier = JobHistory(path, "deadbeef")
    earlier.open()
    earlier.accepted("j-deadbeef-000001", "default", "my-key")
    killed(earlier)

    async def body():
        app, _ = make_service_app(journal=str(path))
        async with running_service(app) as url, TetriServeClient(url) as client:
            try:
                await client.wait("j-deadbeef-000001")
            except ServiceRestarted as exc:
                lost = str(exc)
            metrics = await client.metrics()
            events = [e for e in app[SERVICE].hub.after(0) if e["type"] == "jobs_lost_in_restart"]
            # generate: the first answer is lost in a restart (as if), the resubmit under the same key finishes
            calls = []
            original = client.wait

            async def wait_once_lost(job_id, on_event=None, **kw):
                calls.append(job_id)
                if len(calls) == 1:
                    raise ServiceRestarted("the scheduler service restarted")
                return await original(job_id, on_event, **kw)

            client.wait = wait_once_lost
            import torch
            out, meta = await client.generate({"latent": torch.zeros(1, 16, 8, 8), "context": torch.randn(1, 4, 4096),
                                               "pooled": torch.randn(1, 768)}, {"model": "flux-sim", "steps": 2})
            return lost, metrics, events, calls, meta

    lost, metrics, events, calls, meta = asyncio.run(body())
    assert "accepted by an earlier run of the service (boot deadbeef)" in lost and "submit it again" in lost
    assert "tetriserve_jobs_lost_in_restart_total 1" in metrics
    assert events and events[0]["num_jobs"] == 1 and events[0]["boot_ids"] == ["deadbeef"]
    assert len(calls) == 2 and calls[0] == calls[1]  # same key: the service returned the existing job the 2nd time
    assert meta["num_steps"] == "2"
