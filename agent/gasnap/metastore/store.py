"""The metadata store: the contract's rules on top of any SQL backend.

It enforces status transitions and idempotency on ``snapshot_id`` itself, so
the embedded store, the reference service on SQLite and the service on a
shared PostgreSQL behave the same.
"""

from __future__ import annotations

from typing import Any

from ..metadata import (
    DELETABLE,
    Consistency,
    Finalization,
    InvalidMarker,
    MetadataError,
    NewSnapshot,
    Origin,
    SnapshotMeta,
    SnapshotNotFound,
    Status,
    WrongStatus,
    check_transition,
)
from .backend import Backend, Row, Tx
from .cinderstandin import CinderStandIn
from .clones import CloneRecords, check_no_clones
from .limits import LimitRecords
from .migrations import migrate

DELETION = frozenset({Status.DELETING, Status.ERROR_DELETING})
_INSERT = ("INSERT INTO snapshots (id, volume_id, name, description, size, created_at, domain,"
           " group_id, target, status, schedule, parent, origin, domain_state, memory_file)"
           " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO NOTHING")
_COLUMNS = ("id, volume_id, name, description, size, created_at, domain, group_id, target,"
            " status, file, backing_file, consistency, error, progress, schedule, parent,"
            " origin, domain_state, memory_file")


def _meta(row: Row) -> SnapshotMeta:
    return SnapshotMeta(
        id=row["id"], volume_id=row["volume_id"], name=row["name"],
        description=row["description"], size=row["size"], created_at=row["created_at"],
        domain=row["domain"], group_id=row["group_id"], target=row["target"],
        status=Status(row["status"]), file=row["file"], backing_file=row["backing_file"],
        consistency=Consistency(row["consistency"]) if row["consistency"] else None,
        error=row["error"], progress=row["progress"], schedule=row["schedule"],
        parent=row["parent"], origin=Origin(row["origin"]), domain_state=row["domain_state"],
        memory_file=row["memory_file"],
    )


class SqlMetadata(CloneRecords, LimitRecords, CinderStandIn):
    """``MetadataService`` on a database; ``open()`` migrates the schema first."""

    def __init__(self, backend: Backend) -> None:
        self._db = backend

    async def open(self) -> SqlMetadata:
        await migrate(self._db)
        return self

    async def close(self) -> None:
        await self._db.close()

    @staticmethod
    def _select() -> str:
        return f"SELECT {_COLUMNS} FROM snapshots s"  # noqa: S608

    def _get(self, tx: Tx, snapshot_id: str, *, lock: bool = False) -> SnapshotMeta:
        sql = f"{self._select()} WHERE s.id = ?"
        row = tx.one(sql + (self._db.lock_rows if lock else ""), (snapshot_id,))
        if row is None:
            raise SnapshotNotFound(f"no snapshot {snapshot_id}", snapshot_id=snapshot_id)
        return _meta(row)

    # --- the protocol's calls -------------------------------------------------

    async def create_snapshot_metadata(self, new: NewSnapshot) -> SnapshotMeta:
        def run(tx: Tx) -> SnapshotMeta:
            # ON CONFLICT: two replicas racing on one id both end with one row.
            tx.execute(
                _INSERT,
                (new.snapshot_id, new.volume_id, new.name, new.description, new.size,
                 new.created_at, new.domain, new.group_id, new.target, Status.CREATING.value,
                 new.schedule, new.parent, new.origin.value, new.domain_state,
                 new.memory_file),
            )
            existing = self._get(tx, new.snapshot_id)
            if existing.volume_id != new.volume_id:
                raise WrongStatus(
                    f"snapshot {new.snapshot_id} already exists for volume {existing.volume_id}",
                    snapshot_id=new.snapshot_id,
                )
            return existing  # a retried call gets the same answer

        return await self._db.run(run)

    async def finalize_snapshot_metadata(
        self, snapshot_id: str, final: Finalization
    ) -> SnapshotMeta:
        if final.status not in (Status.AVAILABLE, Status.ERROR):
            raise MetadataError(f"finalize takes available or error, not {final.status.value}",
                                code="invalid_request")

        def run(tx: Tx) -> SnapshotMeta:
            current = self._get(tx, snapshot_id, lock=True)
            if current.status is final.status:
                return current  # idempotent
            check_transition(snapshot_id, current.status, final.status)
            tx.execute(
                "UPDATE snapshots SET status=?, file=?, backing_file=?, consistency=?, error=?"
                " WHERE id=?",
                (final.status.value, final.file, final.backing_file,
                 final.consistency.value if final.consistency else None, final.error,
                 snapshot_id),
            )
            return self._get(tx, snapshot_id)

        return await self._db.run(run)

    async def update_snapshot_status(
        self, snapshot_id: str, status: Status, progress: str
    ) -> SnapshotMeta:
        def run(tx: Tx) -> SnapshotMeta:
            current = self._get(tx, snapshot_id, lock=True)
            if status not in DELETION:  # creation ends only through finalize
                raise WrongStatus(f"snapshot {snapshot_id}: update-snapshot-status takes "
                                  f"deleting or error_deleting, not {status.value}")
            if current.status is not status:
                check_transition(snapshot_id, current.status, status)
                if status is Status.DELETING:
                    check_no_clones(tx, snapshot_id)
            tx.execute("UPDATE snapshots SET status=?, progress=? WHERE id=?",
                       (status.value, progress, snapshot_id))
            return self._get(tx, snapshot_id)

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

        def run(tx: Tx) -> SnapshotMeta:
            self._get(tx, snapshot_id, lock=True)  # unknown id: SnapshotNotFound
            if wanted:
                # Column names come from this module's callers, never from input.
                assignments = ", ".join(f"{column}=?" for column in wanted)
                tx.execute(f"UPDATE snapshots SET {assignments} WHERE id=?",  # noqa: S608
                           (*wanted.values(), snapshot_id))
            return self._get(tx, snapshot_id)

        return await self._db.run(run)

    async def snapshot_delete_metadata(self, snapshot_id: str) -> None:
        def run(tx: Tx) -> None:
            try:
                current = self._get(tx, snapshot_id, lock=True)
            except SnapshotNotFound:
                return  # already gone: idempotent
            if current.status not in DELETABLE:
                raise WrongStatus(
                    f"snapshot {snapshot_id} is {current.status.value}; delete it first",
                    current=current.status.value,
                )
            # Its children now descend from its parent: the tree stays whole
            # in the same transaction.
            tx.execute("UPDATE snapshots SET parent=? WHERE parent=?",
                       (current.parent, snapshot_id))
            tx.execute("DELETE FROM snapshots WHERE id=?", (snapshot_id,))

        await self._db.run(run)

    # --- reads ----------------------------------------------------------------

    async def get_snapshot(self, snapshot_id: str) -> SnapshotMeta:
        return await self._db.run(lambda tx: self._get(tx, snapshot_id))

    async def list_snapshots(
        self, volume_id: str | None = None, status: Status | None = None, *,
        domain: str | None = None, limit: int | None = None, marker: str | None = None,
        parent: str | None = None, roots: bool = False, group_id: str | None = None,
    ) -> list[SnapshotMeta]:
        order = self._db.insertion_order
        query = f"{self._select()} WHERE 1=1"
        args: list[Any] = []
        for column, value in (("volume_id", volume_id), ("domain", domain),
                              ("status", status.value if status else None),
                              ("parent", parent), ("group_id", group_id)):
            if value is not None:
                query += f" AND s.{column} = ?"
                args.append(value)
        if roots:
            query += " AND s.parent IS NULL"
        if marker is not None:
            query += f" AND (s.created_at, s.{order}) > (?, ?)"
        # A group's records share created_at: then the order they were made in.
        query += f" ORDER BY s.created_at, s.{order}"
        if limit is not None:
            query += " LIMIT ?"

        def run(tx: Tx) -> list[SnapshotMeta]:
            tail: list[Any] = []
            if marker is not None:
                row = tx.one(f"SELECT created_at, {order} AS ord FROM snapshots"  # noqa: S608
                             " WHERE id = ?", (marker,))
                if row is None:
                    raise InvalidMarker(f"marker {marker} is not a snapshot id")
                tail += [row["created_at"], row["ord"]]
            if limit is not None:
                tail.append(limit)
            return [_meta(r) for r in tx.all(query, [*args, *tail])]

        return await self._db.run(run)
