"""The agent's OpenAPI document (served at ``/openapi.json``)."""

from __future__ import annotations

from aiohttp import web

from .. import __version__
from ..openapi import (
    LIMIT_PROPERTIES,
    STATUSES,
    STRING,
    Schema,
    add_route,
    document,
    json_body,
    nullable,
    obj,
    operation,
    page_of,
    page_params,
    path_param,
    query_param,
    ref,
)
from ..quiesce import VALUES as QUIESCE_VALUES

NAMES = {"type": "array", "items": STRING}

SCHEMAS: Schema = {
    "VolumeLimits": obj(
        ["max_snapshots", "soft_limit_percent", "auto_delete", "max_chain_depth", "own",
         "soft_snapshots", "soft_chain_depth", "snapshots", "chain_depth"],
        {"max_snapshots": {"type": "integer"}, "soft_limit_percent": {"type": "integer"},
         "auto_delete": {"type": "boolean"}, "max_chain_depth": {"type": "integer"},
         "own": NAMES, "soft_snapshots": {"type": "integer"},
         "soft_chain_depth": {"type": "integer"}, "snapshots": {"type": "integer"},
         "chain_depth": nullable("integer")}),
    "Snapshot": obj(
        ["id", "name", "description", "domain", "volume_id", "target", "status",
         "consistency", "file", "image", "parent", "group_id", "created_at", "size", "error"],
        {"id": STRING, "name": STRING, "description": STRING, "domain": STRING,
         "volume_id": STRING, "target": nullable("string"),
         "status": {"type": "string", "enum": STATUSES},
         "consistency": nullable("string", enum=["memory", "filesystem", "crash", "unknown", None]),
         "file": nullable("string"), "image": nullable("string"),
         "parent": nullable("string"), "group_id": nullable("string"),
         "created_at": STRING, "size": {"type": "integer"}, "error": nullable("string"),
         "schedule": nullable("string"),
         "origin": {"type": "string", "enum": ["created", "before-revert", "managed"]},
         "domain_state": nullable("string"), "memory_file": nullable("string"),
         "memory_size": nullable("integer")},
    ),
    "Task": obj(
        ["id", "kind", "state", "progress"],
        {"id": STRING, "kind": STRING,
         "state": {"type": "string", "enum": ["queued", "running", "succeeded", "failed"]},
         "progress": {"type": "integer", "minimum": 0, "maximum": 100},
         "result": {"type": "object"},
         "error": obj(["code", "message"], {"code": STRING, "message": STRING})},
    ),
    "TaskAnswer": obj(["task"], {"task": ref("Task")}),
    "Manageable": obj(
        ["reference", "size", "safe_to_manage", "reason_not_safe", "snapshot_id", "backing"],
        {"reference": obj(["file"], {"file": STRING}), "size": {"type": "integer"},
         "safe_to_manage": {"type": "boolean"}, "reason_not_safe": nullable("string"),
         "snapshot_id": nullable("string"), "backing": nullable("string")}),
    "ManageRequest": obj(["volume_id", "ref"], {
        "volume_id": STRING, "ref": obj(["file"], {"file": STRING}, closed=True),
        "name": STRING, "description": STRING}, closed=True),
    "Schedule": obj(["name", "domains", "keep", "quiesce"],
                    {"name": STRING, "domains": NAMES, "keep": {"type": "integer", "minimum": 1},
                     "quiesce": {"type": "string", "enum": list(QUIESCE_VALUES)}}),
    "Volume": obj(["volume_id", "target", "active_file", "chain", "current"],
                  {"volume_id": STRING, "target": STRING, "active_file": STRING,
                   "chain": NAMES, "current": nullable("string")}),
    "Domain": obj(
        ["name", "state", "guest_agent", "volumes"],
        {"name": STRING, "state": STRING,
         "guest_agent": {"type": "string", "enum": ["connected", "absent", "unresponsive"]},
         "volumes": {"type": "array", "items": ref("Volume")}},
    ),
    "CreateRequest": obj(
        ["domains"],
        {"domains": {"type": "array", "items": {"type": "string", "minLength": 1},
                     "minItems": 1},
         "disks": {"type": "object", "additionalProperties": NAMES},
         "name": STRING, "description": STRING,
         "quiesce": {"type": "string", "enum": list(QUIESCE_VALUES)},
         "memory": {"type": "boolean"}, "force": {"type": "boolean"}},
        closed=True,
    ),
    "UpdateRequest": obj([], {"name": STRING, "description": STRING}, closed=True),
    "RevertRequest": obj([], {"scope": {"type": "string", "enum": ["group", "volume"]},
                              "force": {"type": "boolean"},
                              "start": nullable("boolean")}, closed=True),
    "Attach": obj(["domain"], {"domain": STRING, "target": {"type": "string",
                                                             "pattern": "^vd[a-z]{1,2}$"},
                               "readonly": {"type": "boolean"}}, closed=True),
    "CloneRequest": obj([], {"mode": {"type": "string", "enum": ["linked", "full"]},
                             "name": STRING, "attach": ref("Attach")}, closed=True),
    "Clone": obj(
        ["id", "name", "source_snapshot", "source_volume_id", "mode", "file", "size",
         "status", "attached_to", "created_at", "error"],
        {"id": STRING, "name": STRING, "source_snapshot": STRING,
         "source_volume_id": STRING, "mode": {"type": "string", "enum": ["linked", "full"]},
         "file": STRING, "image": nullable("string"), "size": {"type": "integer"},
         "status": {"type": "string",
                    "enum": ["creating", "available", "error", "deleting"]},
         "attached_to": {**obj(["domain", "target", "readonly"], {
             "domain": STRING, "target": STRING, "readonly": {"type": "boolean"}}),
             "nullable": True},
         "created_at": STRING, "error": nullable("string")}),
    "CloneAnswer": obj(["clone"], {"clone": ref("Clone")}),
    "NovaCreate": obj(["snapshot"], {"snapshot": obj(
        ["volume_id", "create_info"],
        {"volume_id": STRING, "create_info": obj(
            ["snapshot_id", "type", "new_file"],
            {"snapshot_id": STRING, "type": {"type": "string", "enum": ["qcow2"]},
             "new_file": STRING, "id": STRING})})}),
    "NovaSnapshot": obj(["snapshot"], {"snapshot": obj(
        ["id", "volumeId"], {"id": STRING, "volumeId": STRING})}),
}

_ID = [path_param("id")]

PATHS: Schema = {
    "/v1/health": {"get": operation(
        "The agent's state", 200,
        obj(["status"], {"status": STRING, "version": STRING, "libvirt": STRING,
                         "recovery": STRING}), [])},
    "/v1/domains": {"get": operation(
        "Domains with their volumes, chains and guest-agent state", 200,
        obj(["domains"], {"domains": {"type": "array", "items": ref("Domain")}}), [503])},
    "/v1/domains/{name}": {"get": operation(
        "One domain", 200, ref("Domain"), [404, 503], params=[path_param("name")])},
    "/v1/snapshots": {
        "post": operation("Snapshot volumes of one or more domains (one freeze window)",
                          202, ref("TaskAnswer"), [400, 404, 409, 501, 503, 507],
                          body=json_body(ref("CreateRequest"))),
        "get": operation(
            "Snapshot records, oldest first: all of them, or pages of limit after marker "
            "(next_marker is there while more remain)", 200,
            page_of("snapshots", ref("Snapshot")),
            [400, 503], params=[query_param("domain"), query_param("volume_id"),
                                query_param("status", {"type": "string", "enum": STATUSES}),
                                query_param("parent"),
                                query_param("roots", {"type": "boolean"}),
                                *page_params()]),
    },
    "/v1/snapshots/{id}": {
        "get": operation("One snapshot record", 200, ref("Snapshot"), [404, 503],
                         params=_ID),
        "patch": operation("Rename or describe a snapshot", 200, ref("Snapshot"),
                           [400, 404, 503], params=_ID, body=json_body(ref("UpdateRequest"))),
        "delete": operation(
            "Merge the snapshot out of its chain", 202, ref("TaskAnswer"),
            [400, 404, 409, 503, 507],
            params=[*_ID, query_param("strategy", {"type": "string",
                                                   "enum": ["auto", "commit", "pull"]}),
                    query_param("force", {"type": "string", "enum": ["true", "false"]})]),
    },
    "/v1/snapshots/{id}/revert": {"post": operation(
        "Go back to the snapshot (its whole group by default); the state left is kept as "
        "before-revert snapshots first. Result: reverted, before, domains", 202,
        ref("TaskAnswer"), [400, 404, 409, 501, 503, 507], params=_ID,
        body=json_body(ref("RevertRequest")))},
    "/v1/snapshots/{id}/clone": {"post": operation(
        "A new volume from the snapshot: linked (backed by its image) or full (a copy); "
        "attach it at once if asked. Result: clone", 202, ref("TaskAnswer"),
        [400, 404, 409, 501, 503, 507], params=_ID, body=json_body(ref("CloneRequest")))},
    "/v1/clones": {"get": operation(
        "Clone records, oldest first", 200,
        obj(["clones"], {"clones": {"type": "array", "items": ref("Clone")}}), [400, 503],
        params=[query_param("snapshot_id")])},
    "/v1/clones/{id}": {
        "get": operation("One clone record", 200, ref("Clone"), [404, 503], params=_ID),
        "delete": operation("Delete a clone (not while attached, nor while it has "
                            "snapshots)", 202, ref("TaskAnswer"), [404, 409, 503],
                            params=_ID),
    },
    "/v1/clones/{id}/attach": {"post": operation(
        "Hot-plug the clone into a running domain, or into a stopped one's definition "
        "(serial = clone id)", 200, ref("CloneAnswer"), [400, 404, 409, 501, 503],
        params=_ID,
        body=json_body(ref("Attach")))},
    "/v1/clones/{id}/detach": {"post": operation(
        "Unplug the clone (the guest is given a bounded time to let go)", 200,
        ref("CloneAnswer"), [400, 404, 409, 501, 503], params=_ID)},
    "/v1/clones/{id}/flatten": {"post": operation(
        "Make a linked clone independent of its snapshot (mode becomes full)", 202,
        ref("TaskAnswer"), [404, 409, 503], params=_ID)},
    "/v1/volumes/{volume_id}/manageable": {"get": operation(
        "Every layer of the volume's live chain, as Cinder lists manageable snapshots",
        200, {"type": "array", "items": ref("Manageable")}, [404, 409, 503],
        params=[path_param("volume_id")])},
    "/v1/volumes/{volume_id}/limits": {
        "get": operation(
            "The volume's limits in force (its own, else [limits]), which it sets itself, "
            "and its snapshots and chain depth now", 200, ref("VolumeLimits"), [404, 503],
            params=[path_param("volume_id")]),
        "put": operation(
            "Set the limits named (null: back to the agent's default); the others stay",
            200, ref("VolumeLimits"), [400, 404, 503], params=[path_param("volume_id")],
            body=json_body(obj([], LIMIT_PROPERTIES, closed=True))),
    },
    "/v1/snapshots/manage": {"post": operation(
        "Adopt a layer of the volume's live chain as a snapshot (origin managed, "
        "consistency unknown)", 200, ref("Snapshot"), [400, 404, 409, 503],
        body=json_body(ref("ManageRequest")))},
    "/v1/snapshots/{id}/unmanage": {"post": operation(
        "Forget a record (available or error); files and chain stay as they are", 204, None,
        [404, 409, 503], params=_ID)},
    "/v1/tasks": {"get": operation(
        "Tasks", 200, obj(["tasks"], {"tasks": {"type": "array", "items": ref("Task")}}), [])},
    "/v1/tasks/{id}": {"get": operation(
        "One task; ?wait=S long-polls (at most 60 s) until it ends", 200, ref("Task"),
        [400, 404],
        params=[*_ID, query_param("wait", {"type": "number", "minimum": 0, "maximum": 60})])},
    "/v1/schedules": {"get": operation(
        "Configured schedules", 200,
        obj(["schedules"], {"schedules": {"type": "array", "items": ref("Schedule")}}), [])},
    "/v1/schedules/{name}/run": {"post": operation(
        "Run a schedule now: one group snapshot of its domains, then retention", 202,
        ref("TaskAnswer"), [400, 404, 409, 503], params=[path_param("name")])},
    "/os-assisted-volume-snapshots": {"post": operation(
        "Nova's assisted snapshot of an attached volume (answers at once; a task works)",
        200, ref("NovaSnapshot"), [400, 404, 409, 503], body=json_body(ref("NovaCreate")))},
    "/os-assisted-volume-snapshots/{snapshot_id}": {"delete": operation(
        "Nova's assisted snapshot delete: commit or pull as delete_info says", 204, None,
        [400, 404, 409, 503],
        params=[path_param("snapshot_id"), query_param("delete_info", required=True)])},
    "/metrics": {"get": operation("Prometheus metrics", 200, STRING, [],
                                  content_type="text/plain")},
    "/openapi.json": {"get": operation("This document", 200, {"type": "object"}, [])},
}

SPEC = document(
    "gasnap agent", "Guest-assisted consistent live snapshots of libvirt/QEMU guests.",
    PATHS, SCHEMAS, __version__,
)


def setup(app: web.Application) -> None:
    add_route(app, SPEC)
