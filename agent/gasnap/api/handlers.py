"""Thin handlers: parse the request, call the library, shape the answer."""

from __future__ import annotations

from aiohttp import web

from .. import __version__
from .keys import HYPERVISOR


async def health(request: web.Request) -> web.Response:
    libvirt = "connected" if request.app[HYPERVISOR].connected else "disconnected"
    return web.json_response({"status": "ok", "version": __version__, "libvirt": libvirt})


async def list_domains(request: web.Request) -> web.Response:
    domains = await request.app[HYPERVISOR].list_domains()
    return web.json_response({"domains": [d.to_record() for d in domains]})


async def get_domain(request: web.Request) -> web.Response:
    domain = await request.app[HYPERVISOR].get_domain(request.match_info["name"])
    return web.json_response(domain.to_record())


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/domains", list_domains)
    app.router.add_get("/v1/domains/{name}", get_domain)
