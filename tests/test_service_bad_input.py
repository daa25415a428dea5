"""Every malformed request gets a 4xx with a JSON error saying what is wrong, and the service keeps serving."""
from __future__ import annotations

import asyncio
import json
import math

import aiohttp
import torch
from safetensors.torch import save

from service_helpers import follow_events, job_body, make_service_app, running_service

BIG = 10**6


def bad_bodies() -> list[tuple[str, bytes, str]]:
    """(name, body, a word the error message must contain)."""
    t = lambda *shape: torch.zeros(*shape)  # noqa: E731
    meta = lambda obj: {"tetriserve": json.dumps(obj)}  # noqa: E731
    return [
        ("empty body", b"", "safetensors"),
        ("not safetensors", b"hello world, this is not a tensor file", "safetensors"),
        ("header length lies", (10**9).to_bytes(8, "little") + b"{}", "header"),
        ("header not json", (5).to_bytes(8, "little") + b"{nope", "JSON"),
        ("truncated tensors", job_body()[:-100], "safetensors"),
        ("no settings", job_body(metadata={}), "tetriserve"),
        ("settings not json", job_body(metadata={"tetriserve": "{model: flux"}), "JSON"),
        ("settings not an object", job_body(metadata=meta([1, 2])), "object"),
        ("settings NaN", job_body(metadata={"tetriserve": '{"model": "flux-sim", "steps": 4, "cfg": NaN}'}), "finite"),
        ("unknown setting", job_body({"colour": "blue"}), "colour"),
        ("missing model", job_body(metadata=meta({"steps": 4})), "model"),
        ("unknown model", job_body({"model": "nope"}), "unknown model"),
        ("path as model", job_body({"model": "../../etc/passwd"}), ".."),
        ("absolute model path", job_body({"model": "/etc/passwd"}), "absolute"),
        ("unknown sampler", job_body({"sampler": "dpmpp_9m"}), "sampler"),
        ("unknown scheduler", job_body({"scheduler": "lunar"}), "scheduler"),
        ("zero steps", job_body({"steps": 0}), "steps"),
        ("huge steps", job_body({"steps": BIG}), "steps"),
        ("float steps", job_body({"steps": 4.5}), "integer"),
        ("bool steps", job_body({"steps": True}), "integer"),
        ("no steps no sigmas", job_body({"steps": None}), "sigmas"),
        ("denoise zero", job_body({"denoise": 0}), "denoise"),
        ("negative deadline", job_body({"deadline_s": -5}), "deadline"),
        ("zero deadline", job_body({"deadline_s": 0}), "deadline"),
        ("absurd deadline", job_body({"deadline_s": 1e12}), "deadline"),
        ("string deadline", job_body({"deadline_s": "soon"}), "number"),
        ("negative seed", job_body({"seed": -1}), "seed"),
        ("huge seed", job_body({"seed": 2**64}), "seed"),
        ("cfg without negative", job_body({"cfg": 5.0}), "neg_context"),
        ("bad tenant", job_body({"tenant": "a b/c"}), "tenant"),
        ("bad space", job_body({"latent_space": "pixel"}), "latent_space"),
        ("missing latent", job_body(drop=("latent",)), "latent"),
        ("missing context", job_body(drop=("context",)), "context"),
        ("extra tensor", job_body(tensors={"mask": t(1, 1, 16, 16)}), "mask"),
        ("neg_context alone", job_body(tensors={"neg_context": t(1, 8, 4096)}), "together"),
        ("latent 3-D", job_body(tensors={"latent": t(16, 16, 16)}), "latent"),
        ("latent wrong channels", job_body(tensors={"latent": t(1, 4, 16, 16)}), "channels"),
        ("latent odd size", job_body(tensors={"latent": t(1, 16, 15, 16)}), "even"),
        ("latent huge", job_body(tensors={"latent": t(1, 16, 2, 20000)}), "tokens"),
        ("batch too large", job_body(batch=17), "batch"),
        ("latent NaN", job_body(tensors={"latent": torch.full((1, 16, 16, 16), math.nan)}), "NaN"),
        ("context Inf", job_body(tensors={"context": torch.full((1, 8, 4096), math.inf)}), "Inf"),
        ("latent int dtype", job_body(tensors={"latent": torch.zeros(1, 16, 16, 16, dtype=torch.int32)}), "floating"),
        ("context wrong dim", job_body(ctx_dim=768), "context"),
        ("context batch mismatch", job_body(tensors={"context": t(3, 8, 4096)}), "context"),
        ("pooled wrong dim", job_body(pooled_dim=2048), "pooled"),
        ("noise wrong shape", job_body(tensors={"noise": t(1, 16, 8, 8)}), "noise"),
        ("sigmas increasing", job_body({"steps": None}, tensors={"sigmas": torch.tensor([0.5, 0.9, 0.0])}), "sigmas"),
        ("sigmas vs steps", job_body({"steps": 5}, tensors={"sigmas": torch.tensor([1.0, 0.5, 0.0])}), "disagrees"),
        ("sigmas 2-D", job_body({"steps": None}, tensors={"sigmas": t(2, 2)}), "sigmas"),
        ("empty tensor", job_body(tensors={"pooled": torch.zeros(1, 0)}), "empty"),
        ("unknown lease", job_body({"lease": "l-nope"}), "lease"),
        ("pickle body", b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s.", "safetensors"),
    ]


def test_every_bad_submit_gets_a_clear_4xx_and_the_next_good_job_succeeds():
    async def body():
        app, _ = make_service_app(max_body_mb=8.0, max_image_tokens=4096)
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            cases = bad_bodies()
            cases.append(("oversized body", save({"latent": torch.zeros(1, 16, 512, 512)}), "large"))
            refused = []
            for name, data, word in cases:
                async with s.post(url + "/v1/jobs", data=data) as resp:
                    assert 400 <= resp.status < 500, (name, resp.status, await resp.text())
                    assert resp.content_type == "application/json", name
                    err = (await resp.json())["error"]
                assert err["status"] == resp.status and err["code"], name
                assert word.lower() in err["message"].lower(), (name, err["message"])
                refused.append(name)
                # the service keeps serving after each one
                async with s.get(url + "/v1/health") as resp:
                    assert resp.status == 200
            assert len(refused) == len(cases) >= 50
            async with s.post(url + "/v1/jobs", data=job_body({"steps": 3})) as resp:
                assert resp.status == 202
                job_id = (await resp.json())["job_id"]
            assert (await follow_events(s, url, job_id))[-1]["type"] == "finished"

    asyncio.run(body())


def test_bad_requests_on_other_routes():
    async def body():
        app, _ = make_service_app()
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            checks = [
                ("GET", "/v1/jobs/j-nope-000001", None, 404, "earlier run"),
                ("GET", "/v1/jobs/nope", None, 404, "unknown job"),
                ("GET", "/v1/jobs/nope/events", None, 404, "unknown job"),
                ("GET", "/v1/jobs/nope/result", None, 404, "unknown job"),
                ("POST", "/v1/jobs/nope/cancel", None, 404, "unknown job"),
                ("GET", "/v1/no-such-route", None, 404, "not found"),
                ("PUT", "/v1/jobs", None, 405, "not allowed"),
                ("POST", "/v1/models/load", b"{not json", 400, "JSON"),
                ("POST", "/v1/models/load", b"[1]", 400, "object"),
                ("POST", "/v1/models/load", b'{"model": "x", "path": "/tmp"}', 400, "path"),
                ("POST", "/v1/models/load", b'{"model": "nope.safetensors"}', 404, "unknown model"),
                ("POST", "/v1/models/load", b'{"model": "flux-sim", "dtype": "int4"}', 400, "dtype"),
                ("POST", "/v1/models/load", b'{"model": 5}', 400, "model"),
                ("POST", "/v1/models/load", b'{"model": "' + b"a" * 70000 + b'"}', 413, "large"),
                ("POST", "/v1/leases", b'{"ttl_s": -1}', 400, "ttl_s"),
                ("POST", "/v1/leases", b'{"tenant": "has space"}', 400, "tenant"),
                ("POST", "/v1/leases/l-nope/heartbeat", None, 404, "lease"),
                ("DELETE", "/v1/leases/l-nope", None, 404, "lease"),
                ("GET", "/v1/board?window_s=abc", None, 400, "window_s"),
                ("GET", "/v1/board?window_s=1e9", None, 400, "window_s"),
                ("GET", "/v1/events?after=-3", None, 400, "after"),
                ("GET", "/v1/models/..%2F..%2Fetc%2Fpasswd", None, 400, ".."),
            ]
            for method, path, data, status, word in checks:
                async with s.request(method, url + path, data=data) as resp:
                    text = await resp.text()
                    assert resp.status == status, (method, path, resp.status, text)
                    err = json.loads(text)["error"]
                assert word.lower() in err["message"].lower(), (path, err)
            # double cancel: the second is a conflict
            async with s.post(url + "/v1/jobs", data=job_body({"steps": 400}, res=512)) as resp:
                job_id = (await resp.json())["job_id"]
            async with s.post(f"{url}/v1/jobs/{job_id}/cancel") as resp:
                assert resp.status == 202
            async with s.post(f"{url}/v1/jobs/{job_id}/cancel") as resp:
                assert resp.status == 409 and "cancel" in (await resp.json())["error"]["message"]
            events = await follow_events(s, url, job_id)
            assert events[-1]["type"] == "cancelled"
            async with s.post(f"{url}/v1/jobs/{job_id}/cancel") as resp:
                assert resp.status == 409 and "already cancelled" in (await resp.json())["error"]["message"]
            async with s.get(f"{url}/v1/jobs/{job_id}/result") as resp:
                assert resp.status == 409 and "cancelled" in (await resp.json())["error"]["message"]
            async with s.post(url + "/v1/jobs", data=job_body({"steps": 2})) as resp:
                job_id = (await resp.json())["job_id"]
            assert (await follow_events(s, url, job_id))[-1]["type"] == "finished"

    asyncio.run(body())


def test_slow_body_times_out_with_408():
    async def body():
        app, _ = make_service_app(body_timeout_s=0.3)
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            async def trickle():
                yield b"\x00" * 8
                await asyncio.sleep(1.0)
                yield b"{}"
            async with s.post(url + "/v1/jobs", data=trickle()) as resp:
                assert resp.status == 408
                assert "not received" in (await resp.json())["error"]["message"]
            async with s.post(url + "/v1/jobs", data=job_body({"steps": 2})) as resp:
                assert resp.status == 202

    asyncio.run(body())


def test_limits_per_tenant_and_overall_give_429():
    async def body():
        app, _ = make_service_app(num_gpus=1, max_open_jobs_per_tenant=2, max_open_jobs=3)
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            slow = {"steps": 500}
            codes = []
            for tenant in ("a", "a", "a", "b", "c"):
                async with s.post(url + "/v1/jobs", data=job_body({**slow, "tenant": tenant}, res=512)) as resp:
                    codes.append(resp.status)
                    if resp.status == 429:
                        assert "limit" in (await resp.json())["error"]["message"]
            assert codes == [202, 202, 429, 202, 429]

    asyncio.run(body())


def test_the_hostile_catalogue_is_refused_while_good_jobs_keep_finishing(tmp_path):
    """Every case of reliability.hostile (broken safetensors, nesting bombs, path-like model names,
    symlinks out of the model folder, protocol abuse, floods) against a live service, with a client
    submitting good jobs all along (the same catalogue runs on real workers in test_reliability.py)."""
    from types import SimpleNamespace

    from comfy_tetriserve.reliability.hostile import CASES, run_hostile

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-flux.safetensors").write_bytes(b"a model file")
    limits = {"max_open_jobs_per_tenant": 6, "max_leases_per_tenant": 4, "max_event_streams": 24,
              "max_image_tokens": 1024}
    settings = SimpleNamespace(max_body_mb=2.0, body_timeout_s=0.5)

    async def body():
        app, _ = make_service_app(time_scale=20.0, model_dir=(str(tmp_path / "models"),),
                                  max_body_mb=settings.max_body_mb, body_timeout_s=settings.body_timeout_s, **limits)
        async with running_service(app) as url:
            return await run_hostile(url, {"flux": "flux-sim", "sd3": "sd3-sim"}, tmp_path, settings, limits,
                                     timeout_s=120)

    report = asyncio.run(body())
    assert report.sent == len(CASES) >= 50
    assert not report.failures, [(c.name, c.statuses, c.message) for c in report.failures]
    assert report.refused == report.sent and report.requests > 200
    assert report.good_jobs >= 3 and report.good_finished == report.good_jobs
    assert report.service_alive
