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
from typing import Any

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


@dataclass(frozen=True)
class Operation:
    id: str
    kind: str
    step: str
    payload: dict[str, Any]


class Journal:
    def __init__(self, path: Path) -> None:
        self._db = SqliteDB(path, SCHEMA)
        # Operations a workflow of this process is still driving; the others
        # (left by a crash, or released) are for recovery to settle.
        self._active: set[str] = set()

    def close(self) -> None:
        self._db.close()

    # operations

    async def begin(self, kind: str, step: str, payload: dict[str, Any]) -> Operation:
        op = Operation(str(uuid.uuid4()), kind, step, payload)
        now = time.time()
        await self._db.run(lambda c: c.execute(
            "INSERT INTO operations VALUES (?,?,?,?,?,?)",
            (op.id, kind, step, json.dumps(payload), now, now),
        ))
        self._active.add(op.id)
        log.debug("%s %s: %s", kind, op.id, step)
        return op

    async def step(self, op: Operation, step: str, **updates: Any) -> Operation:
        """Record that OP is about to do STEP (with payload UPDATES)."""
        payload = {**op.payload, **updates}
        await self._db.run(lambda c: c.execute(
            "UPDATE operations SET step=?, payload=?, updated=? WHERE id=?",
            (step, json.dumps(payload), time.time(), op.id),
        ))
        log.debug("%s %s: %s", op.kind, op.id, step)
        return Operation(op.id, op.kind, step, payload)

    async def finish(self, op: Operation) -> None:
        await self._db.run(lambda c: c.execute("DELETE FROM operations WHERE id=?", (op.id,)))
        self._active.discard(op.id)
        log.debug("%s %s: done", op.kind, op.id)

    def release(self, op: Operation) -> None:
        """The workflow gives OP up unfinished: recovery will settle it."""
        self._active.discard(op.id)

    async def unfinished(self) -> list[Operation]:
        """Operations no workflow of this process is driving, oldest first."""
        def run(conn: sqlite3.Connection) -> list[Operation]:
            rows = conn.execute("SELECT * FROM operations ORDER BY created").fetchall()
            return [Operation(r["id"], r["kind"], r["step"], json.loads(r["payload"]))
                    for r in rows]

        ops = await self._db.run(run)
        return [op for op in ops if op.id not in self._active]

    # tasks

    async def save_task(self, doc: dict[str, Any]) -> None:
        await self._db.run(lambda c: c.execute(
            "INSERT INTO tasks VALUES (?,?,?) ON CONFLICT(id) DO UPDATE SET doc=excluded.doc,"
            " updated=excluded.updated",
            (doc["id"], json.dumps(doc), time.time()),
        ))

    async def load_tasks(self) -> list[dict[str, Any]]:
        def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute("SELECT doc FROM tasks ORDER BY rowid").fetchall()
            return [json.loads(r["doc"]) for r in rows]

        return await self._db.run(run)
