"""Hostile and malformed requests, each of which the service must refuse with a 4xx and a clear message.

``CASES`` covers what a confused or hostile client can send: broken safetensors (lying headers,
overlapping or out-of-range tensors, nesting bombs, non-UTF-8), wrong tensors (dtypes, shapes,
NaN and Inf, sizes beyond the limits), path-like and loader-spec model names, protocol abuse
(oversized, chunked, slow, truncated bodies, giant header lines, garbage request lines) and
floods (cancels of one job, cancels of unknown jobs, submits and leases over the per-tenant
limits, event streams over the limit). Each case checks the status class (4xx, and the exact
status where one is right) and that the message names the problem.

Run against a live service while good jobs run (``run_hostile``): every case must be refused,
every good job must finish, and the service must still answer its health check.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import torch
from safetensors.torch import save

from ..client import TetriServeClient
from .reference import JobSpec, make_spec


@dataclass
class Refusal:
    """One case's verdict."""

    name: str
    ok: bool
    statuses: list[int]
    message: str
    requests: int = 1


@dataclass
class Ctx:
    url: str
    host: str
    port: int
    session: aiohttp.ClientSession
    models: dict[str, str]  # family -> served model name
    workdir: Path
    settings: object  # ServiceSettings
    limits: dict = field(default_factory=dict)
    dims: dict[str, tuple[int, int]] = field(default_factory=dict)  # family -> (context width, pooled width)

    @property
    def context_dim(self) -> int:
        return self.dims["flux"][0]

    def tensors(self, **over) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(3)
        context_dim, pooled_dim = self.dims["flux"]
        out = {"latent": torch.zeros(1, 16, 4, 4), "context": torch.randn(1, 4, context_dim, generator=g),
               "pooled": torch.randn(1, pooled_dim, generator=g)}
        out.update(over)
        return out

    def body(self, settings: dict | None = None, meta: dict | None = None, drop: tuple[str, ...] = (),
             **tensors) -> bytes:
        t = {k: v for k, v in self.tensors(**tensors).items() if k not in drop}
        s = {"model": self.models["flux"], "steps": 3, **(settings or {})}
        return save({k: v.contiguous() for k, v in t.items()},
                    metadata=meta if meta is not None else {"tetriserve": json.dumps(s)})


# ------------------------------------------------------------------------------ senders
async def send(ctx: Ctx, method: str, path: str, *, data=None, json_body=None, headers=None) -> tuple[int, str]:
    """(status, error message or body text) of one request."""
    async with ctx.session.request(method, ctx.url + path, data=data, json=json_body, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=30)) as resp:
        text = await resp.text(errors="replace")
    try:
        return resp.status, json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return resp.status, text


async def raw(ctx: Ctx, head: bytes, body: bytes = b"", *, chunks: list[tuple[float, bytes]] = (),
              half_close: bool = False, timeout_s: float = 15.0) -> tuple[int, str]:
    """A hand-written HTTP exchange: ``head`` (request line and headers), then ``body`` and timed
    ``chunks``; ``half_close`` shuts the writing side (a body cut short). Returns (status, body text)."""
    reader, writer = await asyncio.open_connection(ctx.host, ctx.port)

    async def write() -> None:  # the service may answer (and stop reading) before we are done
        with contextlib.suppress(ConnectionError):
            writer.write(head + body)
            await writer.drain()
            for pause, chunk in chunks:
                await asyncio.sleep(pause)
                writer.write(chunk)
                await writer.drain()
            if half_close:
                writer.write_eof()

    writing = asyncio.ensure_future(write())
    try:
        data = await asyncio.wait_for(_read_response(reader), timeout_s)
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        return 0, f"connection dropped without an answer: {exc}"
    finally:
        writing.cancel()
        with contextlib.suppress(BaseException):
            await writing
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    status_line, _, rest = data.partition(b"\r\n")
    parts = status_line.split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    text = rest.partition(b"\r\n\r\n")[2].decode(errors="replace")
    with contextlib.suppress(ValueError, KeyError, TypeError):
        text = json.loads(text)["error"]["message"]
    return status, text


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    body = await reader.readexactly(length) if length else b""
    return head + body


def post_head(ctx: Ctx, path: str, length: int | None, extra: str = "") -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {ctx.host}:{ctx.port}", "Content-Type: application/octet-stream"]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + extra + "\r\n\r\n").encode()


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw_header = json.dumps(header).encode()
    return struct.pack("<Q", len(raw_header)) + raw_header + data


# ------------------------------------------------------------------------------ cases
Check = Callable[[Ctx], Awaitable[Refusal]]
CASES: list[tuple[str, Check]] = []


def case(name: str):
    def register(fn: Check) -> Check:
        CASES.append((name, fn))
        return fn
    return register


def expect(name: str, got: tuple[int, str], status: int | tuple[int, ...], *words: str) -> Refusal:
    code, message = got
    statuses = (status,) if isinstance(status, int) else status
    ok = code in statuses and all(w.lower() in message.lower() for w in words) and bool(message.strip())
    return Refusal(name, ok, [code], message[:300])


def submit_case(name: str, status: int, *words: str, headers: dict | None = None):
    """A case that posts one body built by ``make(ctx)``."""
    def wrap(make: Callable[[Ctx], bytes]):
        async def check(ctx: Ctx) -> Refusal:
            return expect(name, await send(ctx, "POST", "/v1/jobs", data=make(ctx), headers=headers), status, *words)
        CASES.append((name, check))
        return make
    return wrap


# --- broken safetensors
submit_case("header length beyond the body", 400, "header")(lambda c: struct.pack("<Q", 2**40) + b"{}")
submit_case("header not UTF-8", 400, "safetensors")(lambda c: struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc")
_NESTED = b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
submit_case("header nested 100000 deep", 400, "nested")(lambda c: struct.pack("<Q", len(_NESTED)) + _NESTED)
submit_case("tensor shape larger than its bytes", 400, "safetensors")(lambda c: safetensors_bytes(
    {"__metadata__": {"tetriserve": json.dumps({"model": c.models["flux"], "steps": 2})},
     "latent": {"dtype": "F32", "shape": [1, 16, 1000, 1000], "data_offsets": [0, 64]}}, b"\0" * 64))
submit_case("overlapping tensor offsets", 400, "safetensors")(lambda c: safetensors_bytes(
    {"__metadata__": {"tetriserve": json.dumps({"model": c.models["flux"], "steps": 2})},
     "latent": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
     "context": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16))
submit_case("settings nested 50000 deep", 400, "nested")(
    lambda c: c.body(meta={"tetriserve": "[" * 50_000 + "]" * 50_000}))
submit_case("settings with NaN", 400, "finite")(
    lambda c: c.body(meta={"tetriserve": json.dumps({"model": c.models["flux"], "steps": 2, "cfg": float("nan")})}))
submit_case("a pickle instead of safetensors", 400, "safetensors")(
    lambda c: b"\x80\x04\x95" + b"\x00" * 8 + b"cos\nsystem\n(S'true'\ntR.")
# --- content codings the body does not have, or the service does not take
submit_case("gzip body that is not gzip", 400, "does not decode", headers={"Content-Encoding": "gzip"})(
    lambda c: b"\x1f\x8b\x08" + b"certainly not a deflate stream")
submit_case("deflate body that is not deflate", 400, "does not decode", headers={"Content-Encoding": "deflate"})(
    lambda c: c.body())
submit_case("brotli body (a coding the service does not take)", 415, "br", headers={"Content-Encoding": "br"})(
    lambda c: c.body())
submit_case("zstd body (a coding the service does not take)", 415, "zstd", headers={"Content-Encoding": "zstd"})(
    lambda c: c.body())
# --- wrong tensors
submit_case("integer latent", 400, "floating")(lambda c: c.body(latent=torch.zeros(1, 16, 4, 4, dtype=torch.int64)))
submit_case("boolean context", 400, "floating")(
    lambda c: c.body(context=torch.ones(1, 4, c.context_dim, dtype=torch.bool)))
submit_case("NaN in the latent", 400, "NaN")(lambda c: c.body(latent=torch.full((1, 16, 4, 4), float("nan"))))
submit_case("Inf in the sigmas", 400, "Inf")(
    lambda c: c.body({"steps": None}, sigmas=torch.tensor([float("inf"), 0.5, 0.0])))
submit_case("latent of an SDXL (4 channels)", 400, "channels")(lambda c: c.body(latent=torch.zeros(1, 4, 4, 4)))
submit_case("context of another model's width", 400, "context")(
    lambda c: c.body(context=torch.zeros(1, 4, 2 * c.context_dim + 8)))
submit_case("image beyond the token limit", 400, "tokens")(
    lambda c: c.body(latent=torch.zeros(1, 16, 2, 2 * c.limits["max_image_tokens"] + 2)))
submit_case("batch beyond the limit", 400, "batch")(lambda c: c.body(latent=torch.zeros(17, 16, 2, 2)))
submit_case("sigmas going up", 400, "sigmas")(lambda c: c.body({"steps": None}, sigmas=torch.tensor([0.2, 0.9, 0.0])))
submit_case("cfg without a negative", 400, "neg_context")(lambda c: c.body({"cfg": 4.0}))
submit_case("no pooled tensor", 400, "pooled")(lambda c: c.body(drop=("pooled",)))
# --- settings
submit_case("steps beyond the limit", 400, "steps")(lambda c: c.body({"steps": 10**9}))
submit_case("denoise of 1e-300 (a schedule of 1e303 steps)", 400, "too small")(
    lambda c: c.body({"steps": 1000, "denoise": 1e-300}))
submit_case("deadline in the past", 400, "deadline")(lambda c: c.body({"deadline_s": -1}))
submit_case("unknown sampler", 400, "sampler")(lambda c: c.body({"sampler": "rm -rf /"}))
submit_case("tenant of 300 characters", 400, "tenant")(lambda c: c.body({"tenant": "t" * 300}))
submit_case("job key with a path in it", 400, "job_key")(lambda c: c.body({"job_key": "../../etc/passwd"}))
submit_case("idempotency header with spaces", 400, "Idempotency-Key", headers={"Idempotency-Key": "a b"})(
    lambda c: c.body())
submit_case("unknown lease", 404, "lease")(lambda c: c.body({"lease": "l-nope-0000"}))
# --- model names that look like paths or loader specs
submit_case("model ../../etc/passwd", 400, "..")(lambda c: c.body({"model": "../../etc/passwd"}))
submit_case("model /etc/passwd", 400, "absolute")(lambda c: c.body({"model": "/etc/passwd"}))
submit_case("model C:\\Windows\\win.ini", 400, "backslash")(lambda c: c.body({"model": "C:\\Windows\\win.ini"}))
submit_case("model with a NUL byte", 400, "control")(lambda c: c.body({"model": "tiny-flux.safetensors\0.txt"}))
submit_case("model random:flux-dev (a loader spec)", 404, "unknown model")(
    lambda c: c.body({"model": "random:flux-dev"}))
submit_case("model ~/.ssh/id_rsa", 404, "unknown model")(lambda c: c.body({"model": "~/.ssh/id_rsa"}))


@case("model loaded through a symlink out of the folder")
async def _symlink_load(ctx: Ctx) -> Refusal:
    outside = ctx.workdir / "outside.safetensors"
    link = ctx.workdir / "models" / "escape.safetensors"
    if not outside.exists():
        outside.write_bytes(b"whatever lies outside the model folder")
    if not link.is_symlink():
        os.symlink(outside, link)
    got = await send(ctx, "POST", "/v1/models/load", json_body={"model": "escape.safetensors"})
    return expect("model loaded through a symlink out of the folder", got, 400, "outside")


@case("model load by path")
async def _load_path(ctx: Ctx) -> Refusal:
    got = await send(ctx, "POST", "/v1/models/load", json_body={"model": "../models/tiny-flux.safetensors"})
    return expect("model load by path", got, 400, "..")


@case("model load with a 'path' field")
async def _load_field(ctx: Ctx) -> Refusal:
    got = await send(ctx, "POST", "/v1/models/load", json_body={"model": "x", "path": "/etc/passwd"})
    return expect("model load with a 'path' field", got, 400, "unknown field")


@case("model status of ..%2F..%2Fetc%2Fpasswd")
async def _model_status(ctx: Ctx) -> Refusal:
    got = await raw(ctx, f"GET /v1/models/..%2F..%2Fetc%2Fpasswd HTTP/1.1\r\nHost: {ctx.host}\r\n\r\n".encode())
    return expect("model status of ..%2F..%2Fetc%2Fpasswd", got, 400, "..")


# --- other routes
@case("lease body nested 30000 deep")
async def _lease_nested(ctx: Ctx) -> Refusal:
    got = await send(ctx, "POST", "/v1/leases", data=b'{"a":' + b"[" * 30_000 + b"]" * 30_000 + b"}")
    return expect("lease body nested 30000 deep", got, 400, "nested")


@case("job id of 4000 characters")
async def _long_id(ctx: Ctx) -> Refusal:
    return expect("job id of 4000 characters", await send(ctx, "GET", "/v1/jobs/" + "j" * 4000), 404, "unknown job")


@case("events after a negative sequence number")
async def _bad_after(ctx: Ctx) -> Refusal:
    got = await send(ctx, "GET", "/v1/events?after=-5")
    return expect("events after a negative sequence number", got, 400, "after")


@case("board window of NaN seconds")
async def _bad_window(ctx: Ctx) -> Refusal:
    return expect("board window of NaN seconds", await send(ctx, "GET", "/v1/board?window_s=nan"), 400, "window_s")


@case("DELETE on the job list")
async def _wrong_method(ctx: Ctx) -> Refusal:
    return expect("DELETE on the job list", await send(ctx, "DELETE", "/v1/jobs"), 405, "not allowed")


# --- protocol abuse
@case("Content-Length of a terabyte")
async def _huge_length(ctx: Ctx) -> Refusal:
    got = await raw(ctx, post_head(ctx, "/v1/jobs", 10**12))
    return expect("Content-Length of a terabyte", got, 413, "large")


@case("chunked body over the size limit")
async def _chunked(ctx: Ctx) -> Refusal:
    limit = int(ctx.settings.max_body_mb * 1024 * 1024)
    piece = b"\0" * (1 << 20)
    chunks = [(0.0, b"%x\r\n" % len(piece) + piece + b"\r\n") for _ in range(limit // len(piece) + 2)]
    got = await raw(ctx, post_head(ctx, "/v1/jobs", None), chunks=chunks + [(0.0, b"0\r\n\r\n")])
    return expect("chunked body over the size limit", got, 413, "large")


@case("body trickling slower than the timeout")
async def _slow(ctx: Ctx) -> Refusal:
    body = ctx.body()
    got = await raw(ctx, post_head(ctx, "/v1/jobs", len(body)), body[:16],
                    chunks=[(ctx.settings.body_timeout_s + 1.0, body[16:32])])
    return expect("body trickling slower than the timeout", got, 408, "not received")


async def http_errors(ctx: Ctx, status: int) -> int:
    """The service's count of answers with ``status`` (its metrics)."""
    async with ctx.session.get(ctx.url + "/v1/metrics") as resp:
        text = await resp.text()
    prefix = f'tetriserve_http_errors_total{{status="{status}"}} '
    return next((int(float(line[len(prefix):])) for line in text.splitlines() if line.startswith(prefix)), 0)


@case("body cut short (half-closed connection)")
async def _truncated(ctx: Ctx) -> Refusal:
    """The client leaves mid-body: the service refuses the request (400, counted in its metrics) even
    though the answer cannot reach a client that is gone, and carries on."""
    body = ctx.body()
    before = await http_errors(ctx, 400)
    got = await raw(ctx, post_head(ctx, "/v1/jobs", len(body)), body[: len(body) // 2], half_close=True)
    counted = await http_errors(ctx, 400) - before
    if got[0] == 0:  # aiohttp closes a half-closed connection: no answer can be read
        return Refusal("body cut short (half-closed connection)", counted == 1, [400] if counted else [0],
                       f"refused with 400 (counted by the service; the client had left): {got[1]}")
    return expect("body cut short (half-closed connection)", got, 400, "cut short")


@case("header line of 20000 bytes")
async def _long_header(ctx: Ctx) -> Refusal:
    got = await raw(ctx, f"GET /v1/health HTTP/1.1\r\nHost: {ctx.host}\r\nX-Junk: {'x' * 20000}\r\n\r\n".encode())
    return Refusal("header line of 20000 bytes", 400 <= got[0] < 500 and bool(got[1].strip()), [got[0]], got[1][:300])


@case("garbage request line")
async def _garbage(ctx: Ctx) -> Refusal:
    got = await raw(ctx, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n")
    return Refusal("garbage request line", 400 <= got[0] < 500 and bool(got[1].strip()), [got[0]], got[1][:300])


# --- conflicts and floods
async def _long_job(ctx: Ctx, tenant: str = "hostile", key: str | None = None) -> str:
    body = ctx.body({"steps": 400, "tenant": tenant})
    async with ctx.session.post(ctx.url + "/v1/jobs", data=body,
                                headers={"Idempotency-Key": key or uuid.uuid4().hex}) as resp:
        receipt = await resp.json()
    if resp.status != 202:
        raise RuntimeError(f"a good long job was refused: {resp.status} {receipt}")
    return receipt["job_id"]


@case("same job key, different body")
async def _key_reuse(ctx: Ctx) -> Refusal:
    key = "reused-" + uuid.uuid4().hex[:8]
    job_id = await _long_job(ctx, key=key)
    got = await send(ctx, "POST", "/v1/jobs", data=ctx.body({"steps": 5, "tenant": "hostile"}),
                     headers={"Idempotency-Key": key})
    result = await send(ctx, "GET", f"/v1/jobs/{job_id}/result")
    await send(ctx, "POST", f"/v1/jobs/{job_id}/cancel")
    verdict = expect("same job key, different body", got, 409, "different body")
    ok_result = result[0] == 409 and "only once it finished" in result[1]
    return Refusal(verdict.name + " (and its result while running)", verdict.ok and ok_result,
                   verdict.statuses + [result[0]], verdict.message, 3)


@case("flood of 50 cancels of one job")
async def _cancel_flood(ctx: Ctx) -> Refusal:
    job_id = await _long_job(ctx)
    answers = await asyncio.gather(*(send(ctx, "POST", f"/v1/jobs/{job_id}/cancel") for _ in range(50)))
    codes = [code for code, _ in answers]
    conflicts = [msg for code, msg in answers if code == 409]
    ok = codes.count(202) == 1 and len(conflicts) == 49 and all("cancel" in m for m in conflicts)
    return Refusal("flood of 50 cancels of one job", ok, sorted(set(codes)), conflicts[0] if conflicts else "", 50)


@case("flood of 100 cancels of unknown jobs")
async def _unknown_flood(ctx: Ctx) -> Refusal:
    answers = await asyncio.gather(*(send(ctx, "POST", f"/v1/jobs/j-{uuid.uuid4().hex[:8]}-{i:06d}/cancel")
                                     for i in range(100)))
    ok = all(code == 404 and "earlier run" in msg for code, msg in answers)
    return Refusal("flood of 100 cancels of unknown jobs", ok, sorted({c for c, _ in answers}), answers[0][1], 100)


@case("flood of submits over the per-tenant limit")
async def _submit_flood(ctx: Ctx) -> Refusal:
    limit = ctx.limits["max_open_jobs_per_tenant"]
    tenant = "flood-" + uuid.uuid4().hex[:6]
    # long jobs (the most steps at the largest image the limits allow), so none ends while the flood is parsed
    side = max(2, int(min(1024, ctx.limits.get("max_image_tokens", 1024)) ** 0.5)) * 2
    big = {"latent": torch.zeros(1, 16, side, side)}
    answers = await asyncio.gather(*(send(ctx, "POST", "/v1/jobs", data=ctx.body({"steps": 1000, "tenant": tenant,
                                                                                  "seed": i}, **big))
                                     for i in range(limit + 8)))
    ended = 0
    async with ctx.session.get(f"{ctx.url}/v1/jobs?tenant={tenant}") as resp:
        for job in (await resp.json())["jobs"]:
            if job["status"] in ("finished", "failed"):
                ended += 1  # ended during the flood: its slot was free again for a later submit
            await send(ctx, "POST", f"/v1/jobs/{job['job_id']}/cancel")
    codes = [c for c, _ in answers]
    refused = [m for c, m in answers if c == 429]
    accepted = codes.count(202)
    ok = (limit <= accepted <= limit + ended and len(refused) == len(answers) - accepted >= 1
          and all("per-tenant limit" in m for m in refused))
    return Refusal("flood of submits over the per-tenant limit", ok, sorted(set(codes)), refused[0] if refused else "",
                   len(answers))


@case("flood of leases over the per-tenant limit")
async def _lease_flood(ctx: Ctx) -> Refusal:
    limit = ctx.limits["max_leases_per_tenant"]
    tenant = "leaser-" + uuid.uuid4().hex[:6]
    answers = []
    for _ in range(limit + 4):
        async with ctx.session.post(ctx.url + "/v1/leases", json={"tenant": tenant, "ttl_s": 5}) as resp:
            body = await resp.json()
            answers.append((resp.status, body.get("lease") or body["error"]["message"]))
    for code, lease in answers:
        if code == 201:
            await send(ctx, "DELETE", f"/v1/leases/{lease}")
    refused = [m for c, m in answers if c == 429]
    ok = [c for c, _ in answers].count(201) == limit and len(refused) == 4 and all("per-tenant" in m for m in refused)
    return Refusal("flood of leases over the per-tenant limit", ok, sorted({c for c, _ in answers}),
                   refused[0] if refused else "", len(answers))


@case("flood of event streams over the limit")
async def _stream_flood(ctx: Ctx) -> Refusal:
    limit = ctx.limits["max_event_streams"]
    opened: list[aiohttp.ClientResponse] = []
    codes, message = [], ""
    try:
        for _ in range(limit + 5):
            resp = await ctx.session.get(ctx.url + "/v1/events?after=0")
            codes.append(resp.status)
            if resp.status == 200:
                opened.append(resp)
            else:
                message = (await resp.json())["error"]["message"]
                resp.release()
                break
    finally:
        for resp in opened:
            resp.close()
    ok = codes[-1] == 429 and "event streams are open" in message and len(opened) <= limit
    return Refusal("flood of event streams over the limit", ok, sorted(set(codes)), message, len(codes))


# ------------------------------------------------------------------------------ the run
@dataclass
class HostileReport:
    cases: list[Refusal] = field(default_factory=list)
    sent: int = 0
    refused: int = 0
    requests: int = 0
    good_jobs: int = 0
    good_finished: int = 0
    service_alive: bool = False
    duration_s: float = 0.0

    @property
    def failures(self) -> list[Refusal]:
        return [c for c in self.cases if not c.ok]


async def model_dims(url: str, models: dict[str, str]) -> dict[str, tuple[int, int]]:
    """family -> (context width, pooled width) of the served models."""
    async with TetriServeClient(url) as client:
        listed = {m["name"]: m for m in await client.models()}
    return {family: (listed[name]["context_dim"], listed[name]["pooled_dim"]) for family, name in models.items()}


async def run_hostile(url: str, models: dict[str, str], workdir: Path, settings, limits: dict,
                      timeout_s: float = 300.0) -> HostileReport:
    """Every case in ``CASES``, one after another, while a client keeps submitting good jobs.

    ``models``: family -> served model name; ``workdir``: the folder whose ``models`` subfolder is
    the service's ``--model-dir``; ``settings`` has ``max_body_mb`` and ``body_timeout_s``;
    ``limits`` the service's ``max_open_jobs_per_tenant``, ``max_leases_per_tenant``,
    ``max_event_streams`` and ``max_image_tokens``.
    """
    report = HostileReport()
    dims = await model_dims(url, models)
    host, port = url.split("//")[1].rsplit(":", 1)
    t0 = time.monotonic()
    stop = asyncio.Event()
    good: list[JobSpec] = []
    finished: list[str] = []

    async def good_client() -> None:
        from .workload import run_job

        async with TetriServeClient(url, timeout_s=60) as client:
            i = 0
            while not stop.is_set() or i < 3:
                spec = make_spec(700_000 + i, models, steps=(3, 6), resolutions=(16, 32), dims=dims)
                good.append(spec)
                out = await run_job(client, spec, "fetch", tenant="good",
                                    timeout_s=max(t0 + timeout_s - time.monotonic(), 5))
                if out.status == "finished":
                    finished.append(out.job_id)
                i += 1

    async with aiohttp.ClientSession() as session:
        ctx = Ctx(url, host, int(port), session, models, workdir, settings, limits, dims)
        runner = asyncio.ensure_future(good_client())
        try:
            for name, check in CASES:
                try:
                    verdict = await asyncio.wait_for(check(ctx), 60)
                except Exception as exc:  # noqa: BLE001 - a case that breaks is a failed case, reported
                    verdict = Refusal(name, False, [], f"the check itself failed: {type(exc).__name__}: {exc}")
                report.cases.append(verdict)
                report.requests += verdict.requests
                async with session.get(url + "/v1/health") as resp:  # still serving after each one
                    if resp.status != 200:
                        report.cases.append(Refusal(f"health after {name}", False, [resp.status], "not healthy"))
        finally:
            stop.set()
            await asyncio.wait_for(runner, timeout_s)
        async with session.get(url + "/v1/health") as resp:
            report.service_alive = resp.status == 200 and (await resp.json())["status"] == "ok"
    report.sent = len(CASES)
    report.refused = sum(1 for c in report.cases if c.ok)
    report.good_jobs = len(good)
    report.good_finished = len(finished)
    report.duration_s = time.monotonic() - t0
    return report
