"""The application factory of the scheduler service.

``create_app(config)`` builds every part from the settings (cost model, policy, executor,
engine, job store, model catalog, engine loop) unless it is injected, and returns an aiohttp
application whose ``cleanup_ctx`` starts the engine loop (and the configured model loads) and
stops it; ``on_shutdown`` ends every unfinished job with a ``failed`` event first, so event
streams finish before the server closes connections.

Errors are mapped to HTTP here, once: every ``TetriServeError`` becomes its class's
``http_status`` with a JSON body ``{"error": {"code", "message", "status"}}``; aiohttp's own
HTTP errors (404 route, 405 method, 413 body) get the same JSON shape.
"""
from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..cost import CostModel
from ..core.engine import Engine
from ..core.executor import Executor, warm_keys_source
from ..errors import TetriServeError
from .auth import token_middleware
from .catalog import ModelCatalog
from .events import EventLog
from .jobs import Clock, JobStore
from .history import JobHistory
from .loop import EngineLoop
from .metrics import ServiceMetrics
from .routes import routes
from .settings import ServiceConfig
from .state import SERVICE, Service
from .wiring import build_cost, build_executor, build_policy, forecast_function, models_to_load, planning_cost

log = logging.getLogger(__name__)

HUB_EVENTS = 2000

_HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 408: "request_timeout", 409: "conflict", 410: "gone",
               413: "payload_too_large", 415: "unsupported_media_type", 429: "too_many_requests"}


class MalformedRequestLogFilter(logging.Filter):
    """aiohttp logs every request it cannot parse (a giant header line, a TLS hello on the HTTP port)
    as an ERROR with a traceback; a hostile client could fill the log that way. Such a request was
    answered 400 already: log one INFO line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "refused a malformed request: %s", (str(exc).splitlines()[0][:200],)
            record.exc_info, record.exc_text = None, None
        return True


def install_log_filter() -> None:
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestLogFilter) for f in server_log.filters):
        server_log.addFilter(MalformedRequestLogFilter())


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, "status": status}}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler):
    response = await _answer(request, handler)
    if response.status >= 400 and SERVICE in request.app:
        request.app[SERVICE].metrics.on_http_error(response.status)
    return response


async def _answer(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except TetriServeError as exc:
        if exc.http_status >= 500:
            log.warning("%s %s -> %s: %s", request.method, request.path, exc.http_status, exc)
        return error_response(exc.http_status, exc.code, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 413:
            message = f"request body too large ({message})"
        return error_response(exc.status, _HTTP_CODES.get(exc.status, "http_error"), message)
    except Exception:  # noqa: BLE001 - never leak a traceback to a client; keep serving
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error (the service log has the details)")


def create_app(config: ServiceConfig, *, executor: Executor | None = None, policy=None,
               cost: CostModel | None = None) -> web.Application:
    """The service as an aiohttp application (see the module docstring)."""
    config.validate()
    install_log_filter()
    middlewares = [error_middleware] + ([token_middleware(config.token)] if config.token else [])
    # bodies are decoded by encoding.py (bounded, JSON errors); headers must arrive within header_timeout_s
    handler_args = {"auto_decompress": False, "keepalive_timeout": config.header_timeout_s}
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares, handler_args=handler_args)

    base_cost = cost if cost is not None else build_cost(config.cost)
    model_cost = planning_cost(base_cost, config)
    if executor is None:
        executor = build_executor(config, model_cost.uncorrected())
    if policy is None:
        policy = build_policy(config.policy_name)
    policy_name = getattr(policy, "name", config.policy_name)

    clock = Clock()
    hub = EventLog(limit=HUB_EVENTS, coalesce=())
    store = JobStore(config, clock)
    store.history = JobHistory(config.journal_path(), store.boot_id, retention_days=config.history_retention_days)
    metrics = ServiceMetrics()
    engine = Engine(policy, model_cost, executor.gpu_ids, executor.groups)
    if getattr(executor, "residency_of", None) is not None:  # the executor holds models: loads can be planned
        from ..core.live_placement import ExecutorPlacementEngine

        engine = ExecutorPlacementEngine(policy, model_cost, executor.gpu_ids, executor.groups, executor=executor)
    engine.warm_keys = warm_keys_source(executor)  # first steps at cold keys priced (core/warmup.py)
    configured = models_to_load(config)

    def on_model_event(event: dict) -> None:
        if event["type"] == "model_loaded":
            metrics.on_model_loaded(event["model"], event["load_s"])
        hub.append(event)

    catalog = ModelCatalog(configured, config.model_dir, executor, model_cost, on_event=on_model_event)
    loop = EngineLoop(engine, executor, model_cost, store, metrics, hub, clock, config, forecast_function())
    app[SERVICE] = Service(config=config, clock=clock, store=store, hub=hub, metrics=metrics, cost=model_cost,
                           executor=executor, engine=engine, catalog=catalog, loop=loop, policy_name=policy_name)

    async def lifecycle(app: web.Application):
        await app[SERVICE].start(configured)
        yield
        await app[SERVICE].close()

    async def on_shutdown(app: web.Application) -> None:
        await app[SERVICE].loop.begin_shutdown()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(on_shutdown)
    app.add_routes(routes)
    return app
