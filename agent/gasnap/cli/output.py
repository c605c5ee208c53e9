"""Printing records: ``--json`` for machines, short tables for people."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
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
