"""``snapshot manageable|manage|unmanage``: existing layers adopted as
snapshots, and records forgotten, each one API call."""

from __future__ import annotations

import argparse
from typing import Any

from . import output
from .commands import _client, _quote, _show


def _layers(records: list[dict[str, Any]]) -> None:
    output.table(
        ("FILE", "SIZE", "SAFE", "SNAPSHOT", "BACKING", "WHY NOT"),
        ((r["reference"]["file"], r["size"], "yes" if r["safe_to_manage"] else "no",
          r["snapshot_id"] or "-", r["backing"] or "-", r["reason_not_safe"] or "-")
         for r in records))


def snapshot_manageable(args: argparse.Namespace) -> int:
    layers = _client(args).get(f"/v1/volumes/{_quote(args.volume)}/manageable")
    _show(args, layers, _layers)
    return 0


def snapshot_manage(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"volume_id": args.volume, "ref": {"file": args.file}}
    if args.name is not None:
        body["name"] = args.name
    record = _client(args).request("POST", "/v1/snapshots/manage", body)
    _show(args, record, output.snapshot)
    return 0


def snapshot_unmanage(args: argparse.Namespace) -> int:
    _client(args).request("POST", f"/v1/snapshots/{_quote(args.id)}/unmanage", {})
    _show(args, {"unmanaged": args.id}, lambda doc: print(f"unmanaged {doc['unmanaged']}"))
    return 0
