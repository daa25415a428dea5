"""Building the service's parts from its settings: cost model, policy, executor, forecast.

Each part may also be injected (``create_app(config, executor=..., policy=..., cost=...)``);
these builders run only for the parts that were not.
"""
from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable

from ..cost import CostModel
from ..errors import InvalidRequest
from ..types import SchedulerView
from .catalog import ModelCost
from .settings import ServiceConfig, parse_pairs

log = logging.getLogger(__name__)

ForecastFn = Callable[[SchedulerView, object, CostModel], dict[str, float]]

try:  # the planner's forecast: the engine run forward on a virtual clock
    from ..sim.forecast import forecast_finish as _forecast_finish
except ImportError:  # pragma: no cover - depends on which parts are installed
    _forecast_finish = None


_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _from_factory(spec: str, what: str):
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)()
    except (ImportError, AttributeError) as exc:
        raise InvalidRequest(f"cannot load {what} {spec!r}: {exc}") from None


def build_cost(spec: str) -> CostModel:
    """The base cost model named by ``--cost``: the shipped 'h200' profile, a profile file, or
    ``package.module:factory`` for a cost model of your own."""
    if _FACTORY_RE.match(spec):
        return _from_factory(spec, "cost model")
    from .. import cost as cost_module

    load = getattr(cost_module, "load_cost_model", None)
    if load is None:
        raise InvalidRequest("this build has no profile cost model (comfy_tetriserve.cost.load_cost_model)")
    return load(spec)


def planning_cost(base: CostModel, config: ServiceConfig) -> ModelCost:
    """What the planner prices with: loaded-model aliases, corrected online from measured steps."""
    profile_as = parse_pairs(config.profile_as, "profile_as")
    if callable(getattr(base, "observe", None)):
        return ModelCost(base, profile_as)
    from .. import cost as cost_module

    online = getattr(cost_module, "OnlineCostModel", None)
    if online is None:
        log.warning("no OnlineCostModel in this build: step times are measured (metrics) but not fed back")
        return ModelCost(base, profile_as)
    return ModelCost(online(base), profile_as, raw=base)


def build_policy(name: str):
    """A registered policy by name, or ``package.module:factory`` for a policy of your own."""
    if _FACTORY_RE.match(name):
        return _from_factory(name, "policy")
    from ..policy import make_policy

    return make_policy(name)


_SIM_RE = re.compile(r"^sim:(\d+)$")


def build_executor(config: ServiceConfig, cost: CostModel):
    """``sim:N`` gives the simulated executor (priced by ``cost``); anything else the worker pool;
    ``--cluster ray`` the executor over a Ray cluster (comfy_tetriserve.cluster)."""
    if config.cluster == "ray":
        from ..cluster.service import build_cluster_executor

        return build_cluster_executor(config)
    match = _SIM_RE.match(config.devices)
    if match:
        from ..core.sim_executor import SimulatedExecutor

        num = int(match.group(1))
        if not 1 <= num <= 1024:
            raise InvalidRequest(f"sim:N wants 1 <= N <= 1024, got {num}")
        return SimulatedExecutor(num, cost, time_scale=config.sim_time_scale,
                                 checkpoint_every_s=config.checkpoint_every_s)
    try:
        from ..worker.pool import WorkerPool, parse_devices
    except ImportError:
        raise InvalidRequest(f"devices {config.devices!r} need the worker pool (comfy_tetriserve.worker.pool), "
                             "which this build lacks; use sim:N to try the scheduler") from None
    return WorkerPool(parse_devices(config.devices), checkpoint_every_s=config.checkpoint_every_s,
                      memory_budget=config.memory_budget or None, cuda_graphs=config.cuda_graphs)


def forecast_function() -> ForecastFn | None:
    return _forecast_finish


def estimate_finish(view: SchedulerView, request_id: str, cost: CostModel) -> float:
    """A simple finish estimate for when no forecast is available.

    The later of: all open work at degree 1 spread evenly over the devices, and the request's own
    remaining steps at its fastest allowed degree. Ignores deadlines and the policy's choices.
    """
    num_gpus = max(len(view.gpu_ids), 1)
    total_s = 0.0
    own_s = 0.0
    step_s: dict[tuple, float] = {}  # open jobs share few shapes: one cost lookup per shape
    for snap in view.requests:
        r = snap.request
        shape = (r.model, r.height, r.width, r.batch)
        t = step_s.get(shape)
        if t is None:
            t = step_s[shape] = cost.step_time_s(r.model, r.height, r.width, r.batch, 1)
        total_s += snap.steps_left * t
        if snap.request_id == request_id:
            degrees = [d for d in cost.allowed_degrees(r.model) if d <= num_gpus] or [1]
            own_s = snap.steps_left * min(cost.step_time_s(r.model, r.height, r.width, r.batch, d) for d in degrees)
    return view.now + max(total_s / num_gpus, own_s)


#: what a bare ``serve`` on simulated devices offers, named as the shipped cost profile names them
DEFAULT_SIM_MODELS = {"flux-dev": "sim:flux", "sd3-medium": "sim:sd3"}


def models_to_load(config: ServiceConfig) -> dict[str, str]:
    """The models to load at start: those configured; on simulated devices with none configured (and no
    model folder), a simulated FLUX and SD3, so that a first submit to a bare ``serve`` works."""
    configured = parse_pairs(config.model, "model")
    if not configured and not config.model_dir and _SIM_RE.match(config.devices):
        return dict(DEFAULT_SIM_MODELS)
    return configured
