"""The service's HTTP API on a real port with the simulated executor: the happy paths."""
from __future__ import annotations

import asyncio
import json
import math
import re

import aiohttp
import jsonschema
import pytest
import torch
from safetensors.torch import load

from comfy_tetriserve.worker import samplers
from comfy_tetriserve.errors import InvalidRequest
from comfy_tetriserve.service.app import create_app
from comfy_tetriserve.service.settings import ServiceConfig
from comfy_tetriserve.service.state import SERVICE
from service_helpers import (FAST_COST, FifoPolicy, follow_events, job_body, make_config, make_service_app,
                             running_service, submit_json)


def test_submit_status_events_result():
    async def body():
        app, executor = make_service_app()
        latent = torch.randn(2, 16, 32, 32)
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            status, receipt = await submit_json(s, url, job_body(
                {"deadline_s": 30, "steps": 6, "tenant": "alice", "seed": 7},
                batch=2, res=256, tensors={"latent": latent}))
            assert status == 202, receipt
            job_id = receipt["job_id"]
            assert receipt["status"] == "queued" and receipt["feasible"] is True and receipt["simulated"] is True
            assert receipt["deadline_at"] - receipt["submitted_at"] == pytest.approx(30)
            assert receipt["predicted_finish_at"] >= receipt["submitted_at"]
            assert (receipt["height"], receipt["width"], receipt["batch"], receipt["num_steps"]) == (256, 256, 2, 6)
            events = await follow_events(s, url, job_id)
            types = [e["type"] for e in events]
            assert types[0] == "queued" and types[1] == "placed" and types[-1] == "finished", types
            assert events[1]["gpu_ids"] == [0] and events[1]["sp_degree"] == 1
            assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
            steps = [e for e in events if e["type"] == "step"]
            assert steps and steps[-1]["step"] == 6 and steps[-1]["num_steps"] == 6
            assert events[-1]["met_deadline"] is True
            async with s.get(f"{url}/v1/jobs/{job_id}") as resp:
                st = await resp.json()
            assert st["status"] == "finished" and st["steps_done"] == 6 and st["result_ready"]
            assert st["tenant"] == "alice" and st["met_deadline"] is True
            async with s.get(f"{url}/v1/jobs/{job_id}/result") as resp:
                assert resp.status == 200 and resp.headers["X-TetriServe-Simulated"] == "true"
                raw = await resp.read()
            out = load(raw)["latent"]
            # simulated: the input latent comes back (VAE space in, VAE space out)
            assert out.shape == latent.shape and torch.allclose(out, latent, atol=1e-5)
            # replay from a sequence number: only later events
            later = await follow_events(s, url, job_id, after=events[-2]["seq"])
            assert [e["type"] for e in later] == ["finished"]
        assert executor.history[0][1] == (0,)

    asyncio.run(body())


def test_sampling_job_is_resolved_like_comfyui():
    """Sigmas from steps/scheduler/denoise, noise from the seed, latent moved to model space."""
    async def body():
        app, executor = make_service_app()
        svc = app[SERVICE]
        latent = torch.rand(1, 16, 16, 16)
        admitted = {}
        original = executor.admit

        async def spy(job):
            admitted[job.request_id] = job
            await original(job)

        executor.admit = spy
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            _, r1 = await submit_json(s, url, job_body({"steps": 10, "denoise": 0.5, "seed": 3},
                                                       tensors={"latent": latent}))
            _, r2 = await submit_json(s, url, job_body({"steps": 4, "latent_space": "model"}, res=128))
            for r in (r1, r2):
                await follow_events(s, url, r["job_id"])
        j1, j2 = admitted[r1["job_id"]], admitted[r2["job_id"]]
        assert torch.equal(j1.sigmas, samplers.compute_sigmas("flux", "simple", 10, 0.5))
        assert torch.equal(j1.noise, samplers.prepare_noise(latent, 3))
        assert torch.allclose(j1.latent, samplers.process_latent_in("flux", latent))
        assert j1.guidance == 3.5 and j1.batch == 1 and j1.num_steps == 10
        assert torch.count_nonzero(j2.latent) == 0  # model space kept as sent
        assert svc.store.jobs[r1["job_id"]].request.batch == 1

    asyncio.run(body())


def test_cfg_doubles_the_batch_the_planner_prices():
    async def body():
        app, _ = make_service_app()
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            b = job_body({"model": "sd3-sim", "cfg": 4.5, "steps": 3}, batch=2, pooled_dim=2048,
                         tensors={"neg_context": torch.randn(1, 5, 4096), "neg_pooled": torch.randn(1, 2048)})
            status, r = await submit_json(s, url, b)
            assert status == 202, r
            assert r["batch"] == 4
            await follow_events(s, url, r["job_id"])

    asyncio.run(body())


def test_idempotent_job_key_returns_the_existing_job():
    async def body():
        app, executor = make_service_app()
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            b = job_body({"job_key": "frame-0001", "steps": 3})
            st1, r1 = await submit_json(s, url, b)
            st2, r2 = await submit_json(s, url, b)
            assert (st1, st2) == (202, 200)
            assert r1["job_id"] == r2["job_id"] and r2["existing"] is True
            # the same key through the header, same body
            st3, r3 = await submit_json(s, url, job_body({"steps": 3}), headers={"Idempotency-Key": "k-1"})
            st4, r4 = await submit_json(s, url, job_body({"steps": 3}), headers={"Idempotency-Key": "k-1"})
            assert (st3, st4) == (202, 200) and r3["job_id"] == r4["job_id"]
            # reusing a key for a different body is a conflict
            st5, r5 = await submit_json(s, url, job_body({"job_key": "frame-0001", "steps": 4}))
            assert st5 == 409 and "different body" in r5["error"]["message"]
            # another tenant may use the same key
            st6, r6 = await submit_json(s, url, job_body({"job_key": "frame-0001", "steps": 3, "tenant": "bob"}))
            assert st6 == 202 and r6["job_id"] != r1["job_id"]
            for r in (r1, r3, r6):
                await follow_events(s, url, r["job_id"])
        assert len(executor.history) == 3

    asyncio.run(body())


def test_health_board_dashboard_and_service_events():
    async def body():
        app, _ = make_service_app()
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            async with s.get(url + "/v1/health") as resp:
                health = await resp.json()
            assert health["status"] == "ok" and health["num_gpus"] == 4 and health["policy"] == "test-fifo"
            _, r = await submit_json(s, url, job_body({"steps": 3, "deadline_s": 20}))
            await follow_events(s, url, r["job_id"])
            async with s.get(url + "/v1/board?window_s=30") as resp:
                board = await resp.json()
            assert board["gpu_ids"] == [0, 1, 2, 3] and board["window_s"] == 30
            (a,) = board["assignments"]
            assert a["job_ids"] == [r["job_id"]] and a["steps_done"] == 3 and a["finished_at"] >= a["started_at"]
            (j,) = board["jobs"]
            assert j["status"] == "finished" and j["late"] is False and 0 < j["slack_s"] <= 20
            assert board["sar"]["overall"] == 1.0 and board["sar"]["num_deadline_jobs"] == 1
            async with s.get(url + "/dashboard") as resp:
                page = await resp.text()
            assert resp.status == 200 and "/static/board.js" in page and "http" not in page.split("<script")[1][:40]
            async with s.get(url + "/static/board.js") as resp:
                js = await resp.text()
            assert resp.status == 200 and "/v1/board" in js and "cdn" not in js.lower()
            async with s.get(url + "/v1/events?after=0") as resp:
                lines = []
                async for line in resp.content:
                    event = json.loads(line)
                    lines.append(event)
                    if event["type"] == "finished":
                        break
            kinds = [e["type"] for e in lines]
            assert kinds[:2] == ["model_loading", "model_loading"] and "model_loaded" in kinds
            assert "queued" in kinds and "placed" in kinds and "step" not in kinds

    asyncio.run(body())


def test_models_listing_and_loading_from_model_dirs(tmp_path):
    """Files inside the model folders load by name; traversal, absolute paths and symlinks out are refused."""
    models = tmp_path / "diffusion_models"
    (models / "flux").mkdir(parents=True)
    (models / "flux" / "tiny-flux.safetensors").write_bytes(b"x")
    (models / "sd3-small.safetensors").write_bytes(b"x")
    (models / "notes.txt").write_text("not a model")
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"x")
    (models / "escape.safetensors").symlink_to(outside)
    (models / "inside-link.safetensors").symlink_to(models / "sd3-small.safetensors")

    async def body():
        app, _ = make_service_app(model_dir=(str(models),))
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            async with s.get(url + "/v1/models") as resp:
                listing = {m["name"]: m for m in (await resp.json())["models"]}
            assert listing["flux-sim"]["status"] == "loaded" and listing["flux-sim"]["origin"] == "configured"
            assert listing["flux/tiny-flux.safetensors"]["status"] == "available"
            assert "notes.txt" not in listing and "escape.safetensors" not in listing
            for bad in ("../secret.safetensors", "flux/../../secret.safetensors", str(outside), "/etc/passwd",
                        "escape.safetensors", "notes.txt", "a\\b.safetensors", "x/./y.safetensors", ""):
                async with s.post(url + "/v1/models/load", json={"model": bad}) as resp:
                    err = await resp.json()
                assert resp.status in (400, 404), (bad, resp.status)
                assert err["error"]["message"], bad
            async with s.post(url + "/v1/models/load", json={"model": "escape.safetensors"}) as resp:
                assert "outside" in (await resp.json())["error"]["message"]
            async with s.post(url + "/v1/models/load", json={"model": "flux/tiny-flux.safetensors"}) as resp:
                assert resp.status in (200, 202)
            await app[SERVICE].catalog.wait_loaded("flux/tiny-flux.safetensors")
            async with s.get(url + "/v1/models/flux/tiny-flux.safetensors") as resp:
                entry = await resp.json()
            assert entry["status"] == "loaded" and entry["family"] == "flux" and entry["origin"] == "directory"
            async with s.post(url + "/v1/models/load", json={"model": "inside-link.safetensors"}) as resp:
                assert resp.status == 202
            await app[SERVICE].catalog.wait_loaded("inside-link.safetensors")
            status, r = await submit_json(s, url, job_body({"model": "flux/tiny-flux.safetensors", "steps": 2}))
            assert status == 202, r
            assert (await follow_events(s, url, r["job_id"]))[-1]["type"] == "finished"
            # a model that is known but not loaded cannot take jobs
            status, r = await submit_json(s, url, job_body({"model": "sd3-small.safetensors", "steps": 2}))
            assert status == 409 and "not loaded" in r["error"]["message"]

    asyncio.run(body())


def test_token_required_off_loopback_and_checked():
    with pytest.raises(InvalidRequest, match="token"):
        ServiceConfig(host="0.0.0.0").validate()
    with pytest.raises(InvalidRequest, match="token"):
        create_app(make_config(host="192.168.1.10"), policy=FifoPolicy(), cost=FAST_COST)
    ServiceConfig(host="0.0.0.0", token="s3cret").validate()
    ServiceConfig(host="::1").validate()
    ServiceConfig(host="localhost").validate()

    async def body():
        app, _ = make_service_app(token="s3cret")
        async with running_service(app) as url:
            async with aiohttp.ClientSession() as s:
                async with s.get(url + "/v1/health") as resp:
                    assert resp.status == 200  # public
                for path in ("/v1/board", "/v1/models", "/v1/metrics", "/v1/jobs/j-x-1"):
                    async with s.get(url + path) as resp:
                        err = await resp.json()
                    assert resp.status == 401 and err["error"]["code"] == "unauthorized", path
                async with s.get(url + "/v1/board", headers={"Authorization": "Bearer wrong"}) as resp:
                    assert resp.status == 401
                status, _ = await submit_json(s, url, job_body())
                assert status == 401
            async with aiohttp.ClientSession(headers={"Authorization": "Bearer s3cret"}) as s:
                async with s.get(url + "/v1/board") as resp:
                    assert resp.status == 200
                status, r = await submit_json(s, url, job_body({"steps": 2}))
                assert status == 202
                await follow_events(s, url, r["job_id"])

    asyncio.run(body())


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')


def parse_prometheus(text: str) -> dict[str, list[tuple[str, float]]]:
    """A strict reader of the text format: every line a comment or a valid sample."""
    samples: dict[str, list[tuple[str, float]]] = {}
    types = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            types[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample {name} without # TYPE"
        samples.setdefault(name, []).append((labels, float(value)))
    return samples


def test_metrics_parse_and_count():
    async def body():
        app, _ = make_service_app()
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            ids = []
            for tenant, deadline in (("a", 30), ("a", 1e-3), ("b", None)):
                settings = {"steps": 20, "tenant": tenant, "deadline_s": deadline}
                _, r = await submit_json(s, url, job_body(settings, res=512))
                ids.append(r["job_id"])
            for job_id in ids:
                await follow_events(s, url, job_id)
            async with s.get(url + "/v1/metrics") as resp:
                assert resp.content_type == "text/plain"
                text = await resp.text()
        m = parse_prometheus(text)
        assert dict(m["tetriserve_sar"])[""] == 0.5
        assert dict(m["tetriserve_sar"])['{tenant="a"}'] == 0.5
        assert dict(m["tetriserve_deadline_jobs_total"]) == {'{tenant="a"}': 2.0}
        assert sum(v for _, v in m["tetriserve_jobs_ended_total"]) == 3
        busy = dict(m["tetriserve_gpu_busy_seconds_total"])
        assert set(busy) == {f'{{gpu="{g}"}}' for g in range(4)} and busy['{gpu="0"}'] > 0
        assert dict(m["tetriserve_queue_depth"])[""] == 0
        assert dict(m["tetriserve_steps_total"])[""] == 60
        assert dict(m["tetriserve_round_decision_seconds_count"])[""] >= 1
        buckets = [v for _, v in m["tetriserve_round_decision_seconds_bucket"]]
        assert buckets == sorted(buckets) and buckets[-1] == dict(m["tetriserve_round_decision_seconds_count"])[""]
        (drift_labels, drift), *_ = m["tetriserve_step_time_drift_ratio"]
        assert 'model="flux-sim"' in drift_labels and 'sp_degree="1"' in drift_labels
        assert 0.5 < drift < 20 and math.isfinite(drift)

    asyncio.run(body())


def test_openapi_document_is_valid_and_covers_every_route():

    async def body():
        app, _ = make_service_app()
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            async with s.get(url + "/v1/openapi.json") as resp:
                doc = await resp.json()
        return app, doc

    app, doc = asyncio.run(body())
    assert doc["openapi"].startswith("3.1") and doc["info"]["version"]
    for name, schema in doc["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)

    def refs(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "$ref":
                    yield v
                else:
                    yield from refs(v)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v)

    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.split("/")[-1] in doc["components"]["schemas"], ref
    op_ids = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert method in ("get", "post", "delete", "put", "patch")
            assert op["responses"] and all(code.isdigit() for code in op["responses"]), (path, method)
            op_ids.append(op["operationId"])
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"\{(\w+)\}", path)), path
    assert len(op_ids) == len(set(op_ids))
    served = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("formatter") or info.get("path")
        if route.method in ("HEAD", "*") or path is None or not path.startswith("/v1/"):
            continue
        served.add((route.method.lower(), re.sub(r"\{(\w+):[^}]+\}", r"{\1}", path)))
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented, served ^ documented
    # the settings schema accepts what the tests submit and refuses an unknown key
    validator = jsonschema.Draft202012Validator(doc["components"]["schemas"]["JobSettings"])
    validator.validate({"model": "flux-sim", "steps": 8, "deadline_s": 3.5, "job_key": "k1"})
    assert list(validator.iter_errors({"model": "m", "bogus": 1}))


def test_a_reader_that_leaves_an_event_stream_is_not_an_error(caplog):
    async def body():
        app, _ = make_service_app()
        async with running_service(app) as url:
            for _ in range(3):
                async with aiohttp.ClientSession() as s:
                    resp = await s.get(f"{url}/v1/events?after=0")
                    await resp.content.readline()
                    resp.close()  # leave while the service may still be writing
                async with aiohttp.ClientSession() as s:
                    # events keep coming (model loads are idempotent but each submit writes some)
                    status, _ = await submit_json(s, url, job_body({"steps": 2}))
                    assert status == 202
            await asyncio.sleep(0.2)
            async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/health") as resp:
                assert resp.status == 200

    with caplog.at_level("ERROR", logger="comfy_tetriserve"):
        asyncio.run(body())
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]
