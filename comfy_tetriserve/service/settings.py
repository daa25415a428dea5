"""Settings of the scheduler service (``comfy-tetriserve serve``): one frozen dataclass.

The same dataclass builds the command line (``config.add_arguments``), reads a JSON config
file (``serve --config FILE``) and is what ``create_app`` takes. Limits here are the
service's answer to hostile or mistaken input: every one of them turns into a 4xx.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..config import field
from ..sampling.names import WEIGHT_DTYPES
from ..core.residency import parse_budget
from ..errors import InvalidRequest

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


@dataclass(frozen=True)
class ServiceConfig:
    host: str = field("127.0.0.1", help="address to listen on; anything but loopback requires --token")
    port: int = field(8189, help="TCP port")
    token: str | None = field(None, help="bearer token clients must send (default: $TETRISERVE_TOKEN)")
    devices: str = field("sim:4", help="cuda:0-7 | cuda:0,1,3 | cpu:N (real workers) | sim:N (simulated, no images)")
    model: tuple[str, ...] = field((), help="models to load at start, NAME=PATH (PATH may be sim:flux or sim:sd3 with sim devices)")
    model_dir: tuple[str, ...] = field((), help="folders clients may load model files from by name (e.g. ComfyUI's diffusion_models)")
    memory_budget: str = field(
        "", help="weights each worker may hold: bytes with a unit (24GiB, 600MB) or a percentage of its device; "
                 "default 80%% of a GPU, half the RAM split among CPU workers; beyond it the least recently used "
                 "unpinned model is evicted")
    evictable: bool = field(False, help="models given with --model may be evicted too (default: they are pinned)")
    lora_dir: tuple[str, ...] = field((), help="folders jobs may name LoRA files from (e.g. ComfyUI's loras); repeatable")
    dtype: str = field("bf16", help="weight dtype of models loaded at start (fp8_*: stored as fp8, as ComfyUI's "
                                    "UNETLoader does)", choices=WEIGHT_DTYPES)
    policy: str = field("auto", help="scheduling policy (a registered name, or module:factory); 'auto': tetriserve "
                                     "on one box, tetriserve-boxes with --cluster ray")
    cost: str = field("h200", help="cost model: 'h200' (shipped profile), a profile JSON path, or module:factory")
    profile_as: tuple[str, ...] = field(
        ("flux=flux-dev", "sd3=sd3-medium", "qwen_image=flux-dev", "wan=flux-dev"),
        help="FAMILY=PROFILED_MODEL: price a loaded model the profile does not know from this one, scaled by "
             "the FLOP ratio of the two architectures (modelled until `profile` measures it)")
    sim_time_scale: float = field(1.0, help="sim devices: multiply the cost model's step times by this")
    lease_s: float = field(30.0, help="a lease not renewed for this long expires and its jobs are cancelled")
    result_ttl_s: float = field(600.0, help="an ended job (and its result) is forgotten this long after it ended")
    fetched_ttl_s: float = field(60.0, help="... or this long after its result was fetched, whichever is first")
    max_open_jobs: int = field(1000, help="unfinished jobs the service accepts in all (429 beyond)")
    max_open_jobs_per_tenant: int = field(200, help="unfinished jobs per tenant (429 beyond)")
    max_leases_per_tenant: int = field(100, help="open leases per tenant (429 beyond)")
    max_event_streams: int = field(1024, help="event streams open at once (429 beyond)")
    max_body_mb: float = field(256.0, help="largest accepted request body in MiB (413 beyond)")
    body_timeout_s: float = field(60.0, help="time allowed to receive one request body (408 beyond)")
    header_timeout_s: float = field(15.0, help="time a connection may take to send a request's headers, "
                                               "and may stay idle between requests, before it is closed")
    max_steps: int = field(1000, help="most denoising steps per job")
    max_batch: int = field(16, help="most images per job")
    max_image_tokens: int = field(65536, help="most image tokens per image, (H/16)*(W/16) (4096x4096 px = 65536)")
    max_text_tokens: int = field(4096, help="most text tokens in a context tensor")
    max_deadline_s: float = field(86400.0, help="largest deadline a job may ask for, in seconds")
    events_ping_s: float = field(10.0, help="an event stream sends a ping line after this much silence")
    shutdown_grace_s: float = field(10.0, help="on shutdown, time given to in-flight work to stop")
    housekeeping_s: float = field(0.5, help="period of lease and result expiry checks")
    rebuild_after_s: float = field(
        30.0, help="after a worker dies, serve on the remaining devices at most this long before rebuilding the "
                   "pool (it is rebuilt at once when nothing runs); 0: rebuild at once")
    max_job_faults: int = field(
        3, help="a job that was on the devices when workers failed this many times fails (a poison job cannot take "
                "the box down forever); before that it resumes from its latest checkpoint")
    max_device_faults: int = field(
        3, help="a device whose worker died this many times within --device-fault-window-s, each time under different "
                "jobs, is taken out of the plan until the service restarts (0: never)")
    device_fault_window_s: float = field(3600.0, help="the window of --max-device-faults, in seconds")
    max_restart_attempts: int = field(5, help="failed pool rebuilds in a row before the service gives up (503)")
    stall_timeout_s: float = field(
        600.0, help="an assignment that completes no step for this long is hung: its workers are killed and its "
                    "jobs resume elsewhere (0: never)")
    checkpoint_every_s: float = field(
        1.0, help="inside a long assignment, the workers checkpoint a job's latent after this many seconds of it, so "
                  "a worker death costs a job at most about this much work plus a step (0: after every step; the "
                  "end of every assignment is always checkpointed)")
    cuda_graphs: bool = field(
        False, help="GPU workers capture each step shape's model evaluation as a CUDA graph (the first step at a "
                    "new shape pays warm-up and capture; no effect on CPU workers)")
    restart_timeout_s: float = field(900.0, help="time allowed to one pool rebuild (workers started, models reloaded)")
    cluster: str = field("off", help="'ray': one planner over every node of a Ray cluster (needs the cluster extra); "
                                     "--devices is then ignored", choices=("off", "ray"))
    ray_address: str | None = field(None, help="cluster mode: the Ray cluster to join (default $RAY_ADDRESS, else "
                                               "'auto': the cluster this machine runs)")
    devices_per_node: str = field("gpu", help="cluster mode: 'gpu' (one worker per GPU of every node with GPUs) or "
                                              "cpu:N (N CPU workers on every node, for tests)")
    inter_node_gbps: float = field(100.0, help="cluster mode: bandwidth between nodes in Gbit/s, prices a job's move")
    spare_nodes: int = field(0, help="cluster mode: boxes that may join later beyond those up at start (each with as "
                                     "many devices as the first box); their GPU ids are reserved and join the plan "
                                     "when a box arrives")
    gil_switch_ms: float = field(0.5, help="the service process's GIL switch interval (Python's default: 5 ms); "
                                           "shorter lets the event loop answer sooner while threads parse submits")
    journal: str = field(
        "auto", help="SQLite file of the job history (every job accepted and how it ended: /v1/usage, and a restarted "
                     "service tells clients which jobs it lost); 'auto': <cache>/history-<port>.sqlite3; 'off': none")
    history_retention_days: float = field(90.0, help="jobs are kept in the history this many days (0: forever)")

    @property
    def policy_name(self) -> str:
        """The policy to build: ``policy``, with 'auto' resolved for one box or a cluster."""
        if self.policy != "auto":
            return self.policy
        return "tetriserve-boxes" if self.cluster == "ray" else "tetriserve"

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def journal_path(self) -> str | None:
        """Where the job history lives (None: no history)."""
        if self.journal in ("", "off", "none"):
            return None
        if self.journal == "auto":
            from ..config import home_dir

            return str(home_dir() / f"history-{self.port}.sqlite3")
        return self.journal

    def validate(self) -> None:
        """Refuse settings the service must not run with (raises InvalidRequest)."""
        if not is_loopback(self.host) and not self.token:
            raise InvalidRequest(
                f"refusing to listen on {self.host!r} without a token: set --token or TETRISERVE_TOKEN "
                "(only loopback addresses may run without one)")
        if not 0 < self.port < 65536:
            raise InvalidRequest(f"port out of range: {self.port}")
        for name in ("lease_s", "result_ttl_s", "fetched_ttl_s", "max_body_mb", "body_timeout_s", "header_timeout_s",
                     "max_deadline_s", "events_ping_s", "housekeeping_s", "sim_time_scale", "restart_timeout_s",
                     "device_fault_window_s", "inter_node_gbps", "gil_switch_ms"):
            if not getattr(self, name) > 0:
                raise InvalidRequest(f"{name} must be > 0")
        for name in ("rebuild_after_s", "stall_timeout_s", "checkpoint_every_s", "max_device_faults",
                     "history_retention_days", "spare_nodes"):
            if not getattr(self, name) >= 0:
                raise InvalidRequest(f"{name} must be >= 0")
        for name in ("max_open_jobs", "max_open_jobs_per_tenant", "max_steps", "max_batch",
                     "max_image_tokens", "max_text_tokens", "max_leases_per_tenant", "max_event_streams",
                     "max_job_faults", "max_restart_attempts"):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"{name} must be >= 1")
        if self.cluster == "ray":
            from ..cluster.topology import parse_devices_per_node

            parse_devices_per_node(self.devices_per_node)
        parse_pairs(self.model, "model")
        parse_pairs(self.profile_as, "profile_as")
        parse_budget(self.memory_budget or None)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_pairs(items: tuple[str, ...], what: str) -> dict[str, str]:
    """``("a=b", "c=d")`` -> {"a": "b", "c": "d"}; malformed items raise InvalidRequest."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InvalidRequest(f"--{what.replace('_', '-')} wants NAME=VALUE, got {item!r}")
        if key.strip() in out:
            raise InvalidRequest(f"--{what.replace('_', '-')}: {key.strip()!r} given twice")
        out[key.strip()] = value.strip()
    return out
