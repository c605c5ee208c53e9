"""The embedded metadata store: SQLite under the agent's state dir.

It enforces the contract's rules itself (status transitions, idempotency on
``snapshot_id``) so that the agent behaves the same against it as against a
remote metadata service.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .metadata import (
    DELETABLE,
    Consistency,
    Finalization,
    MetadataError,
    NewSnapshot,
    SnapshotMeta,
    SnapshotNotFound,
    Status,
    WrongStatus,
    check_transition,
)
from .sqlitedb import SqliteDB

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    volume_id TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    domain TEXT NOT NULL,
    group_id TEXT,
    target TEXT,
    status TEXT NOT NULL,
    file TEXT,
    backing_file TEXT,
    consistency TEXT,
    error TEXT,
    progress TEXT
);
CREATE INDEX IF NOT EXISTS snapshots_volume ON snapshots (volume_id, created_at);
"""


def _row(row: sqlite3.Row) -> SnapshotMeta:
    return SnapshotMeta(
        id=row["id"], volume_id=row["volume_id"], name=row["name"],
        description=row["description"], size=row["size"], created_at=row["created_at"],
        domain=row["domain"], group_id=row["group_id"], target=row["target"],
        status=Status(row["status"]), file=row["file"], backing_file=row["backing_file"],
        consistency=Consistency(row["consistency"]) if row["consistency"] else None,
        error=row["error"], progress=row["progress"],
    )


def _get(conn: sqlite3.Connection, snapshot_id: str) -> SnapshotMeta:
    row = conn.execute("SELECT * FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
    if row is None:
        raise SnapshotNotFound(f"no snapshot {snapshot_id}")
    return _row(row)


class SqliteMetadata:
    """``MetadataService`` on a local SQLite file."""

    def __init__(self, path: Path) -> None:
        self._db = SqliteDB(path, SCHEMA)

    async def close(self) -> None:
        self._db.close()

    async def create_snapshot_metadata(self, new: NewSnapshot) -> SnapshotMeta:
        def run(conn: sqlite3.Connection) -> SnapshotMeta:
            try:
                existing = _get(conn, new.snapshot_id)
            except SnapshotNotFound:
                conn.execute(
                    "INSERT INTO snapshots (id, volume_id, name, description, size, created_at,"
                    " domain, group_id, target, status) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (new.snapshot_id, new.volume_id, new.name, new.description, new.size,
                     new.created_at, new.domain, new.group_id, new.target,
                     Status.CREATING.value),
                )
                return _get(conn, new.snapshot_id)
            if existing.volume_id != new.volume_id:
                raise WrongStatus(
                    f"snapshot {new.snapshot_id} already exists for volume {existing.volume_id}"
                )
            return existing  # a retried call: same answer

        return await self._db.run(run)

    async def finalize_snapshot_metadata(
        self, snapshot_id: str, final: Finalization
    ) -> SnapshotMeta:
        if final.status not in (Status.AVAILABLE, Status.ERROR):
            raise MetadataError(f"finalize takes available or error, not {final.status.value}")

        def run(conn: sqlite3.Connection) -> SnapshotMeta:
            current = _get(conn, snapshot_id)
            if current.status is final.status:
                return current  # idempotent
            check_transition(snapshot_id, current.status, final.status)
            conn.execute(
                "UPDATE snapshots SET status=?, file=?, backing_file=?, consistency=?, error=?"
                " WHERE id=?",
                (final.status.value, final.file, final.backing_file,
                 final.consistency.value if final.consistency else None, final.error,
                 snapshot_id),
            )
            return _get(conn, snapshot_id)

        return await self._db.run(run)

    async def update_snapshot_status(
        self, snapshot_id: str, status: Status, progress: str
    ) -> SnapshotMeta:
        def run(conn: sqlite3.Connection) -> SnapshotMeta:
            current = _get(conn, snapshot_id)
            if current.status is not status:
                check_transition(snapshot_id, current.status, status)
            conn.execute("UPDATE snapshots SET status=?, progress=? WHERE id=?",
                         (status.value, progress, snapshot_id))
            return _get(conn, snapshot_id)

        return await self._db.run(run)

    async def update_snapshot_metadata(
        self, snapshot_id: str, name: str | None, description: str | None
    ) -> SnapshotMeta:
        return await self._update(snapshot_id, name=name, description=description)

    async def update_snapshot_files(
        self, snapshot_id: str, file: str | None, backing_file: str | None
    ) -> SnapshotMeta:
        return await self._update(snapshot_id, file=file, backing_file=backing_file)

    async def _update(self, snapshot_id: str, **changes: str | None) -> SnapshotMeta:
        """Set the given columns (None: leave as is) of an existing record."""
        wanted = {column: value for column, value in changes.items() if value is not None}

        def run(conn: sqlite3.Connection) -> SnapshotMeta:
            _get(conn, snapshot_id)  # unknown id: SnapshotNotFound
            if wanted:
                # Column names come from this module's callers, never from input.
                assignments = ", ".join(f"{column}=?" for column in wanted)
                conn.execute(f"UPDATE snapshots SET {assignments} WHERE id=?",  # noqa: S608
                             (*wanted.values(), snapshot_id))
            return _get(conn, snapshot_id)

        return await self._db.run(run)

    async def snapshot_delete_metadata(self, snapshot_id: str) -> None:
        def run(conn: sqlite3.Connection) -> None:
            try:
                current = _get(conn, snapshot_id)
            except SnapshotNotFound:
                return  # already gone: idempotent
            if current.status not in DELETABLE:
                raise WrongStatus(
                    f"snapshot {snapshot_id} is {current.status.value}; delete it first"
                )
            conn.execute("DELETE FROM snapshots WHERE id=?", (snapshot_id,))

        await self._db.run(run)

    async def get_snapshot(self, snapshot_id: str) -> SnapshotMeta:
        return await self._db.run(lambda conn: _get(conn, snapshot_id))

    async def list_snapshots(
        self, volume_id: str | None = None, status: Status | None = None
    ) -> list[SnapshotMeta]:
        query = "SELECT * FROM snapshots WHERE 1=1"
        args: list[str] = []
        if volume_id is not None:
            query += " AND volume_id = ?"
            args.append(volume_id)
        if status is not None:
            query += " AND status = ?"
            args.append(status.value)
        query += " ORDER BY created_at, rowid"

        def run(conn: sqlite3.Connection) -> list[SnapshotMeta]:
            return [_row(r) for r in conn.execute(query, args)]

        return await self._db.run(run)
