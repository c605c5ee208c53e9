"""The metadata service's OpenAPI document (served at ``/openapi.json``)."""

from __future__ import annotations

from aiohttp import web

from .. import __version__
from ..metadata import LIMIT_FIELDS, CloneMode, CloneStatus, Consistency, Origin
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

OPT = nullable("string")


def _action(name: str, body: Schema) -> Schema:
    return obj([name], {name: body}, closed=True)


ORIGINS = [o.value for o in Origin]
CONSISTENCY = nullable("string", enum=[*(c.value for c in Consistency), None])
CLONE_STATUSES = [s.value for s in CloneStatus]
MODES = [m.value for m in CloneMode]
ATTACHMENT = obj(["domain", "target"], {"domain": STRING, "target": STRING,
                                        "readonly": {"type": "boolean"}}, closed=True)
SCHEMAS: Schema = {
    "Snapshot": obj(
        ["id", "volume_id", "name", "description", "size", "created_at", "domain",
         "group_id", "target", "status", "file", "backing_file", "consistency", "error",
         "progress"],
        {"id": STRING, "volume_id": STRING, "name": STRING, "description": STRING,
         "size": {"type": "integer"}, "created_at": STRING, "domain": STRING,
         "group_id": OPT, "target": OPT, "status": {"type": "string", "enum": STATUSES},
         "file": OPT, "backing_file": OPT,
         "consistency": CONSISTENCY,
         "error": OPT, "progress": OPT, "schedule": OPT, "parent": OPT,
         "origin": {"type": "string", "enum": ORIGINS}, "domain_state": OPT,
         "memory_file": OPT},
    ),
    "SnapshotAnswer": obj(["snapshot"], {"snapshot": ref("Snapshot")}),
    "CreateAction": _action("create-snapshot-metadata", obj(
        ["snapshot_id", "size", "created_at", "domain"],
        {"snapshot_id": STRING, "name": STRING, "description": STRING,
         "size": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
         "created_at": STRING, "domain": STRING,
         "group_id": OPT, "target": OPT, "schedule": OPT, "parent": OPT,
         "origin": {"type": "string", "enum": ORIGINS}, "domain_state": OPT,
         "memory_file": OPT}, closed=True)),
    "Limits": obj(list(LIMIT_FIELDS), LIMIT_PROPERTIES, closed=True),
    "LimitsAnswer": obj(["limits"], {"limits": ref("Limits")}),
    "LimitsAction": _action("update-volume-limits", obj([], LIMIT_PROPERTIES, closed=True)),
    "SnapshotAction": {"oneOf": [
        _action("finalize-snapshot-metadata", obj(
            ["status"],
            {"status": {"type": "string", "enum": ["available", "error"]}, "file": OPT,
             "backing_file": OPT,
             "consistency": CONSISTENCY,
             "error": OPT}, closed=True)),
        _action("update-snapshot-status", obj(
            ["status"], {"status": {"type": "string", "enum": ["deleting", "error_deleting"]},
                         "progress": STRING}, closed=True)),
        _action("snapshot-delete-metadata", obj([], {}, closed=True)),
        _action("update-snapshot-metadata", obj(
            [], {"name": STRING, "description": STRING}, closed=True)),
        _action("update-snapshot-files", obj(
            [], {"file": STRING, "backing_file": STRING}, closed=True)),
        _action("create-clone-metadata", obj(
            ["clone_id", "mode", "file", "size", "created_at"],
            {"clone_id": STRING, "name": STRING, "mode": {"type": "string", "enum": MODES},
             "file": STRING, "image": OPT,
             "size": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
             "created_at": STRING}, closed=True)),
    ]},
    "Clone": obj(
        ["id", "name", "source_snapshot", "source_volume_id", "mode", "file", "image", "size",
         "status", "created_at", "attached_to", "error"],
        {"id": STRING, "name": STRING, "source_snapshot": STRING,
         "source_volume_id": STRING, "mode": {"type": "string", "enum": MODES},
         "file": STRING, "image": OPT, "size": {"type": "integer"},
         "status": {"type": "string", "enum": CLONE_STATUSES}, "created_at": STRING,
         "attached_to": {**ATTACHMENT, "nullable": True}, "error": OPT}),
    "CloneAnswer": obj(["clone"], {"clone": ref("Clone")}),
    "CinderAnswer": obj(["snapshot"], {"snapshot": obj(
        ["id", "volume_id", "status"],
        {"id": STRING, "volume_id": STRING, "name": STRING, "status": STRING,
         "progress": OPT, "created_at": STRING,
         "os-extended-snapshot-attributes:progress": OPT,
         "updates": {"type": "array", "items": obj(
             ["status"], {"status": STRING, "progress": OPT})}})}),
    "CloneAction": {"oneOf": [
        _action("finalize-clone-metadata", obj(
            ["status"], {"status": {"type": "string", "enum": ["available", "error"]},
                         "error": OPT}, closed=True)),
        _action("update-clone-metadata", obj(
            [], {"status": {"type": "string", "enum": CLONE_STATUSES},
                 "mode": {"type": "string", "enum": MODES},
                 "attached_to": {**ATTACHMENT, "nullable": True}, "error": STRING},
            closed=True)),
        _action("clone-delete-metadata", obj([], {}, closed=True)),
    ]},
}

PATHS: Schema = {
    "/v1/health": {"get": operation(
        "The service's state", 200, obj(["status"], {"status": STRING, "version": STRING}),
        [])},
    "/v1/volumes/{volume_id}/action": {"post": operation(
        "create-snapshot-metadata: record a snapshot as creating (idempotent on "
        "snapshot_id); update-volume-limits: set the limits named (null: back to the "
        "agent's default), answering a LimitsAnswer",
        200, {"oneOf": [ref("SnapshotAnswer"), ref("LimitsAnswer")]}, [400, 404, 409, 503],
        params=[path_param("volume_id")],
        body=json_body({"oneOf": [ref("CreateAction"), ref("LimitsAction")]}))},
    "/v1/volumes/{volume_id}/limits": {"get": operation(
        "The volume's own limits (null: the agent's default)", 200, ref("LimitsAnswer"),
        [404, 503], params=[path_param("volume_id")])},
    "/v1/snapshots/{id}/action": {"post": {
        **operation(
            "finalize-snapshot-metadata, update-snapshot-status, snapshot-delete-metadata "
            "(204), update-snapshot-metadata, update-snapshot-files, create-clone-metadata "
            "(answers a CloneAnswer)", 200,
            ref("SnapshotAnswer"), [400, 404, 409, 503], params=[path_param("id")],
            body=json_body(ref("SnapshotAction"))),
    }},
    "/v1/snapshots": {"get": operation(
        "Snapshot records, oldest first; parent: the snapshot whose image lies nearest "
        "below this one's (the tree's edge, as the agent recorded it)", 200,
        page_of("snapshots", ref("Snapshot")),
        [400, 503], params=[query_param("volume_id"), query_param("domain"),
                            query_param("status", {"type": "string", "enum": STATUSES}),
                            query_param("parent"), query_param("group_id"),
                            query_param("roots", {"type": "boolean"}),
                            *page_params()])},
    "/v1/snapshots/{id}": {"get": operation(
        "One snapshot record", 200, ref("SnapshotAnswer"), [404, 503],
        params=[path_param("id")])},
    "/v1/clones": {"get": operation(
        "Clone records, oldest first", 200, obj(["clones"], {"clones": {
            "type": "array", "items": ref("Clone")}}),
        [400, 503], params=[query_param("snapshot_id"), query_param("volume_id")])},
    "/v1/clones/{id}": {"get": operation(
        "One clone record", 200, ref("CloneAnswer"), [404, 503], params=[path_param("id")])},
    "/v1/clones/{id}/action": {"post": operation(
        "finalize-clone-metadata, update-clone-metadata, clone-delete-metadata (204)", 200,
        ref("CloneAnswer"), [400, 404, 409, 503], params=[path_param("id")],
        body=json_body(ref("CloneAction")))},
    "/v3/auth/tokens": {"post": operation(
        "Keystone stand-in: a v3 password session's token (the one user's password is the "
        "service's token; no token needed to ask)", 201, {"type": "object"}, [400],
        body=json_body({"type": "object"}))},
    "/v3/{project_id}/snapshots": {"post": operation(
        "Cinder stand-in: a snapshot, creating (as Cinder's API makes it before its driver "
        "asks Nova)", 202, ref("CinderAnswer"), [400], params=[path_param("project_id")],
        body=json_body(obj(["snapshot"], {"snapshot": obj(
            ["volume_id"], {"volume_id": STRING, "name": STRING})})))},
    "/v3/{project_id}/snapshots/{id}": {
        "get": operation("Cinder stand-in: one snapshot, with every status update it "
                         "received (updates)", 200, ref("CinderAnswer"), [404],
                         params=[path_param("project_id"), path_param("id")]),
        "delete": operation("Cinder stand-in: marks the snapshot deleting", 202, None,
                            [400, 404], params=[path_param("project_id"), path_param("id")]),
    },
    "/v3/{project_id}/snapshots/{id}/action": {"post": operation(
        "Cinder stand-in: os-update_snapshot_status (validated as Cinder does: its status "
        "map, an integer percentage) or os-reset_status", 202, None, [400, 404],
        params=[path_param("project_id"), path_param("id")],
        body=json_body({"oneOf": [
            _action("os-update_snapshot_status", obj(
                ["status"], {"status": STRING, "progress": STRING}, closed=True)),
            _action("os-reset_status", obj(["status"], {"status": STRING}, closed=True)),
        ]}))},
    "/metrics": {"get": operation("Prometheus metrics", 200, STRING, [],
                                  content_type="text/plain")},
    "/openapi.json": {"get": operation("This document", 200, {"type": "object"}, [])},
}
PATHS["/v1/snapshots/{id}/action"]["post"]["responses"]["204"] = {
    "description": "snapshot-delete-metadata: the record is gone"}
PATHS["/v1/clones/{id}/action"]["post"]["responses"]["204"] = {
    "description": "clone-delete-metadata: the record is gone"}

SPEC = document(
    "gasnap metadata service",
    "The contract's metadata protocol: two-phase snapshot records, Cinder's action style.",
    PATHS, SCHEMAS, __version__,
)


def setup(app: web.Application) -> None:
    add_route(app, SPEC)
