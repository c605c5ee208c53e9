"""The metadata service's application factory.

The service keeps no state of its own: every request is one transaction on
the store, so replicas behind a load balancer can share one PostgreSQL.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from .. import metrics
from ..errors import ConfigError
from ..httpkit import Handler, errors_middleware, run_app, token_middleware
from ..metastore import open_store
from . import handlers, spec
from .keys import DB_URL, STORE

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "unix:/run/gasnap/metadata.sock"
DEFAULT_DB = "sqlite:////var/lib/gasnap/metadata-service.db"
OPEN_PATHS = frozenset({"/openapi.json"})


@dataclass(frozen=True)
class ServiceSettings:
    listen: str = DEFAULT_LISTEN
    db_url: str = DEFAULT_DB
    token: str = ""

    def __post_init__(self) -> None:
        if not self.listen.startswith(("unix:", "tcp:")):
            raise ConfigError(f"listen must be unix:PATH or tcp:HOST:PORT, not {self.listen!r}")
        if self.listen.startswith("tcp:") and not self.token:
            raise ConfigError("listening on TCP needs a token (--token)")

    def __repr__(self) -> str:  # never print the token (or a database password)
        return f"ServiceSettings(listen={self.listen!r}, token={'***' if self.token else ''!r})"


@web.middleware
async def _count(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    route = request.match_info.route.resource
    call = route.canonical if route is not None else "unmatched"
    metrics.SERVICE_REQUESTS.labels(f"{request.method} {call}", str(response.status)).inc()
    return response


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = await open_store(app[DB_URL])
    app[STORE] = store
    yield
    await store.close()


def create_app(settings: ServiceSettings) -> web.Application:
    middlewares: list[Middleware] = [_count, errors_middleware]
    if settings.token:
        middlewares.insert(0, token_middleware(settings.token, OPEN_PATHS))
    app = web.Application(middlewares=middlewares)
    app[DB_URL] = settings.db_url
    app.cleanup_ctx.append(_store_ctx)
    handlers.setup_routes(app)
    spec.setup(app)
    return app


async def serve(settings: ServiceSettings) -> None:
    await run_app(create_app(settings), settings.listen, "gasnap metadata service")
