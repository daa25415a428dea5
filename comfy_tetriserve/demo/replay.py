"""One run of the demo: a fresh ``comfy-tetriserve serve`` and the workload replayed through its API.

The service is the real command in a child process (``python -m comfy_tetriserve serve --config
FILE``): four CPU workers, the demo's model folder, the measured profile as its cost model, one
policy. The demo loads both models by file name (``POST /v1/models/load``, progress from
``/v1/events``), then starts one ``TetriServeClient`` per tenant, each with its own lease, each
submitting its jobs at their arrival times and following their event streams concurrently.
Each job's outcome comes from the service's own status (``ended_at``, ``met_deadline``) and its
``placed`` events (the degrees it ran at); the board is fetched at the end (``/v1/board``).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..client import JobCancelled, JobFailed, TetriServeClient, encode_job
from ..errors import TetriServeError
from .workload import TEXT_TOKENS, DemoJob

log = logging.getLogger(__name__)

Say = Callable[[str], None]
START_TIMEOUT_S = 180.0
PROGRESS_EVERY_S = 3.0


@dataclass
class JobOutcome:
    job: DemoJob
    job_id: str | None = None
    status: str = "not submitted"
    submitted_at: float | None = None  # unix seconds
    ended_at: float | None = None
    met_deadline: bool | None = None
    degrees: list[int] = field(default_factory=list)  # sp_degree of each placement, in order
    error: str | None = None

    @property
    def finish_s(self) -> float | None:
        """Seconds from submission to the end."""
        if self.submitted_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.submitted_at


@dataclass
class RunResult:
    policy: str
    outcomes: list[JobOutcome]
    board: dict
    started_at: float  # unix seconds at the start of the replay
    replay_s: float
    service_sar: float
    log_path: Path
    cost_drift: dict[str, float] = field(default_factory=dict)  # OnlineCostModel: measured / profiled

    @property
    def finished(self) -> int:
        return sum(o.status == "finished" for o in self.outcomes)

    @property
    def deadline_outcomes(self) -> list[JobOutcome]:
        return [o for o in self.outcomes if o.job.deadline_s is not None]

    @property
    def sar(self) -> float:
        """On-time jobs / jobs with a deadline (a late or failed job is a miss)."""
        jobs = self.deadline_outcomes
        return sum(bool(o.met_deadline) for o in jobs) / len(jobs) if jobs else math.nan


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """``comfy-tetriserve serve`` in a child process, configured by a JSON file, logging to a file."""

    def __init__(self, settings: dict, run_dir: Path, name: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = run_dir / f"serve-{name}.json"
        self.log_path = run_dir / f"service-{name}.log"
        self.config_path.write_text(json.dumps({**settings, "host": "127.0.0.1", "port": self.port}, indent=1) + "\n",
                                    encoding="utf-8")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ)
        package_parent = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "comfy_tetriserve", "serve", "--config",
                                          str(self.config_path)], stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    async def wait_healthy(self, client: TetriServeClient, timeout_s: float = START_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with code {self.proc.returncode}; its log "
                                   f"({self.log_path}) ends:\n{self.log_tail()}")
            try:
                health = await client.health()
                if health.get("status") == "ok":
                    return health
            except TetriServeError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service did not answer within {timeout_s:g} s (log {self.log_path})")
            await asyncio.sleep(0.25)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (graceful: workers stop, pool closes), SIGKILL if it does not end in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("service pid %d did not stop within %g s; killing it", self.proc.pid, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


async def load_models(client: TetriServeClient, names: Sequence[str], say: Say) -> None:
    """Load each model by file name on every worker, printing the per-worker progress events."""
    async def follow() -> None:
        async for event in client.service_events(after=0):
            if event["type"] == "model_loading" and event.get("workers_loaded"):
                say(f"    {event['model']}: {event['workers_loaded']}/{event['num_workers']} workers loaded")
            elif event["type"] == "model_failed":
                say(f"    {event['model']}: FAILED: {event.get('error')}")

    follower = asyncio.ensure_future(follow())
    try:
        for name in names:
            await client.load_model(name, "fp32", timeout_s=300, poll_s=0.2)
        await asyncio.sleep(0.05)  # let the last progress line through
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError, TetriServeError):
            await follower


def job_tensors(job: DemoJob, context_dim: int, pooled_dim: int, text_tokens: int = TEXT_TOKENS) -> dict:
    """An empty text-to-image latent and seeded stand-in text conditioning of the model's widths."""
    import torch

    g = torch.Generator().manual_seed(job.seed)
    side = job.shape.res // 8
    return {"latent": torch.zeros(1, 16, side, side), "context": torch.randn(1, text_tokens, context_dim, generator=g),
            "pooled": torch.randn(1, pooled_dim, generator=g)}


async def replay(url: str, jobs: Sequence[DemoJob], bodies: dict[int, bytes], policy: str,
                 say: Say) -> tuple[list[JobOutcome], float, float]:
    """Submit every job at its arrival time from its tenant's client; follow all to their end."""
    outcomes = {j.index: JobOutcome(j) for j in jobs}
    tenants = sorted({j.tenant for j in jobs})
    t0 = time.monotonic()
    started_at = time.time()

    async def run_job(client: TetriServeClient, lease: str, job: DemoJob) -> None:
        delay = t0 + job.arrival_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        out = outcomes[job.index]

        def on_event(event: dict) -> None:
            if event["type"] == "placed":
                out.degrees.append(int(event["sp_degree"]))

        try:
            receipt = await client.submit(bodies[job.index], lease=lease)
            out.job_id, out.status, out.submitted_at = receipt["job_id"], "queued", receipt["submitted_at"]
            final = await client.wait(out.job_id, on_event=on_event)
        except (JobFailed, JobCancelled) as exc:
            final = exc.status if isinstance(exc.status, dict) else {}
            out.error = str(exc)
            with contextlib.suppress(TetriServeError):
                final = await client.status(out.job_id)
        except TetriServeError as exc:
            out.status, out.error = "error", str(exc)
            return
        out.status = final.get("status", out.status)
        out.ended_at = final.get("ended_at")
        out.met_deadline = final.get("met_deadline")
        out.error = out.error or final.get("error")

    async def run_client(tenant: str) -> None:
        async with TetriServeClient(url) as client, client.lease(tenant=tenant, ttl_s=60) as lease:
            await asyncio.gather(*(run_job(client, lease, j) for j in jobs if j.tenant == tenant))

    async def progress() -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            states = [o.status for o in outcomes.values()]
            ended = sum(s in ("finished", "failed", "cancelled", "error") for s in states)
            submitted = sum(s != "not submitted" for s in states)
            met = sum(bool(o.met_deadline) for o in outcomes.values())
            say(f"    [{policy}] {time.monotonic() - t0:5.1f} s: {submitted}/{len(jobs)} submitted, "
                f"{ended} ended, {met} deadlines met so far")

    ticker = asyncio.ensure_future(progress())
    try:
        await asyncio.gather(*(run_client(t) for t in tenants))
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
    return [outcomes[j.index] for j in jobs], started_at, time.monotonic() - t0


def parse_sar(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith("tetriserve_sar ") or line.startswith("tetriserve_sar{}"):
            return float(line.split()[-1])
    return math.nan


def parse_cost_drift(metrics_text: str) -> dict[str, float]:
    """The cost model's own drift report from the metrics: {"model/spK/Ntok": measured / profiled}."""
    out = {}
    prefix = 'tetriserve_cost_model_drift_ratio{key="'
    for line in metrics_text.splitlines():
        if line.startswith(prefix):
            key, _, rest = line[len(prefix):].partition('"}')
            out[key] = float(rest.split()[-1])
    return out


async def run_policy(policy: str, settings: dict, jobs: Sequence[DemoJob], model_names: dict[str, str],
                     run_dir: Path, say: Say) -> RunResult:
    """Start a service with ``policy``, load the models, replay ``jobs``, fetch the board, stop it."""
    service = ServiceProcess({**settings, "policy": policy}, run_dir, policy)
    say(f"  starting the service ({policy}): {settings['devices']} workers, log {service.log_path}")
    t_start = time.monotonic()
    service.start()
    try:
        async with TetriServeClient(service.url, retries=1) as client:
            await service.wait_healthy(client)
            say(f"    up after {time.monotonic() - t_start:.1f} s; loading the models by name")
            await load_models(client, list(model_names.values()), say)
            infos = {m["name"]: m for m in await client.models()}
            bodies = {}
            for j in jobs:
                info = infos[j.shape.model]
                settings_json = {"model": j.shape.model, "steps": j.steps, "seed": j.seed, "deadline_s": j.deadline_s,
                                 "job_key": f"demo-{policy}-{j.index}"}
                bodies[j.index] = encode_job(job_tensors(j, info["context_dim"], info["pooled_dim"]), settings_json)
            say(f"    replaying {len(jobs)} jobs")
            outcomes, started_at, replay_s = await replay(service.url, jobs, bodies, policy, say)
            board = await client.board(window_s=min(replay_s + 10.0, 3600.0))
            metrics_text = await client.metrics()
    finally:
        service.stop()  # blocking on purpose: also when the run is being cancelled (Ctrl-C)
    return RunResult(policy=policy, outcomes=outcomes, board=board, started_at=started_at, replay_s=replay_s,
                     service_sar=parse_sar(metrics_text), log_path=service.log_path,
                     cost_drift=parse_cost_drift(metrics_text))
