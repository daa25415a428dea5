"""HTTP edges of the service: content codings, slow headers, the generated OpenAPI document, and a bare
``serve`` on simulated devices (which offers simulated FLUX and SD3 so a first submit works)."""
from __future__ import annotations

import asyncio
import gzip
import time
import zlib

import aiohttp
import pytest
from openapi_spec_validator import validate as validate_openapi

from comfy_tetriserve.core.sim_executor import SimulatedExecutor
from comfy_tetriserve.service.app import create_app
from comfy_tetriserve.service.encoding import decode_body
from comfy_tetriserve.service.openapi import openapi_document
from comfy_tetriserve.service.settings import ServiceConfig
from comfy_tetriserve.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from service_helpers import FAST_COST, job_body, make_service_app, running_service


async def raw_exchange(url: str, data: bytes, wait_s: float = 10.0) -> tuple[bytes, float]:
    """Send ``data`` on a fresh connection; the bytes answered until the server closes, and when."""
    host, port = url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    writer.write(data)
    await writer.drain()
    try:
        answer = await asyncio.wait_for(reader.read(), wait_s)
    finally:
        writer.close()
    return answer, time.monotonic() - started


def post(path: str, body: bytes, encoding: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


def test_decode_body_undoes_gzip_and_deflate_and_bounds_the_size():
    data = job_body()
    assert decode_body(gzip.compress(data), "gzip", 1 << 30) == data
    assert decode_body(zlib.compress(data), "deflate", 1 << 30) == data
    assert decode_body(zlib.compress(data)[2:-4], "deflate", 1 << 30) == data  # raw deflate, as some clients send
    assert decode_body(gzip.compress(zlib.compress(data)), "deflate, gzip", 1 << 30) == data
    assert decode_body(data, "identity", 1 << 30) == data
    bomb = gzip.compress(bytes(50 << 20))  # 50 MiB of zeros in ~50 KB
    with pytest.raises(PayloadTooLarge):
        decode_body(bomb, "gzip", 1 << 20)
    with pytest.raises(InvalidRequest, match="cut short"):
        decode_body(gzip.compress(data)[:-100], "gzip", 1 << 30)
    with pytest.raises(UnsupportedMediaType):
        decode_body(data, "br", 1 << 30)


def test_bad_content_codings_get_json_errors_and_slow_headers_are_cut():
    async def body():
        app, _ = make_service_app(header_timeout_s=1.0)
        async with running_service(app) as url:
            answers = {}
            for encoding in ("gzip", "deflate", "br", "zstd", "compress"):
                answer, _ = await raw_exchange(url, post("/v1/jobs", b"certainly not compressed", encoding))
                answers[encoding] = answer
            # a header that never ends is closed after header_timeout_s, not held for minutes
            half, held_s = await raw_exchange(url, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: a")
            async with aiohttp.ClientSession() as s:
                async with s.post(url + "/v1/jobs", data=gzip.compress(job_body()),
                                  headers={"Content-Encoding": "gzip"}) as resp:
                    gz_status = resp.status
                async with s.post(url + "/v1/leases", data=zlib.compress(b'{"tenant": "t1"}'),
                                  headers={"Content-Encoding": "deflate"}) as resp:
                    lease_status, lease = resp.status, await resp.json()
        return answers, half, held_s, gz_status, lease_status, lease

    answers, half, held_s, gz_status, lease_status, lease = asyncio.run(body())
    for encoding, answer in answers.items():
        head, _, payload = answer.partition(b"\r\n\r\n")
        status = 400 if encoding in ("gzip", "deflate") else 415
        assert head.startswith(f"HTTP/1.1 {status}".encode()), (encoding, answer[:200])
        assert b"application/json" in head, (encoding, head)
        assert f'"status": {status}'.encode() in payload, payload
        assert (b"does not decode as" if status == 400 else b"is not supported") in payload, payload
    assert b"unsupported_media_type" in answers["br"] and b"unsupported_media_type" in answers["zstd"]
    assert half == b"" and 0.5 < held_s < 5.0, (half, held_s)
    assert gz_status == 202 and lease_status == 201 and lease["tenant"] == "t1"


def test_openapi_document_is_generated_and_valid_openapi_3_1():
    doc = openapi_document()
    validate_openapi(doc)  # raises on any violation of the OpenAPI 3.1 schema
    assert doc["openapi"] == "3.1.0"
    settings = doc["components"]["schemas"]["JobSettings"]
    # generated from the JobSettings annotations: every field and the sampler names the service runs
    from comfy_tetriserve.sampling.names import SAMPLER_NAMES
    from comfy_tetriserve.service.schemas import SETTINGS_FIELDS

    assert set(settings["properties"]) == set(SETTINGS_FIELDS) and settings["additionalProperties"] is False
    assert settings["properties"]["sampler"]["enum"] == list(SAMPLER_NAMES)
    assert settings["properties"]["steps"]["type"] == ["integer", "null"]


def test_openapi_paths_come_from_the_route_table():
    """Every API route is in the document with its path parameters, and a route without an operation
    cannot slip through: building the paths refuses it."""
    from aiohttp import web

    from comfy_tetriserve.service.openapi import documented, paths_of
    from comfy_tetriserve.service.routes import routes

    doc = openapi_document()
    api = {(r.method.lower(), r.path.replace("{name:.+}", "{name}")) for r in routes
           if hasattr(r, "handler") and r.path.startswith("/v1/")}
    assert api == {(m, p) for p, ops in doc["paths"].items() for m in ops}
    model = doc["paths"]["/v1/models/{name}"]["get"]["parameters"]
    assert model == [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    cancel = doc["paths"]["/v1/jobs/{job_id}/cancel"]["post"]
    assert [p["name"] for p in cancel["parameters"]] == ["job_id"] and set(cancel["responses"]) >= {"202", "404"}

    extra = web.RouteTableDef()

    @extra.get("/v1/things/{thing_id}")
    @documented("thing", "A thing", ok={200: ("thing", "Job")}, errors=(404,))
    async def thing(request):  # pragma: no cover - never served
        return web.Response()

    @extra.get("/v1/undocumented")
    async def undocumented(request):  # pragma: no cover - never served
        return web.Response()

    with pytest.raises(TypeError, match="undocumented"):
        paths_of(extra)
    one = paths_of([r for r in extra if r.handler is thing])
    assert one["/v1/things/{thing_id}"]["get"]["parameters"][0]["name"] == "thing_id"


def test_a_bare_serve_on_sim_devices_offers_flux_and_sd3():
    async def body():
        config = ServiceConfig(devices="sim:2", journal="off", housekeeping_s=0.05)
        app = create_app(config, executor=SimulatedExecutor(2, FAST_COST), cost=FAST_COST)
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            async with s.get(url + "/v1/models") as resp:
                models = {m["name"]: m for m in (await resp.json())["models"]}
            async with s.post(url + "/v1/jobs", data=job_body({"model": "flux-dev", "steps": 2})) as resp:
                status, job = resp.status, await resp.json()
            for _ in range(500):
                async with s.get(f"{url}/v1/jobs/{job['job_id']}") as resp:
                    state = (await resp.json())["status"]
                if state == "finished":
                    break
                await asyncio.sleep(0.01)
        return models, status, state

    models, status, state = asyncio.run(body())
    assert {"flux-dev", "sd3-medium"} <= set(models)
    assert models["flux-dev"]["family"] == "flux" and models["sd3-medium"]["family"] == "sd3"
    assert status == 202 and state == "finished"
