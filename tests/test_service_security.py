"""Security: the token on every non-public route (no path trick gets around it), loopback-only
without a token, and no file system path from a request ever reaching a model loader."""
from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comfy_tetriserve.core.sim_executor import SimulatedExecutor
from comfy_tetriserve.errors import InvalidRequest, NotFound
from comfy_tetriserve.reliability.hostile import Ctx, raw
from comfy_tetriserve.service.app import create_app
from comfy_tetriserve.service.catalog import MODEL_SUFFIXES, check_model_name, resolve_path
from comfy_tetriserve.service.settings import ServiceConfig, is_loopback
from service_helpers import FAST_COST, FifoPolicy, job_body, make_config, running_service

TOKEN = "s3cret-token"


async def raw_get(url: str, target: str, headers: str = "") -> tuple[int, str]:
    host, port = url.split("//")[1].rsplit(":", 1)
    ctx = Ctx(url, host, int(port), None, {}, None, None)
    return await raw(ctx, f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())


def test_no_path_trick_gets_around_the_token():
    protected = ["/v1/jobs", "/v1/jobs/", "//v1/jobs", "/v1//jobs", "/v1/./jobs", "/v1/health/../jobs",
                 "/v1/health/%2e%2e/jobs", "/v1/health%2f..%2fjobs", "/static/../v1/jobs", "/static/%2e%2e/v1/jobs",
                 "/static/..%2fv1/jobs", "/dashboard/../v1/jobs", "/v1/openapi.json/../jobs", "/V1/JOBS",
                 "/v1/jobs?redirect=/v1/health", "/v1/jobs#/v1/health", "/v1/metrics", "/v1/executor", "/v1/events",
                 "/v1/board", "/v1/models", "/v1/models/..%2F..%2Fetc%2Fpasswd", "/v1/jobs/j-x-000001/result",
                 "http://evil/v1/jobs", "/v1/jobs%00/v1/health", "/v1/jobs;/v1/health"]

    async def body():
        app = create_app(make_config(token=TOKEN), executor=SimulatedExecutor(2, FAST_COST), policy=FifoPolicy(),
                         cost=FAST_COST)
        async with running_service(app) as url:
            answers = {t: await raw_get(url, t) for t in protected}
            wrong = [await raw_get(url, "/v1/jobs", f"Authorization: {h}\r\n")
                     for h in ("Bearer wrong", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, f"Bearer  {TOKEN}", "")]
            right = await raw_get(url, "/v1/jobs", f"Authorization: Bearer {TOKEN}\r\n")
            public = [await raw_get(url, t) for t in ("/v1/health", "/v1/openapi.json", "/dashboard")]
            async with aiohttp.ClientSession() as s:  # submits and cancels too
                async with s.post(url + "/v1/jobs", data=job_body()) as resp:
                    submit = resp.status
                async with s.post(url + "/static/../v1/jobs", data=job_body()) as resp:
                    submit_tricked = resp.status
            return answers, wrong, right, public, submit, submit_tricked

    answers, wrong, right, public, submit, submit_tricked = asyncio.run(body())
    for target, (status, text) in answers.items():
        assert status in (400, 401, 403, 404), (target, status, text[:200])  # never 200 with data
        assert '"jobs"' not in text and "tetriserve_" not in text, target
    assert sum(1 for status, _ in answers.values() if status == 401) >= len(answers) - 8
    assert all(status == 401 and "token" in text for status, text in wrong)
    assert right[0] == 200 and all(status == 200 for status, _ in public)
    assert submit == 401 and submit_tricked in (401, 403, 404)


def test_only_loopback_listens_without_a_token():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2", "[::1]"):
        assert is_loopback(host), host
        ServiceConfig(host=host).validate()
    for host in ("0.0.0.0", "::", "192.168.1.10", "localhost.evil.com", "127.0.0.1.nip.io", "127.1", "",
                 "localhost.", "::ffff:10.0.0.1"):
        assert not is_loopback(host), host
        with pytest.raises(InvalidRequest, match="token"):
            ServiceConfig(host=host).validate()
        ServiceConfig(host=host, token="t").validate()


# ---------------------------------------------------------------------- loaders
@pytest.fixture
def model_root(tmp_path):
    root = tmp_path / "models"
    (root / "flux").mkdir(parents=True)
    (root / "flux" / "a.safetensors").write_bytes(b"x")
    (root / "b.sft").write_bytes(b"x")
    (root / "notes.txt").write_bytes(b"x")
    (root / "folder").mkdir()
    (root / "folder" / "config.json").write_text("{}")
    (root / "plain-dir").mkdir()
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"secret")
    os.symlink(outside, root / "escape.safetensors")
    os.symlink(tmp_path, root / "up")
    os.symlink(root / "flux" / "a.safetensors", root / "inside-link.safetensors")
    return root


PIECES = st.sampled_from(["..", ".", "", "flux", "a.safetensors", "b.sft", "notes.txt", "folder", "plain-dir",
                          "escape.safetensors", "up", "secret.safetensors", "inside-link.safetensors", "~", "%2e%2e",
                          "C:", "\\..\\", "\x00", "random:flux-dev", "sim:flux", "/", "//", "models"])


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(parts=st.lists(st.one_of(PIECES, st.text(max_size=6)), min_size=1, max_size=5),
       lead=st.sampled_from(["", "/", "./", "../", "~/"]))
def test_no_model_name_resolves_outside_the_model_folders(model_root, parts, lead):
    name = lead + "/".join(parts)
    root = os.path.realpath(model_root)
    try:
        path = resolve_path(name, (str(model_root),))
    except (InvalidRequest, NotFound):
        return
    # what reaches a loader: a real file with a model suffix, or a diffusers folder, inside the root
    assert os.path.commonpath([path, root]) == root, (name, path)
    assert path == os.path.realpath(path)
    assert (os.path.isfile(path) and path.endswith(MODEL_SUFFIXES)) or os.path.isfile(os.path.join(path, "config.json"))
    check_model_name(name)  # and the name itself was a plain relative name


class RecordingExecutor(SimulatedExecutor):
    """Records every path the service hands to the loader."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loaded_paths: list[str] = []

    async def load_model(self, name, path, dtype="bf16", on_progress=None):
        self.loaded_paths.append(path)
        return await super().load_model(name, path, dtype, on_progress)


def test_only_configured_paths_and_files_inside_the_model_folders_reach_the_loader(model_root, tmp_path):
    names = ["flux/a.safetensors", "b.sft", "inside-link.safetensors", "escape.safetensors", "up/secret.safetensors",
             "../secret.safetensors", str(tmp_path / "secret.safetensors"), "notes.txt", "plain-dir", "folder",
             "random:flux-dev", "sim:flux", "~/secret.safetensors", "flux/../b.sft", "flux\\..\\b.sft",
             "%2e%2e/secret.safetensors", "flux-sim", "b.sft\x00.txt", "C:/secret.safetensors"]

    async def body():
        executor = RecordingExecutor(2, FAST_COST)
        app = create_app(make_config(model_dir=(str(model_root),)), executor=executor, policy=FifoPolicy(),
                         cost=FAST_COST)
        answers = {}
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            for name in names:
                async with s.post(url + "/v1/models/load", json={"model": name}) as resp:
                    answers[name] = resp.status
                async with s.post(url + "/v1/jobs", data=job_body({"model": name})) as resp:
                    assert resp.status < 500, (name, resp.status)
                async with s.get(url + "/v1/models/" + name.replace("\x00", "%00")) as resp:
                    assert resp.status < 500, (name, resp.status)
        return executor.loaded_paths, answers

    loaded, answers = asyncio.run(body())
    root = os.path.realpath(model_root)
    allowed = {"sim:flux", "sim:sd3"}  # the operator's configured models (make_config)
    for path in loaded:
        assert path in allowed or os.path.commonpath([path, root]) == root, path
    inside = {p for p in loaded if p not in allowed}
    assert inside == {os.path.join(root, "flux", "a.safetensors"), os.path.join(root, "b.sft"),
                      os.path.join(root, "folder")}
    for name in ("escape.safetensors", "up/secret.safetensors", "../secret.safetensors", "notes.txt", "plain-dir",
                 "flux\\..\\b.sft", "b.sft\x00.txt"):
        assert answers[name] == 400, (name, answers[name])
    for name in ("random:flux-dev", "sim:flux", "~/secret.safetensors", "%2e%2e/secret.safetensors"):
        assert answers[name] == 404, (name, answers[name])


def test_per_tenant_limits_hold_under_concurrent_submits():
    async def body():
        from service_helpers import make_service_app

        app, _ = make_service_app(num_gpus=1, max_open_jobs_per_tenant=3, time_scale=50.0)
        async with running_service(app) as url, aiohttp.ClientSession() as s:
            async def submit(i):
                async with s.post(url + "/v1/jobs", data=job_body({"steps": 300, "seed": i, "tenant": "t"},
                                                                   res=512)) as resp:
                    return resp.status
            codes = await asyncio.gather(*(submit(i) for i in range(12)))
            leases = []
            for _ in range(5):
                async with s.post(url + "/v1/leases", json={"tenant": "t"}) as resp:
                    leases.append(resp.status)
            return codes, leases

    codes, leases = asyncio.run(body())
    assert codes.count(202) == 3 and codes.count(429) == 9  # checked again where the job is stored: no race
    assert leases == [201] * 5  # the default allows 100 leases per tenant
