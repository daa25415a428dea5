"""Async client of the scheduler service (API v1): one method per route, typed errors.

    async with TetriServeClient() as client:              # TETRISERVE_URL / TETRISERVE_TOKEN
        async with client.lease(tenant="alice") as lease:  # heartbeats in the background
            job = await client.submit(encode_job(tensors, {"model": "flux-dev", "steps": 28,
                                                           "deadline_s": 20, "lease": lease}))
            await client.wait(job["job_id"], on_event=print)
            tensors, meta = decode_result(await client.result(job["job_id"]))

Errors are the package's own classes (comfy_tetriserve.errors), rebuilt from the service's
JSON error body (``code``), plus ``JobFailed``, ``JobCancelled`` and ``ServiceRestarted``
(the service came back without the job: submit again). An unreachable service raises
``ServiceUnavailable`` after a few retries, never hangs: event streams carry a ping line every
few seconds and the client's read timeout is a multiple of that.

Retries: reads, heartbeats and cancels are retried on connection errors; ``submit`` too, with
an ``Idempotency-Key`` header (one is generated when the caller gives none), so a retried
submit never makes a second job. A job the service lost in a restart (it was killed while the
job ran) raises ``ServiceRestarted`` with the service's own words (its journal remembers the
job); ``generate`` then submits it once more under the same job key, which starts a fresh run.

ComfyUI runs each prompt in a fresh event loop: a client's HTTP session belongs to the loop
that made it, and a client used from another loop quietly starts a new one. Prefer one
``async with TetriServeClient()`` per execution.

Imports neither torch nor safetensors at module level (``encode_job``/``decode_result`` do,
when called).
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from . import config as config_module
from .errors import (
    Conflict,
    Gone,
    InvalidRequest,
    JobLost,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    TetriServeError,
    TooManyRequests,
    Unauthorized,
    WorkerError,
)

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8189"
TERMINAL = ("finished", "failed", "cancelled")
EVENTS_READ_TIMEOUT_S = 45.0  # the service pings every 10 s by default


class JobFailed(TetriServeError):
    code = "job_failed"

    def __init__(self, job_id: str, message: str, status: dict | None = None) -> None:
        super().__init__(f"job {job_id} failed: {message}")
        self.job_id = job_id
        self.status = status or {}


class JobCancelled(TetriServeError):
    code = "job_cancelled"

    def __init__(self, job_id: str, reason: str | None, status: dict | None = None) -> None:
        super().__init__(f"job {job_id} was cancelled ({reason or 'no reason given'})")
        self.job_id = job_id
        self.reason = reason
        self.status = status or {}


class ServiceRestarted(TetriServeError):
    """The service stopped or restarted under the job, which is gone: submit it again (the same
    settings give the same image)."""

    code = "service_restarted"


_BY_CODE: dict[str, type[TetriServeError]] = {
    cls.code: cls for cls in (InvalidRequest, NotFound, Gone, JobLost, Conflict, PayloadTooLarge, RequestTimeout,
                              Unauthorized, TooManyRequests, ServiceUnavailable, WorkerError)
}
_BY_STATUS: dict[int, type[TetriServeError]] = {
    400: InvalidRequest, 401: Unauthorized, 404: NotFound, 408: RequestTimeout, 409: Conflict, 410: Gone,
    413: PayloadTooLarge, 429: TooManyRequests, 503: ServiceUnavailable,
}


def error_from_response(status: int, body: bytes) -> TetriServeError:
    """The typed error for an HTTP error answer of the service."""
    code, message = None, body.decode("utf-8", "replace")[:500] or f"HTTP {status}"
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        err = json.loads(body)["error"]
        code, message = err.get("code"), err.get("message", message)
    cls = _BY_CODE.get(code or "") or _BY_STATUS.get(status)
    if cls is None:
        cls = InvalidRequest if 400 <= status < 500 else TetriServeError
    exc = cls(message)
    exc.http_status = status  # type: ignore[misc]
    return exc


def _boot_of(job_id: str) -> str | None:
    parts = job_id.split("-")
    return parts[1] if len(parts) == 3 and parts[0] == "j" else None


class TetriServeClient:
    """See the module docstring. ``retries`` applies to connection errors only."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout_s: float = 30.0,
                 retries: int = 3, backoff_s: float = 0.25, events_read_timeout_s: float = EVENTS_READ_TIMEOUT_S) -> None:
        self.url = (url or config_module.env("TETRISERVE_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else config_module.env("TETRISERVE_TOKEN")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.events_read_timeout_s = events_read_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> "TetriServeClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None and self._loop is asyncio.get_running_loop():
            await self._session.close()
        self._session = None
        self._loop = None

    def _http(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(
                total=None, connect=min(self.timeout_s, 10.0), sock_read=self.timeout_s))
            self._loop = loop
        return self._session

    async def _request(self, method: str, path: str, *, json_body: Any = None, data: bytes | None = None,
                       headers: dict | None = None, retry: bool = True, want: str = "json",
                       ok_on_retry: tuple[type[TetriServeError], ...] = ()) -> Any:
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                async with self._http().request(method, self.url + path, json=json_body, data=data,
                                                headers=headers) as resp:
                    body = await resp.read()
                    if resp.status >= 400:
                        raise error_from_response(resp.status, body)
                    if want == "bytes":
                        return body
                    if want == "text":
                        return body.decode("utf-8")
                    return json.loads(body)
            except TetriServeError as exc:
                if attempt and isinstance(exc, ok_on_retry):  # the lost first attempt did it
                    log.info("%s %s after a retry: %s (treated as done)", method, path, exc)
                    return None
                raise
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as exc:
                if attempt + 1 < attempts:
                    await asyncio.sleep(self.backoff_s * 2 ** attempt)
                    continue
                raise ServiceUnavailable(f"scheduler service at {self.url} unreachable: "
                                         f"{type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    # -------------------------------------------------------------- service
    async def health(self) -> dict:
        return await self._request("GET", "/v1/health")

    async def openapi(self) -> dict:
        return await self._request("GET", "/v1/openapi.json")

    async def executor(self) -> dict:
        """The devices' health: recovery state, faults, restarts, each worker (``GET /v1/executor``)."""
        return await self._request("GET", "/v1/executor")

    async def metrics(self) -> str:
        return await self._request("GET", "/v1/metrics", want="text")

    async def board(self, window_s: float | None = None) -> dict:
        query = f"?window_s={window_s}" if window_s is not None else ""
        return await self._request("GET", "/v1/board" + query)

    # --------------------------------------------------------------- models
    async def models(self) -> list[dict]:
        return (await self._request("GET", "/v1/models"))["models"]

    async def model(self, name: str) -> dict:
        return await self._request("GET", "/v1/models/" + quote(name, safe="/"))

    async def load_model(self, model: str, dtype: str | None = None, *, wait: bool = True,
                         timeout_s: float = 1800.0, poll_s: float = 0.5) -> dict:
        """Ask the service to load ``model`` (configured name or file name); wait for it unless told not to."""
        body = {"model": model, **({"dtype": dtype} if dtype else {})}
        entry = await self._request("POST", "/v1/models/load", json_body=body)
        deadline = time.monotonic() + timeout_s
        while wait and entry["status"] == "loading":
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"model {model!r} still loading after {timeout_s:g} s")
            await asyncio.sleep(poll_s)
            entry = await self.model(model)
        if wait and entry["status"] == "failed":
            raise Conflict(f"model {model!r} failed to load: {entry.get('error')}")
        return entry

    async def unload_model(self, model: str) -> dict:
        """Free ``model``'s weights on every worker; it stays servable (a later job loads it again)."""
        return await self._request("POST", "/v1/models/unload", json_body={"model": model})

    # --------------------------------------------------------------- leases
    async def create_lease(self, tenant: str | None = None, ttl_s: float | None = None) -> dict:
        body = {k: v for k, v in (("tenant", tenant), ("ttl_s", ttl_s)) if v is not None}
        return await self._request("POST", "/v1/leases", json_body=body, retry=False)

    async def heartbeat(self, lease_id: str) -> dict:
        return await self._request("POST", f"/v1/leases/{quote(lease_id)}/heartbeat")

    async def release_lease(self, lease_id: str) -> dict | None:
        return await self._request("DELETE", f"/v1/leases/{quote(lease_id)}", ok_on_retry=(NotFound,))

    @contextlib.asynccontextmanager
    async def lease(self, tenant: str | None = None, ttl_s: float | None = None,
                    interval_s: float | None = None) -> AsyncIterator[str]:
        """A lease kept alive while the block runs; released on exit (cancelling its unfinished jobs)."""
        info = await self.create_lease(tenant, ttl_s)
        lease_id = info["lease"]
        period = interval_s if interval_s is not None else max(info["ttl_s"] / 3.0, 0.05)

        async def beat() -> None:
            while True:
                await asyncio.sleep(period)
                try:
                    await self.heartbeat(lease_id)
                except TetriServeError as exc:
                    log.warning("heartbeat of lease %s failed: %s", lease_id, exc)

        task = asyncio.ensure_future(beat())
        try:
            yield lease_id
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(TetriServeError):
                await self.release_lease(lease_id)

    # ----------------------------------------------------------------- jobs
    async def submit(self, body: bytes, *, job_key: str | None = None, lease: str | None = None) -> dict:
        """Submit a safetensors job body (see ``encode_job``); retried safely under an idempotency key."""
        headers = {"Content-Type": "application/octet-stream", "Idempotency-Key": job_key or uuid.uuid4().hex}
        if lease:
            headers["X-TetriServe-Lease"] = lease
        return await self._request("POST", "/v1/jobs", data=body, headers=headers)

    async def jobs(self, tenant: str | None = None, lease: str | None = None) -> list[dict]:
        query = "&".join(f"{k}={quote(v)}" for k, v in (("tenant", tenant), ("lease", lease)) if v)
        return (await self._request("GET", "/v1/jobs" + (f"?{query}" if query else "")))["jobs"]

    async def status(self, job_id: str) -> dict:
        try:
            return await self._request("GET", f"/v1/jobs/{quote(job_id)}")
        except NotFound as exc:
            raise await self._explain_missing(job_id, exc) from exc

    async def result(self, job_id: str) -> bytes:
        return await self._request("GET", f"/v1/jobs/{quote(job_id)}/result", want="bytes")

    async def cancel(self, job_id: str) -> dict | None:
        """Cancel a job. Raises Conflict if it already ended (or a cancel is under way)."""
        return await self._request("POST", f"/v1/jobs/{quote(job_id)}/cancel", ok_on_retry=(Conflict,))

    async def events(self, job_id: str, after: int = 0) -> AsyncIterator[dict]:
        """The job's events (pings dropped) until its terminal event; one connection, no retry."""
        async for event in self._stream(f"/v1/jobs/{quote(job_id)}/events?after={after}"):
            yield event

    async def service_events(self, after: int = 0) -> AsyncIterator[dict]:
        async for event in self._stream(f"/v1/events?after={after}"):
            yield event

    async def _stream(self, path: str) -> AsyncIterator[dict]:
        timeout = aiohttp.ClientTimeout(total=None, connect=min(self.timeout_s, 10.0),
                                        sock_read=self.events_read_timeout_s)
        try:
            async with self._http().get(self.url + path, timeout=timeout) as resp:
                if resp.status >= 400:
                    raise error_from_response(resp.status, await resp.read())
                async for line in resp.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") != "ping":
                        yield event
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as exc:
            raise ServiceUnavailable(f"event stream from {self.url} broke: {type(exc).__name__}: {exc}") from exc

    async def wait(self, job_id: str, on_event: Callable[[dict], Awaitable[None] | None] | None = None,
                   *, timeout_s: float | None = None) -> dict:
        """Follow a job's events until it ends; returns its final status.

        ``on_event`` (sync or async) sees every event (queued, placed, step, waiting, ...). A
        broken stream is resumed where it stopped; a service that stays away raises
        ServiceUnavailable, one that came back without the job, or one that shut down before the
        job finished, ServiceRestarted. When the service
        has no event stream to spare (429), the job is followed by polling its status. A failed job
        raises JobFailed, a cancelled one JobCancelled.
        """
        async def follow() -> dict:
            seq = 0
            reconnects = 0
            while True:
                try:
                    async for event in self.events(job_id, after=seq):
                        seq = event.get("seq") or seq
                        if on_event is not None:
                            maybe = on_event(event)
                            if inspect.isawaitable(maybe):
                                await maybe
                        if event["type"] == "failed":  # from the event: the service may be going away
                            if event.get("code") == "service_stopped":
                                raise ServiceRestarted(f"job {job_id}: {event.get('error')}")
                            raise JobFailed(job_id, event.get("error") or "no reason given", event)
                        if event["type"] == "cancelled":
                            raise JobCancelled(job_id, event.get("reason"), event)
                        if event["type"] == "finished":
                            return await self._final(job_id)
                except ServiceUnavailable:
                    pass  # reconnect below, after checking the service is the same one
                except TooManyRequests:
                    pass  # every event stream is taken: follow the job by its status until one frees up
                except NotFound as exc:
                    raise await self._explain_missing(job_id, exc) from exc
                status = await self.status(job_id)  # retries; raises ServiceRestarted / ServiceUnavailable
                if status["status"] in TERMINAL:
                    return await self._final(job_id, status)
                await asyncio.sleep(min(self.backoff_s * 2 ** reconnects, 2.0))
                reconnects += 1

        if timeout_s is None:
            return await follow()
        return await asyncio.wait_for(follow(), timeout_s)

    async def _final(self, job_id: str, status: dict | None = None) -> dict:
        status = status or await self.status(job_id)
        if status["status"] == "failed" and status.get("error_code") == "service_stopped":
            raise ServiceRestarted(f"job {job_id}: {status.get('error')}")
        if status["status"] == "failed":
            raise JobFailed(job_id, status.get("error") or "no reason given", status)
        if status["status"] == "cancelled":
            raise JobCancelled(job_id, status.get("cancel_reason"), status)
        return status

    async def _explain_missing(self, job_id: str, exc: TetriServeError) -> TetriServeError:
        if isinstance(exc, JobLost):  # the service's journal says so, in its own words
            return ServiceRestarted(str(exc))
        if isinstance(exc, Gone):
            return exc
        try:
            boot = (await self.health()).get("boot_id")
        except TetriServeError:
            return exc
        if _boot_of(job_id) not in (None, boot):
            return ServiceRestarted(f"the scheduler service restarted since job {job_id} was submitted "
                                    "and no longer knows it; submit the job again")
        return exc

    async def generate(self, tensors: Mapping[str, Any], settings: Mapping[str, Any],
                       on_event: Callable[[dict], Awaitable[None] | None] | None = None, *,
                       resubmits: int = 1) -> tuple[dict, dict]:
        """Submit, wait and fetch in one call: returns (result tensors, result metadata).

        Cancels the job if the caller is cancelled (or fails) while waiting. A job lost because
        the service restarted under it is submitted again, up to ``resubmits`` times, under the
        same job key (a fresh run at the new service).
        """
        body = await asyncio.to_thread(encode_job, tensors, settings)  # conditioning: MBs to serialise, off the loop
        job_key = settings.get("job_key") or uuid.uuid4().hex
        for attempt in range(resubmits + 1):
            receipt = await self.submit(body, job_key=job_key)
            job_id = receipt["job_id"]
            try:
                await self.wait(job_id, on_event)
            except ServiceRestarted:
                if attempt == resubmits:
                    raise
                log.warning("job %s was lost in a restart of the service; submitting it again", job_id)
                continue
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.cancel(job_id))
                raise
            return await asyncio.to_thread(decode_result, await self.result(job_id))
        raise AssertionError("unreachable")


# ------------------------------------------------------------------- bodies
def encode_job(tensors: Mapping[str, Any], settings: Mapping[str, Any]) -> bytes:
    """A submit body: the tensors as safetensors, the settings as JSON under metadata key 'tetriserve'."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"tetriserve": json.dumps(dict(settings))})


def safetensors_metadata(body: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors body (pure Python)."""
    (n,) = struct.unpack("<Q", body[:8])
    return json.loads(body[8:8 + n]).get("__metadata__") or {}


def decode_result(body: bytes) -> tuple[dict, dict]:
    """(tensors, metadata) of a result body; the sampled latent is tensors['latent']."""
    from safetensors.torch import load

    return load(body), safetensors_metadata(body)


# ---------------------------------------------------------------- auto-start
def _healthy(url: str, token: str | None, timeout_s: float = 2.0) -> bool:
    req = urllib.request.Request(url + "/v1/health", headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status == 200 and json.loads(resp.read()).get("status") == "ok"
    except (OSError, ValueError, urllib.error.URLError):
        return False


def _start_detached(url: str, token: str | None, serve_args: list[str] | None, timeout_s: float) -> None:
    """Start one service for this box under the lock file (blocking; run in a thread)."""
    import fcntl

    from .service.settings import is_loopback

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    if not is_loopback(host):
        raise ServiceUnavailable(f"no service at {url}, and only a loopback service may be started automatically")
    home = config_module.home_dir()
    deadline = time.monotonic() + timeout_s
    with open(home / "service.lock", "a+") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServiceUnavailable("another process holds the service start lock and no service came up")
                time.sleep(0.2)
        try:
            if _healthy(url, token):
                return  # someone started it while we waited for the lock
            args = list(serve_args) if serve_args is not None else []
            if serve_args is None and (home / "serve.json").exists():
                args += ["--config", str(home / "serve.json")]
            args += ["--host", host, "--port", str(port)]
            package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            child_env = dict(os.environ)
            child_env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, child_env.get("PYTHONPATH")) if p)
            log_path = home / "service.log"
            with open(log_path, "ab") as out:
                proc = subprocess.Popen([sys.executable, "-m", "comfy_tetriserve", "serve", *args], stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                        close_fds=True, env=child_env)
            lock.seek(0)
            lock.truncate()
            lock.write(f"{proc.pid} {url}\n")
            lock.flush()
            while not _healthy(url, token):
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-1500:]
                    raise ServiceUnavailable(f"the auto-started service exited with code {proc.returncode}; "
                                             f"log {log_path}:\n{tail}")
                if time.monotonic() > deadline:
                    raise ServiceUnavailable(f"the auto-started service did not answer within {timeout_s:g} s "
                                             f"(pid {proc.pid}, log {log_path})")
                time.sleep(0.25)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


async def ensure_service(url: str | None = None, *, token: str | None = None, autostart: bool | None = None,
                         serve_args: list[str] | None = None, timeout_s: float = 120.0) -> str:
    """The URL of a service that answers; start one (detached, one per box) if allowed.

    ``autostart`` defaults to ``TETRISERVE_AUTOSTART=1``. The started service runs
    ``comfy-tetriserve serve`` with ``serve_args`` (default: ``--config <home>/serve.json`` when that
    file exists) on the URL's loopback host and port; it outlives the caller. A lock file in the
    cache folder makes concurrent callers start one service, not several.
    """
    url = (url or config_module.env("TETRISERVE_URL") or DEFAULT_URL).rstrip("/")
    token = token if token is not None else config_module.env("TETRISERVE_TOKEN")
    if await asyncio.to_thread(_healthy, url, token):
        return url
    if autostart is None:
        autostart = config_module.env("TETRISERVE_AUTOSTART") == "1"
    if not autostart:
        raise ServiceUnavailable(f"no scheduler service answers at {url}: start one with `comfy-tetriserve serve`, "
                                 "or set TETRISERVE_AUTOSTART=1 to let clients start it")
    await asyncio.to_thread(_start_detached, url, token, serve_args, timeout_s)
    return url
