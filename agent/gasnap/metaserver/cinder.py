"""Cinder's snapshot routes, on the reference service's stand-in for them.

``POST /v3/{project_id}/snapshots/{id}/action`` with
``os-update_snapshot_status`` is what python-cinderclient sends for
gasnap (as for Nova); the others let a test or a lab play Cinder's API and
driver around it (create, read, reset, delete), and ``/v3/auth/tokens``
(``keystone``) lets a Keystone v3 password session authenticate.  Answers have Cinder's
shapes and status codes (202 for actions).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..errors import BadRequest
from ..httpkit import get_object, get_string, json_body, one_action, only_keys
from . import keys, keystone

_ACTIONS = ("os-update_snapshot_status", "os-reset_status")


def _answer(snapshot: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response({"snapshot": snapshot}, status=status)


async def create(request: web.Request) -> web.Response:
    body = get_object(await json_body(request), "snapshot")
    volume_id = get_string(body, "volume_id")
    if not volume_id:
        raise BadRequest("snapshot.volume_id is required", code="badRequest")
    made = await request.app[keys.STORE].cinder_create(
        request.match_info["project_id"], volume_id, get_string(body, "name") or "")
    return _answer(made, 202)


async def show(request: web.Request) -> web.Response:
    return _answer(await request.app[keys.STORE].cinder_get(request.match_info["project_id"],
                                                       request.match_info["id"]))


async def delete(request: web.Request) -> web.Response:
    await request.app[keys.STORE].cinder_delete(request.match_info["project_id"],
                                           request.match_info["id"])
    return web.Response(status=202)


async def action(request: web.Request) -> web.Response:
    name, body = one_action(await json_body(request), _ACTIONS, code="badRequest")
    project, sid = request.match_info["project_id"], request.match_info["id"]
    status = get_string(body, "status")
    if not status:
        raise BadRequest("'status' must be specified.", code="badRequest")
    if name == "os-update_snapshot_status":
        only_keys(body, {"status", "progress"}, name)
        await request.app[keys.STORE].cinder_update_status(project, sid, status,
                                                      get_string(body, "progress"))
    else:
        only_keys(body, {"status"}, name)
        await request.app[keys.STORE].cinder_reset_status(project, sid, status)
    return web.Response(status=202)


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v3/auth/tokens", keystone.issue_token)
    app.router.add_post("/v3/{project_id}/snapshots", create)
    app.router.add_get("/v3/{project_id}/snapshots/{id}", show)
    app.router.add_delete("/v3/{project_id}/snapshots/{id}", delete)
    app.router.add_post("/v3/{project_id}/snapshots/{id}/action", action)
