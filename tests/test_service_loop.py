"""The engine loop behind the API: concurrency, cancel, leases, shutdown, cost feedback, failures."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import pytest
import torch

from comfy_tetriserve.client import JobCancelled, JobFailed, TetriServeClient, decode_result
from comfy_tetriserve.errors import Gone
from comfy_tetriserve.service import wiring
from comfy_tetriserve.service.state import SERVICE
from comfy_tetriserve.types import Assignment, RoundPlan
from factories import PowerLawCost
from service_helpers import FifoPolicy, follow_events, job_body, make_service_app, running_service, submit_json

#: 512 px steps of 10 ms at degree 1
SLOW_COST = PowerLawCost(base_s=0.04)


def tensors_for(seed: int, res: int = 256) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"latent": torch.randn(1, 16, res // 8, res // 8, generator=g),
            "context": torch.randn(1, 8, 4096, generator=g), "pooled": torch.randn(1, 768, generator=g)}


def test_twenty_jobs_from_three_concurrent_clients_all_end_with_their_results():
    async def body():
        app, executor = make_service_app(policy=FifoPolicy(round_steps=3))
        async with running_service(app) as url:
            async def client_run(name: str, seeds: list[int]):
                outcomes = []
                async with TetriServeClient(url) as client, client.lease(tenant=name) as lease:
                    async def one(seed: int):
                        tensors = tensors_for(seed, res=128 * (1 + seed % 3))
                        settings = {"model": "flux-sim", "steps": 5 + seed % 7, "seed": seed, "lease": lease,
                                    "deadline_s": None if seed % 4 == 0 else 30.0}
                        seen = []
                        out, meta = await client.generate(tensors, settings, on_event=seen.append)
                        return seed, tensors["latent"], out["latent"], meta, seen
                    outcomes = await asyncio.gather(*(one(s) for s in seeds))
                return outcomes

            results = await asyncio.gather(client_run("alice", list(range(0, 7))),
                                           client_run("bob", list(range(7, 14))),
                                           client_run("carol", list(range(14, 20))))
            svc = app[SERVICE]
            flat = [r for group in results for r in group]
            assert len(flat) == 20
            for seed, latent_in, latent_out, meta, seen in flat:
                # the simulated executor returns the input latent: the round trip through model space is exact
                assert torch.allclose(latent_out, latent_in, atol=1e-5), seed
                assert meta["simulated"] == "true" and meta["space"] == "vae"
                kinds = [e["type"] for e in seen]
                assert kinds[0] == "queued" and kinds[-1] == "finished" and "placed" in kinds
                steps = [e["step"] for e in seen if e["type"] == "step"]
                assert steps == sorted(steps) and steps[-1] == 5 + seed % 7
            assert all(j.status.value == "finished" for j in svc.store.jobs.values())
            assert len(svc.store.jobs) == 20 and not svc.engine.busy_gpu_ids
            assert {j.tenant for j in svc.store.jobs.values()} == {"alice", "bob", "carol"}
            # rounds of 3 steps: jobs moved between devices and rounds
            assert len(executor.history) > 20
            assert svc.metrics.sar() == 1.0

    asyncio.run(body())


def test_cancel_mid_job_frees_devices_within_one_round():
    async def body():
        app, executor = make_service_app(num_gpus=1, cost=SLOW_COST)
        svc = app[SERVICE]
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            _, first = await submit_json(s, url, job_body({"steps": 300}, res=512))
            _, second = await submit_json(s, url, job_body({"steps": 3}, res=512))
            await asyncio.sleep(0.3)
            assert svc.engine.busy_gpu_ids == {0}
            step_s = executor.step_time_s(Assignment((first["job_id"],), (0,), 1))
            t0 = time.monotonic()
            async with s.post(f"{url}/v1/jobs/{first['job_id']}/cancel") as resp:
                assert resp.status == 202
            while svc.engine.busy_gpu_ids == {0} and svc.store.jobs[second["job_id"]].status.value == "queued":
                await asyncio.sleep(0.001)
            freed_after = time.monotonic() - t0
            first_events = await follow_events(s, url, first["job_id"])
            second_events = await follow_events(s, url, second["job_id"])
        assert freed_after < step_s + 0.1, (freed_after, step_s)
        kinds = [e["type"] for e in first_events]
        assert kinds[-1] == "cancelled" and "cancelling" in kinds[-3:], kinds
        assert first_events[-1]["reason"] == "cancelled by client"
        assert 10 < first_events[-1]["steps_done"] < 300
        assert second_events[-1]["type"] == "finished"
        assert executor.history[-1][0] == (second["job_id"],)

    asyncio.run(body())


def test_lease_expiry_cancels_its_jobs_and_heartbeats_keep_them():
    async def body():
        app, _ = make_service_app(num_gpus=2, cost=SLOW_COST)
        svc = app[SERVICE]
        async with running_service(app) as url, TetriServeClient(url) as client:
            dead = await client.create_lease(tenant="gone", ttl_s=0.3)
            doomed = await client.submit(job_body({"steps": 300, "lease": dead["lease"]}, res=512))
            async with client.lease(tenant="alive", ttl_s=1.0) as lease:
                kept = await client.submit(job_body({"steps": 80}, res=512), lease=lease)
                with pytest.raises(JobCancelled, match="lease expired"):
                    await client.wait(doomed["job_id"])
                final = await client.wait(kept["job_id"])
            assert final["status"] == "finished" and final["lease"] == lease
            assert svc.store.jobs[doomed["job_id"]].steps_done < 300
            assert dead["lease"] not in svc.store.leases
            assert lease not in svc.store.leases  # released on exit
            kinds = [e["type"] for e in svc.hub.after(0)]
            assert "lease_expired" in kinds

    asyncio.run(body())


def test_releasing_a_lease_cancels_its_unfinished_jobs():
    async def body():
        app, _ = make_service_app(num_gpus=1, cost=SLOW_COST)
        async with running_service(app) as url, TetriServeClient(url) as client:
            lease = (await client.create_lease(tenant="t"))["lease"]
            a = await client.submit(job_body({"steps": 300}, res=512), lease=lease)
            b = await client.submit(job_body({"steps": 300, "seed": 1}, res=512), lease=lease)
            released = await client.release_lease(lease)
            assert sorted(released["cancelled"]) == sorted([a["job_id"], b["job_id"]])
            for job in (a, b):
                with pytest.raises(JobCancelled, match="lease released"):
                    await client.wait(job["job_id"])

    asyncio.run(body())


def test_graceful_shutdown_reports_every_unfinished_job():
    async def body():
        app, executor = make_service_app(num_gpus=1, cost=SLOW_COST)
        svc = app[SERVICE]
        events: dict[str, list] = {}
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            ids = [(await submit_json(s, url, job_body({"steps": 300, "seed": i}, res=512)))[1]["job_id"]
                   for i in range(3)]
            await asyncio.sleep(0.2)

            async def follow(job_id):
                events[job_id] = await follow_events(s, url, job_id)
            followers = [asyncio.ensure_future(follow(j)) for j in ids]
            await asyncio.sleep(0.05)
            stop = asyncio.ensure_future(svc.loop.begin_shutdown())
            await asyncio.wait_for(asyncio.gather(*followers), 5)
            await stop
            async with s.post(url + "/v1/jobs", data=job_body()) as resp:
                assert resp.status == 503 and "shutting down" in (await resp.json())["error"]["message"]
        for job_id in ids:
            last = events[job_id][-1]
            assert last["type"] == "failed" and "shut down" in last["error"], last
            assert svc.store.jobs[job_id].status.value == "failed"
        assert not svc.engine.busy_gpu_ids and not svc.loop._flight

    asyncio.run(body())


@dataclass
class RecordingOnlineCost:
    """A stand-in for the planner's OnlineCostModel: prices like PowerLawCost, records observations."""

    inner: PowerLawCost = field(default_factory=lambda: PowerLawCost(base_s=0.08))
    seen: list = field(default_factory=list)

    def step_time_s(self, model, height, width, batch, sp_degree):
        return self.inner.step_time_s(model, height, width, batch, sp_degree)

    def allowed_degrees(self, model):
        return self.inner.allowed_degrees(model)

    def observe(self, model, height, width, batch, sp_degree, measured_step_s):
        self.seen.append((model, height, width, batch, sp_degree, measured_step_s))

    def drift(self):
        return {"flux-sim@2": 1.25}


def test_measured_step_times_feed_the_cost_model_and_drift_metrics():
    async def body():
        cost = RecordingOnlineCost()
        app, executor = make_service_app(cost=cost, policy=FifoPolicy(sp_degree=2), time_scale=1.5)
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            _, r = await submit_json(s, url, job_body({"steps": 6}, res=512, batch=2))
            await follow_events(s, url, r["job_id"])
            async with s.get(url + "/v1/metrics") as resp:
                text = await resp.text()
        assert len(cost.seen) == 6
        for model, h, w, batch, degree, measured in cost.seen:
            assert (model, h, w, batch, degree) == ("flux-sim", 512, 512, 2, 2)
            predicted = cost.step_time_s(model, h, w, batch, degree)
            # simulated steps sleep 1.5x the prediction (~35 ms); a busy machine only makes them longer
            assert 0.9 * 1.5 * predicted <= measured <= 1.5 * predicted + 1.0
        drift_line = next(line for line in text.splitlines() if line.startswith("tetriserve_step_time_drift_ratio{"))
        assert 'sp_degree="2"' in drift_line and 1.3 < float(drift_line.split()[-1]) < 30
        assert 'tetriserve_cost_model_drift_ratio{key="flux-sim@2"} 1.25' in text

    asyncio.run(body())


def test_predicted_finish_comes_from_the_forecast_when_there_is_one(monkeypatch):
    calls = []

    def fake_forecast(view, policy, cost):
        calls.append(view)
        return {r.request_id: view.now + 42.0 for r in view.requests}

    monkeypatch.setattr(wiring, "_forecast_finish", fake_forecast)

    async def body():
        app, _ = make_service_app(cost=SLOW_COST, num_gpus=1)
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            _, r = await submit_json(s, url, job_body({"steps": 300, "deadline_s": 10}, res=512))
            assert r["predicted_finish_at"] - r["submitted_at"] == pytest.approx(42.0, abs=0.5)
            assert r["feasible"] is False
            async with s.post(f"{url}/v1/jobs/{r['job_id']}/cancel"):
                pass
        assert calls and calls[0].requests[0].request_id == r["job_id"]

    asyncio.run(body())


def test_an_expensive_forecast_does_not_hold_up_submits(monkeypatch):
    """With many open jobs the forecast gets slow: submits then answer with the simple estimate at once,
    and a refresh brings the forecast shortly after (spaced so forecasts take a bounded share of the loop)."""
    import time as time_module

    calls = []

    def slow_forecast(view, policy, cost):
        calls.append(time_module.monotonic())
        time_module.sleep(0.08)  # what 300 open jobs cost
        return {r.request_id: view.now + 42.0 for r in view.requests}

    monkeypatch.setattr(wiring, "_forecast_finish", slow_forecast)

    async def body():
        app, _ = make_service_app(cost=SLOW_COST, num_gpus=1)
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            _, first = await submit_json(s, url, job_body({"steps": 300, "deadline_s": 100}, res=512))
            assert first["predicted_finish_at"] - first["submitted_at"] == pytest.approx(42.0, abs=0.5)
            answers = []
            for i in range(5):
                t0 = time_module.monotonic()
                _, r = await submit_json(s, url, job_body({"steps": 300, "deadline_s": 100, "seed": i + 1}, res=512))
                answers.append((time_module.monotonic() - t0, r))
            # the simple estimate (300 steps of 10 ms behind the others on one device), not the forecast's 42 s
            assert all(abs(r["predicted_finish_at"] - r["submitted_at"] - 42.0) > 1.0 for _, r in answers)
            forecasts_during_submits = len(calls)
            await asyncio.sleep(1.5)
            async with s.get(f"{url}/v1/jobs/{answers[-1][1]['job_id']}") as resp:
                status = await resp.json()
            for r in [first] + [r for _, r in answers]:
                async with s.post(f"{url}/v1/jobs/{r['job_id']}/cancel"):
                    pass
        return answers, forecasts_during_submits, status, list(calls)

    answers, during, status, calls = asyncio.run(body())
    assert during <= 2, during  # one at the first submit, at most one refresh while the others came in
    assert status["predicted_finish_at"] - answers[-1][1]["submitted_at"] == pytest.approx(42.0, abs=2.0)
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert all(g >= 0.45 for g in gaps), gaps  # refreshes spaced out: at most 10 % of the loop's time


def broken_forecast(view, policy, cost):
    raise RuntimeError("forecast bug")


@pytest.mark.parametrize("forecast", [None, broken_forecast], ids=["no-forecast", "failing-forecast"])
def test_simple_estimate_without_forecast(monkeypatch, forecast):
    monkeypatch.setattr(wiring, "_forecast_finish", forecast)

    async def body():
        app, _ = make_service_app(cost=SLOW_COST, num_gpus=1)
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            _, a = await submit_json(s, url, job_body({"steps": 100, "deadline_s": 100}, res=512))
            _, b = await submit_json(s, url, job_body({"steps": 100, "deadline_s": 1.5, "seed": 1}, res=512))
            # one device, 10 ms steps: a alone 1 s; b waits behind a: about 2 s, over its deadline
            # (b is estimated a moment later, when a may have run a few steps; on a busy machine the
            # estimate itself can be made a few hundred ms after the submission is stamped)
            assert 1.0 <= a["predicted_finish_at"] - a["submitted_at"] <= 1.5
            assert 1.6 <= b["predicted_finish_at"] - b["submitted_at"] <= 2.5
            assert a["feasible"] is True and b["feasible"] is False
            for r in (a, b):
                await follow_events(s, url, r["job_id"])

    asyncio.run(body())


class BrokenPolicy:
    name = "broken"

    def plan_round(self, view, cost):
        snap = view.plannable[0]
        return RoundPlan(view.round_index, 0.0, (Assignment((snap.request_id,), (0, 1, 2), 1),))


def test_a_policy_bug_fails_jobs_loudly_and_the_service_survives():
    async def body():
        app, _ = make_service_app(policy=BrokenPolicy())
        svc = app[SERVICE]
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            _, r = await submit_json(s, url, job_body({"steps": 3}))
            events = await follow_events(s, url, r["job_id"])
            assert events[-1]["type"] == "failed" and "scheduler error" in events[-1]["error"]
            async with s.get(url + "/v1/health") as resp:
                assert resp.status == 200
        assert svc.metrics.plan_errors_total == 1

    asyncio.run(body())


def test_an_executor_failure_fails_the_job_not_the_service():
    async def body():
        app, executor = make_service_app()
        original = executor.execute
        calls = {"n": 0}

        async def flaky(assignment, on_step=None):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("device fell off the bus")
            return await original(assignment, on_step)

        executor.execute = flaky
        async with running_service(app) as url, TetriServeClient(url) as client:
            bad = await client.submit(job_body({"steps": 3}))
            with pytest.raises(JobFailed, match="device fell off the bus"):
                await client.wait(bad["job_id"])
            good = await client.submit(job_body({"steps": 3, "seed": 2}))
            assert (await client.wait(good["job_id"]))["status"] == "finished"

    asyncio.run(body())


def test_results_expire_after_fetch_and_then_answer_gone():
    async def body():
        app, _ = make_service_app(fetched_ttl_s=0.2, result_ttl_s=30)
        svc = app[SERVICE]
        async with running_service(app) as url, TetriServeClient(url) as client:
            job = await client.submit(job_body({"steps": 2}))
            await client.wait(job["job_id"])
            tensors, _ = decode_result(await client.result(job["job_id"]))
            assert tensors["latent"].shape == (1, 16, 16, 16)
            await asyncio.sleep(0.5)
            with pytest.raises(Gone, match="expired"):
                await client.status(job["job_id"])
            assert job["job_id"] not in svc.store.jobs
            assert not any(st.request_id == job["job_id"] for st in svc.engine.states())

    asyncio.run(body())


def test_sequence_parallel_placement_is_reported():
    async def body():
        app, executor = make_service_app(policy=FifoPolicy(sp_degree=4))
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            _, r = await submit_json(s, url, job_body({"steps": 4}, res=256))
            events = await follow_events(s, url, r["job_id"])
        placed = next(e for e in events if e["type"] == "placed")
        assert placed["gpu_ids"] == [0, 1, 2, 3] and placed["sp_degree"] == 4
        assert list(executor.history) == [((r["job_id"],), (0, 1, 2, 3), 4)]

    asyncio.run(body())



def test_predicted_finish_follows_the_rounds():
    """A job that runs slower than predicted gets a later predicted finish as its rounds end."""
    async def body():
        # the simulated steps take twice the cost model's time: the submit-time forecast is too early
        app, _ = make_service_app(num_gpus=1, cost=SLOW_COST, time_scale=2.0, policy=FifoPolicy(round_steps=3))
        svc = app[SERVICE]
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            _, job = await submit_json(s, url, job_body({"steps": 60}, res=512))
            first = svc.store.jobs[job["job_id"]].predicted_finish_at
            await asyncio.sleep(1.0)
            later = svc.store.jobs[job["job_id"]].predicted_finish_at
            # after about 1 s at half the predicted speed, the forecast slips by about 0.5 s
            assert later > first + 0.3, (first, later)
            async with s.get(f"{url}/v1/jobs/{job['job_id']}") as resp:
                status = await resp.json()
            assert status["status"] == "running" or status["status"] == "waiting"

    asyncio.run(body())


def test_a_lease_released_while_its_job_is_admitted_refuses_the_job_and_leaves_nothing_behind():
    """The executor's admit awaits (the worker pool sends the conditioning): the lease may end meanwhile."""
    from comfy_tetriserve.errors import NotFound

    async def body():
        app, executor = make_service_app(cost=SLOW_COST, num_gpus=1)
        svc = app[SERVICE]
        gate = asyncio.Event()
        admit = executor.admit

        async def slow_admit(job):
            await admit(job)
            await gate.wait()

        executor.admit = slow_admit
        async with running_service(app) as url, TetriServeClient(url) as client:
            lease = await client.create_lease("alice")
            submit = asyncio.ensure_future(client.submit(job_body({"steps": 5}), lease=lease["lease"]))
            await asyncio.sleep(0.2)  # the submit now waits inside the executor's admit
            await client.release_lease(lease["lease"])
            gate.set()
            with pytest.raises(NotFound, match="lease"):
                await submit
            stored, planned = dict(svc.store.jobs), svc.engine.view(svc.clock.now()).requests
            job = await client.submit(job_body({"steps": 3}))  # the service goes on planning
            final = await asyncio.wait_for(client.wait(job["job_id"]), 10)
        return stored, planned, final

    stored, planned, final = asyncio.run(body())
    assert stored == {} and planned == ()
    assert final["status"] == "finished"
