"""The metadata service's clone calls, in the snapshots' action style.

``create-clone-metadata`` is an action of the source snapshot (the store
checks it holds); ``finalize-clone-metadata``, ``update-clone-metadata`` and
``clone-delete-metadata`` are actions of the clone.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..errors import BadRequest
from ..httpkit import get_string, json_body, one_action, only_keys
from ..metadata import Attachment, CloneChange, CloneMeta, CloneMode, CloneStatus, NewClone
from .keys import STORE

CLONE_ACTIONS = ("finalize-clone-metadata", "update-clone-metadata", "clone-delete-metadata")


def _answer(meta: CloneMeta) -> web.Response:
    return web.json_response({"clone": meta.to_dict()})


def _required(body: dict[str, Any], key: str) -> str:
    value = get_string(body, key)
    if not value:
        raise BadRequest(f"{key} is required", code="invalid_request")
    return value


def _choice(kind: type[CloneStatus] | type[CloneMode], value: Any, key: str) -> Any:
    try:
        return kind(value)
    except ValueError as err:
        raise BadRequest(f"{key} must be one of {[m.value for m in kind]}",
                         code="invalid_request") from err


def attachment(doc: Any) -> Attachment:
    if not isinstance(doc, dict):
        raise BadRequest("attached_to must be an object or null", code="invalid_request")
    only_keys(doc, {"domain", "target", "readonly"}, "attached_to")
    readonly = doc.get("readonly", False)
    if not isinstance(readonly, bool):
        raise BadRequest("attached_to.readonly must be true or false", code="invalid_request")
    return Attachment(_required(doc, "domain"), _required(doc, "target"), readonly)


async def create_clone(request: web.Request, snapshot_id: str,
                       body: dict[str, Any]) -> web.Response:
    only_keys(body, {"clone_id", "name", "mode", "file", "image", "size", "created_at"},
              "create-clone-metadata")
    size = body.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**63:
        raise BadRequest("size must be a non-negative 64-bit integer", code="invalid_request")
    new = NewClone(
        clone_id=_required(body, "clone_id"), source_snapshot=snapshot_id,
        name=get_string(body, "name") or "", mode=_choice(CloneMode, body.get("mode"), "mode"),
        file=_required(body, "file"), image=get_string(body, "image"), size=size,
        created_at=_required(body, "created_at"),
    )
    return _answer(await request.app[STORE].create_clone_metadata(new))


async def _finalize(request: web.Request, cid: str, body: dict[str, Any]) -> web.Response:
    only_keys(body, {"status", "error"}, "finalize-clone-metadata")
    status = _choice(CloneStatus, body.get("status"), "status")
    meta = await request.app[STORE].finalize_clone_metadata(cid, status,
                                                            get_string(body, "error"))
    return _answer(meta)


async def _update(request: web.Request, cid: str, body: dict[str, Any]) -> web.Response:
    only_keys(body, {"status", "mode", "attached_to", "error"}, "update-clone-metadata")
    status, mode = body.get("status"), body.get("mode")
    detach = "attached_to" in body and body["attached_to"] is None
    change = CloneChange(
        status=_choice(CloneStatus, status, "status") if status is not None else None,
        mode=_choice(CloneMode, mode, "mode") if mode is not None else None,
        attached_to=attachment(body["attached_to"]) if body.get("attached_to") else None,
        detach=detach, error=get_string(body, "error"),
    )
    return _answer(await request.app[STORE].update_clone_metadata(cid, change))


async def _delete(request: web.Request, cid: str, body: dict[str, Any]) -> web.Response:
    only_keys(body, set(), "clone-delete-metadata")
    await request.app[STORE].clone_delete_metadata(cid)
    return web.Response(status=204)


_ACTIONS = {
    "finalize-clone-metadata": _finalize,
    "update-clone-metadata": _update,
    "clone-delete-metadata": _delete,
}


async def clone_action(request: web.Request) -> web.Response:
    name, body = one_action(await json_body(request), tuple(_ACTIONS))
    return await _ACTIONS[name](request, request.match_info["id"], body)


async def list_clones(request: web.Request) -> web.Response:
    only_keys(dict(request.query), {"snapshot_id", "volume_id"}, "the query")
    metas = await request.app[STORE].list_clones(request.query.get("snapshot_id"),
                                                 request.query.get("volume_id"))
    return web.json_response({"clones": [m.to_dict() for m in metas]})


async def get_clone(request: web.Request) -> web.Response:
    return _answer(await request.app[STORE].get_clone(request.match_info["id"]))


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/clones/{id}/action", clone_action)
    app.router.add_get("/v1/clones", list_clones)
    app.router.add_get("/v1/clones/{id}", get_clone)
