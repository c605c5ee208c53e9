"""The crash-safe journal: what the agent is about to do, written before it does it.

Each operation (a create, later a delete) is one row with its current step and
everything needed to finish or undo it.  The step is written *before* the
action it names, so after a crash the journal says what may have happened
and recovery settles it from the live domain XML.  Tasks are kept here too,
so ``task show`` still answers after a restart.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, Unpack, cast

from .sqlitedb import SqliteDB

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS operations (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    step TEXT NOT NULL,
    payload TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    doc TEXT NOT NULL,
    updated REAL NOT NULL
);
"""


class Payload(TypedDict, total=False):
    """What an operation carries, read back by recovery: its plan (the
    workflow's ``to_dict``), the volumes it holds, and what its steps
    learned on the way."""

    plan: dict[str, Any]
    volumes: list[str]
    frozen: list[str]  # create, from "freezing": the domains whose freeze is its own
    consistency: dict[str, str]  # create, from "thawed": per domain, as proven
    attempts: int  # revert: how often recovery has tried to finish it


@dataclass(frozen=True)
class Operation:
    id: str
    kind: str  # a ``workflows.steps.Kind``
    step: str  # one of that kind's steps
    payload: Payload


def _volumes(payload: Payload) -> frozenset[str]:
    if "volumes" in payload:
        return frozenset(payload["volumes"])
    plan = payload.get("plan", {})  # entries written before "volumes" was
    if "volumes" in plan:
        return frozenset(v["volume_id"] for v in plan["volumes"])
    return frozenset([plan["volume_id"]]) if "volume_id" in plan else frozenset()


class Journal:
    def __init__(self, path: Path) -> None:
        self._db = SqliteDB(path, SCHEMA)
        # Operations a workflow of this process is still driving; the others
        # (left by a crash, or released) are for recovery to settle.
        self._active: set[str] = set()
        # The volumes of every unfinished operation known to this process:
        # until it is settled, nothing else may act on them.
        self._pending: dict[str, frozenset[str]] = {}

    def close(self) -> None:
        self._db.close()

    # operations

    async def begin(self, kind: str, step: str, plan: dict[str, Any],
                    volumes: list[str]) -> Operation:
        payload = Payload(plan=plan, volumes=sorted(volumes))
        op = Operation(str(uuid.uuid4()), kind, step, payload)
        now = time.time()
        await self._db.run(lambda c: c.execute(
            "INSERT INTO operations VALUES (?,?,?,?,?,?)",
            (op.id, kind, step, json.dumps(payload), now, now),
        ))
        self._active.add(op.id)
        self._pending[op.id] = frozenset(volumes)
        log.debug("%s %s: %s", kind, op.id, step)
        return op

    async def step(self, op: Operation, step: str, **updates: Unpack[Payload]) -> Operation:
        """Record that OP is about to do STEP (with payload UPDATES)."""
        payload = Payload(**{**op.payload, **updates})
        await self._db.run(lambda c: c.execute(
            "UPDATE operations SET step=?, payload=?, updated=? WHERE id=?",
            (step, json.dumps(payload), time.time(), op.id),
        ))
        log.debug("%s %s: %s", op.kind, op.id, step)
        return Operation(op.id, op.kind, step, payload)

    async def finish(self, op: Operation) -> None:
        await self._db.run(lambda c: c.execute("DELETE FROM operations WHERE id=?", (op.id,)))
        self._active.discard(op.id)
        self._pending.pop(op.id, None)
        log.debug("%s %s: done", op.kind, op.id)

    def release(self, op: Operation) -> None:
        """The workflow gives OP up unfinished: recovery will settle it, and
        its volumes stay held until then."""
        self._active.discard(op.id)

    def claim(self, op: Operation) -> None:
        """Recovery drives OP now (``release`` again if it cannot finish)."""
        self._active.add(op.id)

    def holder(self, volume: str) -> str | None:
        """The unfinished operation that holds VOLUME, if any."""
        for op_id, volumes in self._pending.items():
            if volume in volumes:
                return op_id
        return None

    async def unfinished(self) -> list[Operation]:
        """Operations no workflow of this process is driving, oldest first."""
        def run(conn: sqlite3.Connection) -> list[Operation]:
            rows = conn.execute("SELECT * FROM operations ORDER BY created").fetchall()
            return [Operation(r["id"], r["kind"], r["step"],
                              cast(Payload, json.loads(r["payload"])))
                    for r in rows]

        ops = await self._db.run(run)
        for op in ops:
            self._pending.setdefault(op.id, _volumes(op.payload))
        return [op for op in ops if op.id not in self._active]

    # tasks

    async def save_task(self, doc: dict[str, Any]) -> None:
        await self._db.run(lambda c: c.execute(
            "INSERT INTO tasks VALUES (?,?,?) ON CONFLICT(id) DO UPDATE SET doc=excluded.doc,"
            " updated=excluded.updated",
            (doc["id"], json.dumps(doc), time.time()),
        ))

    async def load_tasks(self, keep: int) -> list[dict[str, Any]]:
        """The newest KEEP tasks, oldest first; older ones are deleted."""
        def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            conn.execute("DELETE FROM tasks WHERE rowid NOT IN "
                         "(SELECT rowid FROM tasks ORDER BY rowid DESC LIMIT ?)", (keep,))
            rows = conn.execute("SELECT doc FROM tasks ORDER BY rowid").fetchall()
            return [json.loads(r["doc"]) for r in rows]

        return await self._db.run(run)
