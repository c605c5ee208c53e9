"""The aiohttp application factory: resources in cleanup_ctx, routes apart."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..config import Settings
from ..httpkit import errors_middleware, token_middleware
from ..runtime import open_runtime
from . import clones, handlers, spec
from .keys import CINDER, CLONES, HYPERVISOR, SERVICE, SETTINGS

log = logging.getLogger(__name__)

async def _runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    async with open_runtime(app[SETTINGS]) as runtime:
        app[HYPERVISOR] = runtime.hv
        app[SERVICE] = runtime.service
        app[CLONES] = runtime.clones
        app[CINDER] = runtime.cinder
        yield


def create_app(settings: Settings) -> web.Application:
    middlewares: list[Middleware] = [errors_middleware]
    if any(address.startswith("tcp:") for address in settings.listen):
        middlewares.insert(0, token_middleware(settings.token, frozenset({"/openapi.json"}),
                                               tcp_only=True))
    app = web.Application(middlewares=middlewares)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_runtime_ctx)
    handlers.setup_routes(app)
    clones.setup_routes(app)
    spec.setup(app)
    return app
