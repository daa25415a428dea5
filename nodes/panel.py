"""ComfyUI-side routes that feed the board panel (web/tetriserve_panel.js).

The browser talks only to its own ComfyUI (same origin; ComfyUI's origin check refuses other
pages, and the service's token, if any, stays on the server):

- ``GET /tetriserve/board?window_s=60``: the service's ``/v1/board`` document, plus
  ``service_url``; 503 with a JSON error when the service does not answer.
- ``GET /tetriserve/health``: the service's health plus ``service_url`` (503 when down).
- ``GET /tetriserve/board.js``: the service's own drawing code (comfy_tetriserve/service/static),
  so the panel and the service's dashboard draw the board with one script.

ComfyUI serves every route also under ``/api``. Imports aiohttp only (tested without ComfyUI).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

import comfy_tetriserve as _package
from comfy_tetriserve.client import TetriServeClient
from comfy_tetriserve.errors import TetriServeError

BOARD_JS = Path(_package.__file__).parent / "service" / "static" / "board.js"  # a file, not an import
DEFAULT_WINDOW_S = 60.0
MAX_WINDOW_S = 3600.0
PREFIX = "/tetriserve"


def _error(status: int, message: str, url: str) -> web.Response:
    return web.json_response({"error": {"message": message, "status": status}, "service_url": url}, status=status)


def add_panel_routes(routes: web.RouteTableDef, client_for: Callable[[], TetriServeClient]) -> None:
    """Register the panel's routes; ``client_for()`` gives the client of the running loop."""

    @routes.get(PREFIX + "/board")
    async def board(request: web.Request) -> web.Response:
        client = client_for()
        try:
            window_s = float(request.query.get("window_s", DEFAULT_WINDOW_S))
        except ValueError:
            window_s = math.nan
        if not (math.isfinite(window_s) and 1.0 <= window_s <= MAX_WINDOW_S):
            return _error(400, f"window_s must be a number between 1 and {MAX_WINDOW_S:g}", client.url)
        try:
            doc = await client.board(window_s)
        except TetriServeError as exc:
            return _error(exc.http_status if 400 <= exc.http_status < 500 else 503, str(exc), client.url)
        return web.json_response({**doc, "service_url": client.url})

    @routes.get(PREFIX + "/health")
    async def health(request: web.Request) -> web.Response:
        client = client_for()
        try:
            doc = await client.health()
        except TetriServeError as exc:
            return _error(503, str(exc), client.url)
        return web.json_response({**doc, "service_url": client.url})

    @routes.get(PREFIX + "/board.js")
    async def board_js(request: web.Request) -> web.FileResponse:
        return web.FileResponse(BOARD_JS, headers={"Content-Type": "text/javascript; charset=utf-8",
                                                   "Cache-Control": "no-cache"})
