"""Thin handlers of the metadata service: parse, call the store, answer."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__, metrics
from ..errors import BadRequest
from ..httpkit import (
    get_string,
    json_body,
    one_action,
    only_keys,
    page_answer,
    page_query,
    roots_query,
)
from ..metadata import (
    Consistency,
    Finalization,
    NewSnapshot,
    Origin,
    SnapshotMeta,
    Status,
    check_limits,
)
from . import cinder, clones
from .keys import STORE

ACTIONS = ("finalize-snapshot-metadata", "update-snapshot-status", "snapshot-delete-metadata",
           "update-snapshot-metadata", "update-snapshot-files", "create-clone-metadata")
VOLUME_ACTIONS = ("create-snapshot-metadata", "update-volume-limits")
FINAL = {Status.AVAILABLE, Status.ERROR}


def _answer(meta: SnapshotMeta) -> web.Response:
    return web.json_response({"snapshot": meta.to_dict()})


def _enum(kind: type[Status] | type[Consistency] | type[Origin], value: Any, key: str) -> Any:
    try:
        return kind(value)
    except ValueError as err:
        raise BadRequest(f"{key} must be one of {[m.value for m in kind]}",
                         code="invalid_request") from err


def _required(doc: dict[str, Any], key: str) -> str:
    value = get_string(doc, key)
    if not value:
        raise BadRequest(f"{key} is required", code="invalid_request")
    return value


# --- create-snapshot-metadata ---------------------------------------------------


def _new_snapshot(volume_id: str, body: dict[str, Any]) -> NewSnapshot:
    only_keys(body, {"snapshot_id", "name", "description", "size", "created_at", "domain",
                     "group_id", "target", "schedule", "parent", "origin", "domain_state",
                     "memory_file"}, "create-snapshot-metadata")
    size = body.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**63:
        raise BadRequest("size must be a non-negative 64-bit integer", code="invalid_request")
    return NewSnapshot(
        snapshot_id=_required(body, "snapshot_id"), volume_id=volume_id,
        name=get_string(body, "name") or "", description=get_string(body, "description") or "",
        size=size, created_at=_required(body, "created_at"), domain=_required(body, "domain"),
        group_id=get_string(body, "group_id"), target=get_string(body, "target"),
        schedule=get_string(body, "schedule"), parent=get_string(body, "parent"),
        origin=_enum(Origin, get_string(body, "origin") or Origin.CREATED.value, "origin"),
        domain_state=get_string(body, "domain_state"),
        memory_file=get_string(body, "memory_file"),
    )


async def volume_action(request: web.Request) -> web.Response:
    name, body = one_action(await json_body(request), VOLUME_ACTIONS)
    volume_id = request.match_info["volume_id"]
    if name == "update-volume-limits":
        limits = await request.app[STORE].update_volume_limits(volume_id, check_limits(body))
        return web.json_response({"limits": limits.to_dict()})
    new = _new_snapshot(volume_id, body)
    return _answer(await request.app[STORE].create_snapshot_metadata(new))


async def volume_limits(request: web.Request) -> web.Response:
    limits = await request.app[STORE].get_volume_limits(request.match_info["volume_id"])
    return web.json_response({"limits": limits.to_dict()})


# --- snapshot actions -------------------------------------------------------------


async def _finalize(request: web.Request, sid: str, body: dict[str, Any]) -> web.Response:
    only_keys(body, {"status", "file", "backing_file", "consistency", "error"},
              "finalize-snapshot-metadata")
    status = _enum(Status, body.get("status"), "status")
    if status not in FINAL:
        raise BadRequest("finalize takes status available or error", code="invalid_request")
    consistency = body.get("consistency")
    final = Finalization(
        status=status, file=get_string(body, "file"),
        backing_file=get_string(body, "backing_file"),
        consistency=_enum(Consistency, consistency, "consistency") if consistency else None,
        error=get_string(body, "error"),
    )
    return _answer(await request.app[STORE].finalize_snapshot_metadata(sid, final))


async def _status(request: web.Request, sid: str, body: dict[str, Any]) -> web.Response:
    only_keys(body, {"status", "progress"}, "update-snapshot-status")
    status = _enum(Status, body.get("status"), "status")
    progress = get_string(body, "progress") or "0%"
    return _answer(await request.app[STORE].update_snapshot_status(sid, status, progress))


async def _delete(request: web.Request, sid: str, body: dict[str, Any]) -> web.Response:
    only_keys(body, set(), "snapshot-delete-metadata")
    await request.app[STORE].snapshot_delete_metadata(sid)
    return web.Response(status=204)


async def _rename(request: web.Request, sid: str, body: dict[str, Any]) -> web.Response:
    only_keys(body, {"name", "description"}, "update-snapshot-metadata")
    meta = await request.app[STORE].update_snapshot_metadata(
        sid, get_string(body, "name"), get_string(body, "description"))
    return _answer(meta)


async def _files(request: web.Request, sid: str, body: dict[str, Any]) -> web.Response:
    only_keys(body, {"file", "backing_file"}, "update-snapshot-files")
    meta = await request.app[STORE].update_snapshot_files(
        sid, get_string(body, "file"), get_string(body, "backing_file"))
    return _answer(meta)


_SNAPSHOT_ACTIONS = {
    "finalize-snapshot-metadata": _finalize,
    "update-snapshot-status": _status,
    "snapshot-delete-metadata": _delete,
    "update-snapshot-metadata": _rename,
    "update-snapshot-files": _files,
    "create-clone-metadata": clones.create_clone,
}


async def snapshot_action(request: web.Request) -> web.Response:
    name, body = one_action(await json_body(request), ACTIONS)
    return await _SNAPSHOT_ACTIONS[name](request, request.match_info["id"], body)


# --- reads ----------------------------------------------------------------------


async def list_snapshots(request: web.Request) -> web.Response:
    only_keys(dict(request.query), {"volume_id", "status", "domain", "limit", "marker",
                                    "parent", "roots", "group_id"}, "the query")
    status = request.query.get("status")
    limit, marker = page_query(request)
    metas = await request.app[STORE].list_snapshots(
        volume_id=request.query.get("volume_id"),
        status=_enum(Status, status, "status") if status is not None else None,
        domain=request.query.get("domain"),
        limit=None if limit is None else limit + 1, marker=marker,
        parent=request.query.get("parent"), roots=roots_query(request),
        group_id=request.query.get("group_id"),
    )
    return web.json_response(page_answer("snapshots", [m.to_dict() for m in metas], limit))


async def get_snapshot(request: web.Request) -> web.Response:
    return _answer(await request.app[STORE].get_snapshot(request.match_info["id"]))


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def prometheus(_request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(metrics.SERVICE),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v1/health", health)
    app.router.add_post("/v1/volumes/{volume_id:.+}/action", volume_action)
    app.router.add_get("/v1/volumes/{volume_id:.+}/limits", volume_limits)
    app.router.add_post("/v1/snapshots/{id}/action", snapshot_action)
    app.router.add_get("/v1/snapshots", list_snapshots)
    app.router.add_get("/v1/snapshots/{id}", get_snapshot)
    app.router.add_get("/metrics", prometheus)
    clones.setup_routes(app)
    cinder.setup_routes(app)
