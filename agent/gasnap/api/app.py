"""The aiohttp application factory: resources in cleanup_ctx, routes apart."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..config import Settings
from ..errors import BadRequest, Conflict, GasnapError, NotFound, Unavailable
from ..runtime import open_runtime
from . import handlers
from .keys import HYPERVISOR, SERVICE, SETTINGS

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_STATUS: list[tuple[type[GasnapError], int]] = [
    (BadRequest, 400),
    (NotFound, 404),
    (Conflict, 409),
    (Unavailable, 503),
]


def status_for(err: GasnapError) -> int:
    for category, status in _STATUS:
        if isinstance(err, category):
            return status
    return 500


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as the contract's JSON error document."""
    try:
        return await handler(request)
    except GasnapError as err:
        status = status_for(err)
        if status >= 500:
            log.error("%s %s: %s", request.method, request.path, err)
            log.debug("traceback", exc_info=True)
        return error_response(status, err.code, err.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason)
    except Exception as exc:
        log.error("%s %s: internal error: %s", request.method, request.path, exc)
        log.debug("traceback", exc_info=True)
        return error_response(500, "internal", "internal error (see the agent's log)")


def _token_middleware(token: str) -> Middleware:
    expected = token.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        given = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        given = given or request.headers.get("X-Auth-Token", "")
        if not hmac.compare_digest(given.encode(), expected):
            return error_response(401, "unauthorized", "missing or wrong token")
        return await handler(request)

    return check


async def _runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    async with open_runtime(app[SETTINGS]) as runtime:
        app[HYPERVISOR] = runtime.hv
        app[SERVICE] = runtime.service
        yield


def create_app(settings: Settings) -> web.Application:
    middlewares: list[Middleware] = [errors_middleware]
    if settings.listen.startswith("tcp:"):
        middlewares.insert(0, _token_middleware(settings.token))
    app = web.Application(middlewares=middlewares)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_runtime_ctx)
    handlers.setup_routes(app)
    return app
