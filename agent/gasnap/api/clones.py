"""Thin handlers of the clone routes: parse, call the clone service, answer."""

from __future__ import annotations

from aiohttp import web

from ..httpkit import json_body, only_keys
from ..workflows.cloneplan import attach_from_doc, request_from_doc
from .keys import CLONES


def _task(task_record: dict[str, object]) -> web.Response:
    return web.json_response({"task": task_record}, status=202)


async def create_clone(request: web.Request) -> web.Response:
    clone = request_from_doc(request.match_info["id"], await json_body(request))
    return _task((await request.app[CLONES].create(clone)).to_record())


async def list_clones(request: web.Request) -> web.Response:
    only_keys(dict(request.query), {"snapshot_id"}, "the query")
    records = await request.app[CLONES].records(request.query.get("snapshot_id"))
    return web.json_response({"clones": records})


async def get_clone(request: web.Request) -> web.Response:
    return web.json_response(await request.app[CLONES].record(request.match_info["id"]))


async def attach_clone(request: web.Request) -> web.Response:
    attach = attach_from_doc(await json_body(request))
    return web.json_response(await request.app[CLONES].attach(request.match_info["id"], attach))


async def detach_clone(request: web.Request) -> web.Response:
    if request.can_read_body:
        only_keys(await json_body(request), set(), "the detach request")
    return web.json_response(await request.app[CLONES].detach(request.match_info["id"]))


async def flatten_clone(request: web.Request) -> web.Response:
    return _task((await request.app[CLONES].flatten(request.match_info["id"])).to_record())


async def delete_clone(request: web.Request) -> web.Response:
    return _task((await request.app[CLONES].delete(request.match_info["id"])).to_record())


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/snapshots/{id}/clone", create_clone)
    app.router.add_get("/v1/clones", list_clones)
    app.router.add_get("/v1/clones/{id}", get_clone)
    app.router.add_post("/v1/clones/{id}/attach", attach_clone)
    app.router.add_post("/v1/clones/{id}/detach", detach_clone)
    app.router.add_post("/v1/clones/{id}/flatten", flatten_clone)
    app.router.add_delete("/v1/clones/{id}", delete_clone)
