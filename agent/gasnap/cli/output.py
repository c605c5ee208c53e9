"""Printing records: ``--json`` for machines, short tables for people."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence

# typing for the type checker only, as in gasnap.errors (the CLI's imports stay light)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def emit_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def domains(records: list[dict[str, Any]]) -> None:
    rows = []
    for dom in records:
        vols = dom["volumes"] or [None]
        for i, vol in enumerate(vols):
            head = (dom["name"], dom["state"], dom["guest_agent"]) if i == 0 else ("", "", "")
            if vol is None:
                rows.append((*head, "-", "-", "-"))
            else:
                rows.append((*head, vol["target"], vol["volume_id"], len(vol["chain"])))
    table(("DOMAIN", "STATE", "AGENT", "DISK", "VOLUME", "CHAIN"), rows)


def snapshots(records: list[dict[str, Any]]) -> None:
    table(
        ("ID", "DOMAIN", "DISK", "STATUS", "CONSISTENCY", "CREATED", "PARENT", "NAME"),
        ((r["id"], r["domain"], r["target"] or "-", r["status"], r["consistency"] or "-",
          r["created_at"][:19], (r.get("parent") or "-")[:8], r["name"]) for r in records),
    )


def clones(records: list[dict[str, Any]]) -> None:
    def where(r: dict[str, Any]) -> str:
        at = r.get("attached_to")
        if not at:
            return "-"
        return f"{at['domain']}/{at['target']}" + (" (ro)" if at["readonly"] else "")

    table(
        ("ID", "MODE", "STATUS", "SNAPSHOT", "ATTACHED", "SIZE", "NAME"),
        ((r["id"], r["mode"], r["status"], r["source_snapshot"][:8], where(r), r["size"],
          r["name"]) for r in records),
    )


def snapshot(record: dict[str, Any]) -> None:
    width = max(len(k) for k in record)
    for key, value in record.items():
        print(f"{key:<{width}}  {'-' if value is None else value}")


def task(record: dict[str, Any]) -> None:
    print(f"task {record['id']} ({record['kind']}): {record['state']}, {record['progress']}%")
    if record.get("error"):
        print(f"error: {record['error']['message']}")
    result = record.get("result") or {}
    if isinstance(result.get("clone"), dict):
        made = result["clone"]
        print(f"  clone {made['id']}  {made['mode']}  {made['status']}  {made['file']}")
    for snap in result.get("snapshots", []):
        print(f"  {snap['id']}  {snap['domain']}/{snap['target']}  {snap['status']}"
              f"  {snap['consistency'] or '-'}")
    for merged in result.get("deleted", []):
        print(f"  deleted {merged}")
    for warning in result.get("warnings", []):
        print(f"warning: {warning}")
    if "reverted" in result:
        print(f"  reverted to {', '.join(result['reverted'])} on {', '.join(result['domains'])}")
        print(f"  undo: revert to {', '.join(result['before']) or '(nothing kept)'}")


def tasks(records: list[dict[str, Any]]) -> None:
    table(("ID", "KIND", "STATE", "PROGRESS"),
          ((t["id"], t["kind"], t["state"], f"{t['progress']}%") for t in records))


def checks(records: list[dict[str, Any]]) -> None:
    for check in records:
        status = "FAIL" if check["status"] == "fail" else check["status"]
        print(f"{status:<4}  {check['check']}: {check['detail']}")
