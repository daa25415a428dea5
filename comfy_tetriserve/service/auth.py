"""Bearer-token check. Without a token the service must listen on loopback only (settings.py).

With a token every route wants ``Authorization: Bearer TOKEN`` except the few that reveal
nothing: the health check, the OpenAPI document and the dashboard's static files (the page
asks for the token and sends it with its own requests).
"""
from __future__ import annotations

import hmac

from aiohttp import web

from ..errors import Unauthorized

PUBLIC_PATHS = ("/v1/health", "/v1/openapi.json", "/", "/dashboard", "/usage")
PUBLIC_PREFIXES = ("/static/",)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def token_middleware(token: str):
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check_token(request: web.Request, handler):
        if not is_public(request.path):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise Unauthorized("missing or wrong bearer token (Authorization: Bearer TOKEN)")
        return await handler(request)

    return check_token
