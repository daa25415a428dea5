"""Schema-based fuzzing of the live service from its own OpenAPI document (schemathesis).

Every operation of ``/v1/openapi.json`` gets requests generated from the document, valid ones and
deliberately invalid ones (wrong types, out-of-range numbers, odd strings in paths, queries and
headers, random bodies): the service must never answer 5xx, every answer must be one the document
declares, with the declared content type and schema, and the service must still be healthy at the
end. Bounded for CI: ``FUZZ_EXAMPLES`` examples per operation, no shrinking. The never-ending
service-wide event stream is left out (its ``after`` parameter is covered by the bad-input tests).

A submit body is a safetensors file, which no generator derives from a schema; so the job settings
(the JSON inside it) get their own property test: hypothesis strategies built from the document's
``JobSettings`` schema, each field in range, out of range or of the wrong type, wrapped in valid
tensors. Every answer is 202 (and the job then ends) or a 4xx naming the problem.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import jsonschema
import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from comfy_tetriserve.worker import samplers
from comfy_tetriserve.service.openapi import openapi_document
from service_helpers import make_service_app, running_service

FUZZ_EXAMPLES = 30

try:  # a test dependency (pyproject's [test] extra); without it only the settings property test runs
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )
except ImportError:  # pragma: no cover
    schemathesis = None


class ServiceThread:
    """The service (simulated devices) on its own event loop in a thread, for a synchronous fuzzer."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        app, _ = make_service_app(max_open_jobs_per_tenant=50)
        async with running_service(app) as url:
            self.url = url
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> "ServiceThread":
        self.thread.start()
        assert self._ready.wait(60), "the service did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)


@pytest.fixture(scope="module")
def service():
    with ServiceThread() as svc:
        yield svc
        health = requests.get(svc.url + "/v1/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok"


if schemathesis is not None:
    schema = schemathesis.openapi.from_dict(openapi_document())
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                    max_examples=FUZZ_EXAMPLES, no_shrink=True, deterministic=True)
    schema = schema.exclude(operation_id="serviceEvents")

    @pytest.mark.slow
    @schema.parametrize()
    @settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=FUZZ_EXAMPLES)
    def test_no_input_makes_the_service_fail_or_answer_off_its_document(case, service):
        response = case.call(base_url=service.url, timeout=30)
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                 content_type_conformance, response_schema_conformance])
else:  # pragma: no cover
    def test_no_input_makes_the_service_fail_or_answer_off_its_document():
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")



# ------------------------------------------------------------------ job settings from the schema
JUNK = st.one_of(st.none(), st.booleans(), st.text(max_size=20), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
                 st.floats(allow_nan=False), st.integers(min_value=-(2**70), max_value=2**70))


def field_strategy(spec: dict) -> st.SearchStrategy:
    """Values for one JobSettings field: mostly valid by its schema, sometimes out of range or junk."""
    types = spec.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    valid: list[st.SearchStrategy] = []
    wrong: list[st.SearchStrategy] = []
    if "enum" in spec:
        valid.append(st.sampled_from(spec["enum"]))
    if "integer" in types:
        lo, hi = spec.get("minimum", -(2**40)), spec.get("maximum", 2**40)
        valid.append(st.integers(min_value=lo, max_value=min(hi, lo + 2000) if "maximum" not in spec else hi))
        wrong.append(st.sampled_from([lo - 1, hi + 1]))  # just out of range
    if "number" in types:
        lo = spec.get("exclusiveMinimum", spec.get("minimum", -1e6))
        hi = spec.get("maximum", 1e6)
        valid.append(st.floats(min_value=lo, max_value=hi, allow_nan=False, exclude_min="exclusiveMinimum" in spec))
        wrong.append(st.sampled_from([lo - 1.0, hi * 10 + 1.0, 1e308, float("inf"), float("nan")]))
    if "string" in types and "enum" not in spec:
        valid.append(st.from_regex(spec["pattern"], fullmatch=True) if "pattern" in spec else st.text(max_size=40))
    if "string" in types:
        wrong.append(st.text(max_size=300))
    if "null" in types:
        valid.append(st.none())
    # mostly valid (hypothesis leans to the first branches), sometimes out of range or of another type
    return st.one_of(*valid, *valid, *valid, *wrong, JUNK)


JOB_SETTINGS = openapi_document()["components"]["schemas"]["JobSettings"]
NAMES = {"sampler": tuple(samplers.SAMPLERS), "scheduler": tuple(samplers.SCHEDULERS)}


@st.composite
def job_settings(draw) -> dict:
    props = JOB_SETTINGS["properties"]
    out = {"model": draw(st.sampled_from(["flux-sim", "sd3-sim"]))}
    if draw(st.integers(min_value=0, max_value=9)) == 9:
        out["model"] = draw(st.sampled_from(["nope", "../flux-sim", "/etc/passwd", "", "random:flux-dev"]))
    for name in draw(st.lists(st.sampled_from(sorted(set(props) - {"model", "lease"})), unique=True, max_size=6)):
        spec = props[name]
        if name in NAMES:  # the schema says "string"; the service knows the names
            spec = {**spec, "enum": list(NAMES[name])}
        out[name] = draw(field_strategy(spec))
    if not draw(st.booleans()):
        out["steps"] = draw(st.integers(min_value=1, max_value=6))  # often a runnable job
    if draw(st.integers(min_value=0, max_value=9)) == 9:
        out[draw(st.text(min_size=1, max_size=8))] = 1  # an unknown key
    return out


def submit_body(settings_obj: dict) -> bytes:
    pooled = 2048 if settings_obj.get("model") == "sd3-sim" else 768
    tensors = {"latent": torch.zeros(1, 16, 4, 4), "context": torch.ones(1, 3, 4096), "pooled": torch.ones(1, pooled),
               "neg_context": torch.ones(1, 2, 4096), "neg_pooled": torch.ones(1, pooled)}
    return save(tensors, metadata={"tetriserve": json.dumps(settings_obj, allow_nan=True)})


JOB_VALIDATOR = jsonschema.Draft202012Validator(openapi_document()["components"]["schemas"]["Job"])
ERROR_VALIDATOR = jsonschema.Draft202012Validator(openapi_document()["components"]["schemas"]["Error"])


@pytest.mark.slow
@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=150, derandomize=True)
@given(settings_obj=job_settings())
def test_job_settings_from_the_schema_are_accepted_or_refused_cleanly(settings_obj, service):
    response = requests.post(service.url + "/v1/jobs", data=submit_body(settings_obj), timeout=30)
    assert response.status_code in (200, 202) or 400 <= response.status_code < 500, (settings_obj, response.text)
    body = response.json()
    if response.status_code >= 400:
        ERROR_VALIDATOR.validate(body)
        assert body["error"]["message"] and body["error"]["status"] == response.status_code
        return
    JOB_VALIDATOR.validate(body)
    job_id = body["job_id"]
    requests.post(f"{service.url}/v1/jobs/{job_id}/cancel", timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # every accepted job ends
        status = requests.get(f"{service.url}/v1/jobs/{job_id}", timeout=30).json()
        if status["status"] in ("finished", "failed", "cancelled"):
            break
        time.sleep(0.01)
    else:
        raise AssertionError(f"job {job_id} did not end: {status}")
    assert not (isinstance(settings_obj.get("steps"), int) and settings_obj["steps"] > 1000)
    assert math.isfinite(status["submitted_at"])
