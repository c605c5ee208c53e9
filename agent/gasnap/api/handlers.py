"""Thin handlers: parse the request, call the service, shape the answer."""

from __future__ import annotations

import contextlib
import math
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__, metrics, nova
from ..config import Schedule
from ..errors import BadRequest, NotFound, Unavailable
from ..httpkit import (
    get_string,
    json_body,
    only_keys,
    page_answer,
    page_query,
    roots_query,
)
from ..workflows.createplan import request_from_doc
from ..workflows.deleteplan import Strategy
from ..workflows.revertplan import Scope
from .keys import CINDER, HYPERVISOR, SERVICE, SETTINGS

MAX_WAIT = 60.0


# --- request parsing ----------------------------------------------------------


# --- handlers -----------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    hv = request.app[HYPERVISOR]
    if not hv.connected:
        with contextlib.suppress(Unavailable):
            await hv.connect()  # libvirtd may be back since the last call
    libvirt = "connected" if hv.connected else "disconnected"
    recovery = "done" if request.app[SERVICE].ready.is_set() else "pending"
    return web.json_response({"status": "ok", "version": __version__, "libvirt": libvirt,
                              "recovery": recovery})


async def list_domains(request: web.Request) -> web.Response:
    return web.json_response({"domains": await request.app[SERVICE].domain_records()})


async def get_domain(request: web.Request) -> web.Response:
    records = await request.app[SERVICE].domain_records(request.match_info["name"])
    return web.json_response(records[0])


async def create_snapshots(request: web.Request) -> web.Response:
    create = request_from_doc(await json_body(request))
    task = await request.app[SERVICE].create(create)
    return web.json_response({"task": task.to_record()}, status=202)


async def list_snapshots(request: web.Request) -> web.Response:
    query = request.query
    limit, marker = page_query(request)
    records = await request.app[SERVICE].records(
        domain=query.get("domain"), volume_id=query.get("volume_id"),
        status=query.get("status"), limit=None if limit is None else limit + 1, marker=marker,
        parent=query.get("parent"), roots=roots_query(request),
    )
    return web.json_response(page_answer("snapshots", records, limit))


async def get_snapshot(request: web.Request) -> web.Response:
    return web.json_response(await request.app[SERVICE].record(request.match_info["id"]))


async def update_snapshot(request: web.Request) -> web.Response:
    doc = await json_body(request)
    unknown = set(doc) - {"name", "description"}
    if unknown:
        raise BadRequest(f"only name and description can change, not {sorted(unknown)}",
                         code="invalid_request")
    record = await request.app[SERVICE].rename(
        request.match_info["id"], get_string(doc, "name"), get_string(doc, "description")
    )
    return web.json_response(record)


async def delete_snapshot(request: web.Request) -> web.Response:
    try:
        strategy = Strategy(request.query.get("strategy", "auto"))
    except ValueError as err:
        raise BadRequest("strategy must be auto, commit or pull",
                         code="invalid_request") from err
    force = request.query.get("force", "false")
    if force not in ("true", "false"):
        raise BadRequest("force must be true or false", code="invalid_request")
    task = await request.app[SERVICE].delete(request.match_info["id"], strategy,
                                             force=force == "true")
    return web.json_response({"task": task.to_record()}, status=202)


async def revert_snapshot(request: web.Request) -> web.Response:
    doc = await json_body(request)
    only_keys(doc, {"scope", "force", "start"}, "the revert request")
    try:
        scope = Scope(get_string(doc, "scope") or Scope.GROUP.value)
    except ValueError as err:
        raise BadRequest("scope must be group or volume", code="invalid_request") from err
    force, start = doc.get("force", False), doc.get("start")
    if not isinstance(force, bool) or not (start is None or isinstance(start, bool)):
        raise BadRequest("force and start must be true or false", code="invalid_request")
    task = await request.app[SERVICE].revert(request.match_info["id"], scope, force=force,
                                             start=start)
    return web.json_response({"task": task.to_record()}, status=202)


async def manageable(request: web.Request) -> web.Response:
    layers = await request.app[SERVICE].manageable(request.match_info["volume_id"])
    return web.json_response(layers)  # the contract: a list, as Cinder lists them


async def manage_snapshot(request: web.Request) -> web.Response:
    doc = await json_body(request)
    only_keys(doc, {"volume_id", "ref", "name", "description"}, "the manage request")
    volume_id, ref = get_string(doc, "volume_id"), doc.get("ref")
    if not volume_id or not isinstance(ref, dict) or set(ref) != {"file"} \
            or not isinstance(ref["file"], str):
        raise BadRequest('manage takes {"volume_id", "ref": {"file"}}', code="invalid_request")
    record = await request.app[SERVICE].manage(volume_id, ref["file"],
                                               get_string(doc, "name") or "",
                                               get_string(doc, "description") or "")
    return web.json_response(record)


async def unmanage_snapshot(request: web.Request) -> web.Response:
    await request.app[SERVICE].unmanage(request.match_info["id"])
    return web.Response(status=204)


async def volume_limits(request: web.Request) -> web.Response:
    return web.json_response(
        await request.app[SERVICE].volume_limits(request.match_info["volume_id"]))


async def set_volume_limits(request: web.Request) -> web.Response:
    record = await request.app[SERVICE].set_volume_limits(request.match_info["volume_id"],
                                                          await json_body(request))
    return web.json_response(record)


async def list_tasks(request: web.Request) -> web.Response:
    tasks = request.app[SERVICE].tasks.list()
    return web.json_response({"tasks": [t.to_record() for t in tasks]})


async def get_task(request: web.Request) -> web.Response:
    """``?wait=SECONDS`` (at most 60) long-polls until the task ends."""
    try:
        wait = float(request.query.get("wait", "0"))
    except ValueError as err:
        raise BadRequest("wait must be a number of seconds", code="invalid_request") from err
    if not math.isfinite(wait):
        # nan passes every comparison and would break the loop's timer heap.
        raise BadRequest("wait must be a finite number of seconds", code="invalid_request")
    wait = min(wait, MAX_WAIT)
    task = await request.app[SERVICE].tasks.wait(request.match_info["id"], max(wait, 0.0))
    return web.json_response(task.to_record())


# --- schedules ------------------------------------------------------------------


class ScheduleNotFound(NotFound):
    code = "schedule_not_found"


def _schedule_record(schedule: Schedule) -> dict[str, Any]:
    return {"name": schedule.name, "domains": list(schedule.domains), "keep": schedule.keep,
            "quiesce": schedule.quiesce.value}


async def list_schedules(request: web.Request) -> web.Response:
    schedules = request.app[SETTINGS].schedules.values()
    return web.json_response({"schedules": [_schedule_record(s) for s in schedules]})


async def run_schedule(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    schedule = request.app[SETTINGS].schedules.get(name)
    if schedule is None:
        raise ScheduleNotFound(f"no schedule {name} in the configuration")
    task = await request.app[SERVICE].run_schedule(schedule)
    return web.json_response({"task": task.to_record()}, status=202)


# --- Nova's os-assisted-volume-snapshots ------------------------------------------


async def nova_create(request: web.Request) -> web.Response:
    call = nova.parse_create(await json_body(request))
    await nova.create(request.app[SERVICE], call, request.app[CINDER])
    return web.json_response({"snapshot": {"id": call.reply_id, "volumeId": call.volume_id}})


async def nova_delete(request: web.Request) -> web.Response:
    call = nova.parse_delete(request.query.get("delete_info"))
    await nova.delete(request.app[SERVICE], request.match_info["snapshot_id"], call,
                      request.app[CINDER])
    return web.Response(status=204)


async def prometheus(request: web.Request) -> web.Response:
    metrics.TASKS.clear()
    for task in request.app[SERVICE].tasks.list():
        metrics.TASKS.labels(task.kind, task.state.value).inc()
    return web.Response(body=generate_latest(metrics.AGENT),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/domains", list_domains)
    app.router.add_get("/v1/domains/{name}", get_domain)
    app.router.add_post("/v1/snapshots", create_snapshots)
    app.router.add_get("/v1/snapshots", list_snapshots)
    app.router.add_get("/v1/snapshots/{id}", get_snapshot)
    app.router.add_patch("/v1/snapshots/{id}", update_snapshot)
    app.router.add_delete("/v1/snapshots/{id}", delete_snapshot)
    app.router.add_post("/v1/snapshots/{id}/revert", revert_snapshot)
    app.router.add_post("/v1/snapshots/manage", manage_snapshot)
    app.router.add_post("/v1/snapshots/{id}/unmanage", unmanage_snapshot)
    app.router.add_get("/v1/volumes/{volume_id:.+}/manageable", manageable)
    app.router.add_get("/v1/volumes/{volume_id:.+}/limits", volume_limits)
    app.router.add_put("/v1/volumes/{volume_id:.+}/limits", set_volume_limits)
    app.router.add_get("/v1/tasks", list_tasks)
    app.router.add_get("/v1/tasks/{id}", get_task)
    app.router.add_get("/v1/schedules", list_schedules)
    app.router.add_post("/v1/schedules/{name}/run", run_schedule)
    app.router.add_post("/os-assisted-volume-snapshots", nova_create)
    app.router.add_delete("/os-assisted-volume-snapshots/{snapshot_id}", nova_delete)
    app.router.add_get("/metrics", prometheus)
