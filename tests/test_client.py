"""The async client: typed errors, safe retries, restarts, auto-start."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from comfy_tetriserve.client import (JobFailed, ServiceRestarted, TetriServeClient, ensure_service,
                                     error_from_response)
from comfy_tetriserve.errors import (Conflict, Gone, InvalidRequest, NotFound, PayloadTooLarge, ServiceUnavailable,
                                     TetriServeError, TooManyRequests, Unauthorized)
from comfy_tetriserve.service.state import SERVICE
from factories import PowerLawCost
from service_helpers import free_port, job_body, make_service_app, running_service, serve_command

TESTS_DIR = str(Path(__file__).parent)


def test_errors_are_rebuilt_from_the_service_answer():
    cases = [
        (400, b'{"error": {"code": "invalid_request", "message": "steps must be >= 1", "status": 400}}', InvalidRequest),
        (404, b'{"error": {"code": "not_found", "message": "unknown job x", "status": 404}}', NotFound),
        (410, b'{"error": {"code": "gone", "message": "expired", "status": 410}}', Gone),
        (409, b'{"error": {"code": "conflict", "message": "already cancelled", "status": 409}}', Conflict),
        (413, b'{"error": {"code": "payload_too_large", "message": "too big", "status": 413}}', PayloadTooLarge),
        (401, b'{"error": {"code": "unauthorized", "message": "token", "status": 401}}', Unauthorized),
        (429, b'{"error": {"code": "too_many_requests", "message": "limit", "status": 429}}', TooManyRequests),
        (503, b'{"error": {"code": "unavailable", "message": "stopping", "status": 503}}', ServiceUnavailable),
        (418, b"plain text from a proxy", InvalidRequest),
        (502, b"<html>bad gateway</html>", TetriServeError),
    ]
    for status, body, cls in cases:
        exc = error_from_response(status, body)
        assert type(exc) is cls, (status, exc)
        assert exc.http_status == status
    assert str(error_from_response(400, cases[0][1])) == "steps must be >= 1"


def test_client_methods_against_a_service():
    async def body():
        app, _ = make_service_app()
        async with running_service(app) as url, TetriServeClient(url) as client:
            assert (await client.health())["status"] == "ok"
            assert {m["name"] for m in await client.models()} >= {"flux-sim", "sd3-sim"}
            assert (await client.load_model("flux-sim"))["status"] == "loaded"
            assert (await client.model("sd3-sim"))["family"] == "sd3"
            assert "tetriserve_sar" in await client.metrics()
            assert (await client.openapi())["openapi"].startswith("3.1")
            job = await client.submit(job_body({"steps": 3, "tenant": "zed"}))
            progress = []
            final = await client.wait(job["job_id"], on_event=lambda e: progress.append(e["type"]))
            assert final["status"] == "finished" and progress[-1] == "finished"
            assert [j["job_id"] for j in await client.jobs(tenant="zed")] == [job["job_id"]]
            assert (await client.board())["jobs"][0]["job_id"] == job["job_id"]
            with pytest.raises(Conflict, match="already finished"):
                await client.cancel(job["job_id"])
            with pytest.raises(InvalidRequest, match="steps"):
                await client.submit(job_body({"steps": 0}))
            with pytest.raises(NotFound):
                await client.status("nope")

            async def async_callback(event):
                await asyncio.sleep(0)
                progress.append(event["type"])
            job2 = await client.submit(job_body({"steps": 2, "seed": 5}))
            await client.wait(job2["job_id"], on_event=async_callback)
            assert progress[-1] == "finished"

    asyncio.run(body())


def test_a_submit_whose_answer_is_lost_is_retried_without_a_second_job():
    async def body():
        app, _ = make_service_app()
        dropped = []

        @web.middleware
        async def lose_first_answer(request, handler):
            response = await handler(request)
            if request.method == "POST" and request.path == "/v1/jobs" and not dropped:
                dropped.append(request.headers["Idempotency-Key"])
                request.transport.close()  # the job was created, the client never hears of it
            return response

        app.middlewares.append(lose_first_answer)
        async with running_service(app) as url, TetriServeClient(url, backoff_s=0.01) as client:
            receipt = await client.submit(job_body({"steps": 2}))
            assert dropped and receipt["existing"] is True
            svc = app[SERVICE]
            assert list(svc.store.jobs) == [receipt["job_id"]]
            await client.wait(receipt["job_id"])

    asyncio.run(body())


def test_connection_errors_are_retried_then_reported_not_hung():
    async def body():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        async with TetriServeClient(url, retries=2, backoff_s=0.05) as client:
            t0 = time.monotonic()
            with pytest.raises(ServiceUnavailable, match="unreachable"):
                await client.health()
            assert time.monotonic() - t0 < 5
        # a service that comes up during the retries is reached
        app, _ = make_service_app()

        async def late_start():
            await asyncio.sleep(0.1)
            return running_service(app, port=port)
        client = TetriServeClient(url, retries=6, backoff_s=0.1)
        ctx = await late_start()
        async with ctx:
            assert (await client.health())["status"] == "ok"
        await client.close()

    asyncio.run(body())


def test_graceful_restart_gives_waiting_clients_a_clear_error():
    async def body():
        port = free_port()
        app, _ = make_service_app(num_gpus=1, cost=PowerLawCost(base_s=0.04))
        async with TetriServeClient(f"http://127.0.0.1:{port}", retries=1, backoff_s=0.05) as client:
            async with running_service(app, port=port):
                job = await client.submit(job_body({"steps": 1000}, res=512))
                waiter = asyncio.ensure_future(client.wait(job["job_id"]))
                await asyncio.sleep(0.2)
            with pytest.raises(ServiceRestarted, match="shut down before the job finished; submit it again"):
                await asyncio.wait_for(waiter, 10)
            app2, _ = make_service_app()
            async with running_service(app2, port=port):
                with pytest.raises(ServiceRestarted, match="submit the job again"):
                    await client.status(job["job_id"])
                with pytest.raises(ServiceRestarted):
                    await client.wait(job["job_id"])

    asyncio.run(body())


def _env_with_tests(tmp_path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, env.get("PYTHONPATH")) if p)
    env["TETRISERVE_HOME"] = str(tmp_path / "home")
    return env


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    from comfy_tetriserve.client import _healthy

    deadline = time.monotonic() + timeout_s
    while not _healthy(url, None):
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
        assert time.monotonic() < deadline, "service did not start"
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_service_gives_a_clear_error_and_a_restart_is_recognised(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = _env_with_tests(tmp_path)
    proc = subprocess.Popen(serve_command(port), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_healthy(url, proc)

        async def before_kill():
            async with TetriServeClient(url, retries=2, backoff_s=0.1) as client:
                await client.load_model("flux-sim")
                job = await client.submit(job_body({"steps": 1000}, res=512))
                waiter = asyncio.ensure_future(client.wait(job["job_id"]))
                await asyncio.sleep(0.5)
                assert not waiter.done()
                t0 = time.monotonic()
                os.kill(proc.pid, signal.SIGKILL)
                with pytest.raises(ServiceUnavailable):
                    await asyncio.wait_for(waiter, 20)
                return job, time.monotonic() - t0

        job, took = asyncio.run(before_kill())
        assert took < 10
        proc.wait(10)
        proc = subprocess.Popen(serve_command(port), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        _wait_healthy(url, proc)

        async def after_restart():
            async with TetriServeClient(url) as client:
                # the new run's journal remembers the job the killed run accepted: it says it was lost
                with pytest.raises(ServiceRestarted, match="earlier run of the service .* the job is lost"):
                    await client.wait(job["job_id"])
                health = await client.health()
                assert health["boot_id"] not in job["job_id"]

        asyncio.run(after_restart())
        # SIGTERM: graceful stop
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serve_refuses_a_public_address_without_a_token(tmp_path):
    env = _env_with_tests(tmp_path)
    env.pop("TETRISERVE_TOKEN", None)
    proc = subprocess.run(serve_command(free_port(), "--host", "0.0.0.0"), env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "without a token" in proc.stderr


def test_ensure_service_without_autostart_says_how_to_start_one(monkeypatch):
    monkeypatch.delenv("TETRISERVE_AUTOSTART", raising=False)

    async def body():
        with pytest.raises(ServiceUnavailable, match="comfy-tetriserve serve"):
            await ensure_service(f"http://127.0.0.1:{free_port()}", autostart=None)

    asyncio.run(body())


@pytest.mark.slow
def test_ensure_service_starts_one_detached_service_for_concurrent_callers(tmp_path, monkeypatch):
    env = _env_with_tests(tmp_path)
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    monkeypatch.setenv("TETRISERVE_HOME", env["TETRISERVE_HOME"])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = serve_command(port)[4:]  # the serve flags
    args = [a for a in args if a not in ("--port", str(port))]

    async def body():
        return await asyncio.gather(*(ensure_service(url, autostart=True, serve_args=args, timeout_s=90)
                                      for _ in range(3)))

    lock = Path(env["TETRISERVE_HOME"]) / "service.lock"
    try:
        assert asyncio.run(body()) == [url] * 3
        pid = int(lock.read_text().split()[0])
        os.kill(pid, 0)  # alive, detached from us

        async def use():
            async with TetriServeClient(url) as client:
                await client.load_model("flux-sim")
                job = await client.submit(job_body({"steps": 2}))
                return (await client.wait(job["job_id"]))["status"]

        assert asyncio.run(use()) == "finished"
        # a second round of callers finds it running and starts nothing
        assert asyncio.run(ensure_service(url, autostart=True, serve_args=args)) == url
        assert int(lock.read_text().split()[0]) == pid
        log_text = (Path(env["TETRISERVE_HOME"]) / "service.log").read_text()
        assert log_text.count("serving on") == 1
    finally:
        if lock.exists() and lock.read_text().strip():
            pid = int(lock.read_text().split()[0])
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):  # our child (started from this process): reap it
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                    time.sleep(0.1)
            except (ProcessLookupError, ChildProcessError):
                pass


def test_a_cancelled_caller_cancels_its_job_at_the_service():
    """ComfyUI cancels pending async nodes when a sibling fails: the job must not run on."""
    async def body():
        app, _ = make_service_app(num_gpus=1, cost=PowerLawCost(base_s=0.04))
        svc = app[SERVICE]
        async with running_service(app) as url, TetriServeClient(url) as client:
            import torch

            tensors = {"latent": torch.zeros(1, 16, 64, 64), "context": torch.zeros(1, 4, 4096),
                       "pooled": torch.zeros(1, 768)}
            seen = []
            task = asyncio.ensure_future(client.generate(tensors, {"model": "flux-sim", "steps": 1000},
                                                         on_event=seen.append))
            while not any(e["type"] == "step" for e in seen):
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            (job,) = svc.store.jobs.values()
            for _ in range(100):
                if job.status.value == "cancelled":
                    break
                await asyncio.sleep(0.02)
            assert job.status.value == "cancelled" and job.steps_done < 1000
            assert not svc.engine.busy_gpu_ids

    asyncio.run(body())


def test_a_job_is_followed_by_its_status_when_every_event_stream_is_taken():
    """429 on the event stream (the service's --max-event-streams are all held) must not end the wait."""
    async def body():
        app, _ = make_service_app(num_gpus=1, cost=PowerLawCost(base_s=0.02), max_event_streams=1)
        async with running_service(app) as url, TetriServeClient(url, backoff_s=0.02) as client:
            slow = await client.submit(job_body({"steps": 200, "tenant": "hog"}))
            held = client.events(slow["job_id"])
            first = await held.__anext__()  # this stream now holds the only slot
            assert first["type"] in ("queued", "placed", "step")
            with pytest.raises(TooManyRequests):
                async for _ in client.events(slow["job_id"]):
                    pass
            job = await client.submit(job_body({"steps": 3, "tenant": "zed"}))
            final = await asyncio.wait_for(client.wait(job["job_id"]), 30)
            assert final["status"] == "finished"
            await held.aclose()

    asyncio.run(body())


def test_a_job_the_service_stopped_under_reads_as_lost_from_its_status_too():
    """The failed event may be missed (a stream that broke, or polling after a 429): the status says it too."""
    async def body():
        async with TetriServeClient("http://127.0.0.1:9") as client:
            with pytest.raises(ServiceRestarted, match="shut down before the job finished"):
                await client._final("j-x", {"status": "failed", "error_code": "service_stopped",
                                            "error": "the service shut down before the job finished; submit it again"})
            with pytest.raises(JobFailed):
                await client._final("j-y", {"status": "failed", "error": "worker 2 died", "error_code": None})

    asyncio.run(body())
