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
from ..httpkit import (
    Handler,
    errors_middleware,
    run_app,
    server_tls,
    token_middleware,
    warn_plain_tokens,
)
from ..metastore import open_store
from . import handlers, spec
from .keys import DB_URL, KEYSTONE_PASSWORD, KEYSTONE_TOKENS, STORE
from .keystone import IssuedTokens

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "unix:/run/gasnap/metadata.sock"
DEFAULT_DB = "sqlite:////var/lib/gasnap/metadata-service.db"
# the spec, and the stand-in Keystone's token route (its password is checked there)
OPEN_PATHS = frozenset({"/openapi.json", "/v3/auth/tokens"})


@dataclass(frozen=True)
class ServiceSettings:
    listen: str = DEFAULT_LISTEN
    db_url: str = DEFAULT_DB
    token: str = ""
    tls_cert: str = ""  # PEM: a TCP listener speaks TLS with it and tls_key
    tls_key: str = ""

    def __post_init__(self) -> None:
        if not self.listen.startswith(("unix:", "tcp:")):
            raise ConfigError(f"listen must be unix:PATH or tcp:HOST:PORT, not {self.listen!r}")
        if self.listen.startswith("tcp:") and not self.token:
            raise ConfigError("listening on TCP needs a token (--token-file or --token)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_cert and not self.listen.startswith("tcp:"):
            raise ConfigError("--tls-cert: TLS is for a TCP listener")

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
    issued = IssuedTokens.from_env()
    if settings.token:
        middlewares.insert(0, token_middleware(settings.token, OPEN_PATHS, also=issued.good))
    app = web.Application(middlewares=middlewares)
    app[DB_URL] = settings.db_url
    app[KEYSTONE_PASSWORD] = settings.token
    app[KEYSTONE_TOKENS] = issued
    app.cleanup_ctx.append(_store_ctx)
    handlers.setup_routes(app)
    spec.setup(app)
    return app


async def serve(settings: ServiceSettings) -> None:
    what = "gasnap metadata service"
    tls = server_tls(settings.tls_cert, settings.tls_key) if settings.tls_cert else None
    if settings.token:
        warn_plain_tokens([settings.listen], tls is not None, what)
    await run_app(create_app(settings), [settings.listen], what, tls=tls)
