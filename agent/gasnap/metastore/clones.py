"""Clone records in the metadata store, beside the snapshots they come from.

A clone's record is made in two phases like a snapshot's; its source
snapshot must hold (``available``) when it is made, and while a linked
clone that is not ``error`` names a snapshot, that snapshot cannot be marked
``deleting`` (``SqlMetadata.update_snapshot_status``): every host sharing
the service sees the dependency.
"""

from __future__ import annotations

import json
from typing import Any

from ..metadata import (
    CLONE_DELETABLE,
    Attachment,
    CloneChange,
    CloneMeta,
    CloneMode,
    CloneNotFound,
    CloneStatus,
    MetadataError,
    NewClone,
    SnapshotHasClones,
    SnapshotNotFound,
    Status,
    WrongStatus,
    check_clone_transition,
)
from .backend import Backend, Row, Tx

_COLUMNS = ("id, name, source_snapshot, source_volume_id, mode, file, image, size, status,"
            " created_at, attached_to, error")


def _meta(row: Row) -> CloneMeta:
    attached = json.loads(row["attached_to"]) if row["attached_to"] else None
    return CloneMeta(
        id=row["id"], name=row["name"], source_snapshot=row["source_snapshot"],
        source_volume_id=row["source_volume_id"], mode=CloneMode(row["mode"]),
        file=row["file"], image=row["image"], size=row["size"],
        status=CloneStatus(row["status"]), created_at=row["created_at"],
        attached_to=Attachment(**attached) if attached else None, error=row["error"],
    )


def linked_clones(tx: Tx, snapshot_id: str) -> list[str]:
    """The linked clones (not failed) that still read SNAPSHOT_ID's image."""
    rows = tx.all("SELECT id FROM clones WHERE source_snapshot = ? AND mode = ?"
                  " AND status <> ? ORDER BY created_at, id",
                  (snapshot_id, CloneMode.LINKED.value, CloneStatus.ERROR.value))
    return [r["id"] for r in rows]


def check_no_clones(tx: Tx, snapshot_id: str) -> None:
    clones = linked_clones(tx, snapshot_id)
    if clones:
        raise SnapshotHasClones(
            f"snapshot {snapshot_id} backs the linked clones {', '.join(clones)}; flatten "
            "or delete them first", clones=clones)


class CloneRecords:
    """The clone calls of ``MetadataService`` (mixed into ``SqlMetadata``)."""

    _db: Backend

    def _get_clone(self, tx: Tx, clone_id: str, *, lock: bool = False) -> CloneMeta:
        sql = f"SELECT {_COLUMNS} FROM clones WHERE id = ?"  # noqa: S608
        row = tx.one(sql + (self._db.lock_rows if lock else ""), (clone_id,))
        if row is None:
            raise CloneNotFound(f"no clone {clone_id}", clone_id=clone_id)
        return _meta(row)

    async def create_clone_metadata(self, new: NewClone) -> CloneMeta:
        def run(tx: Tx) -> CloneMeta:
            source = tx.one("SELECT volume_id, status FROM snapshots WHERE id = ?"  # noqa: S608
                            + self._db.lock_rows, (new.source_snapshot,))
            if source is None:
                raise SnapshotNotFound(f"no snapshot {new.source_snapshot}",
                                       snapshot_id=new.source_snapshot)
            existing = tx.one("SELECT source_snapshot FROM clones WHERE id = ?",
                              (new.clone_id,))
            if existing is not None:
                if existing["source_snapshot"] != new.source_snapshot:
                    raise WrongStatus(f"clone {new.clone_id} already exists for snapshot "
                                      f"{existing['source_snapshot']}")
                return self._get_clone(tx, new.clone_id)  # a retried call
            if source["status"] != Status.AVAILABLE.value:
                raise WrongStatus(f"snapshot {new.source_snapshot} is {source['status']}; "
                                  "only an available snapshot can be cloned",
                                  current=source["status"])
            tx.execute(
                f"INSERT INTO clones ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"  # noqa: S608
                " ON CONFLICT (id) DO NOTHING",
                (new.clone_id, new.name, new.source_snapshot, source["volume_id"],
                 new.mode.value, new.file, new.image, new.size, CloneStatus.CREATING.value,
                 new.created_at, None, None))
            return self._get_clone(tx, new.clone_id)

        return await self._db.run(run)

    async def finalize_clone_metadata(self, clone_id: str, status: CloneStatus,
                                      error: str | None = None) -> CloneMeta:
        if status not in (CloneStatus.AVAILABLE, CloneStatus.ERROR):
            raise MetadataError(f"finalize takes available or error, not {status.value}",
                                code="invalid_request")

        def run(tx: Tx) -> CloneMeta:
            current = self._get_clone(tx, clone_id, lock=True)
            if current.status is status:
                return current  # idempotent
            if current.status is not CloneStatus.CREATING:
                raise WrongStatus(f"clone {clone_id} is {current.status.value}; only a "
                                  "creating clone is finalized", current=current.status.value)
            tx.execute("UPDATE clones SET status=?, error=? WHERE id=?",
                       (status.value, error, clone_id))
            return self._get_clone(tx, clone_id)

        return await self._db.run(run)

    async def update_clone_metadata(self, clone_id: str, change: CloneChange) -> CloneMeta:
        def run(tx: Tx) -> CloneMeta:
            current = self._get_clone(tx, clone_id, lock=True)
            sets: dict[str, Any] = {}
            if change.status is not None and change.status is not current.status:
                check_clone_transition(clone_id, current.status, change.status)
                sets["status"] = change.status.value
            if change.mode is not None:
                sets["mode"] = change.mode.value
            if change.detach:
                sets["attached_to"] = None
            elif change.attached_to is not None:
                sets["attached_to"] = json.dumps(change.attached_to.to_dict())
            if change.error is not None:
                sets["error"] = change.error
            if sets:
                # Column names are this function's own, never input.
                assignments = ", ".join(f"{column}=?" for column in sets)
                tx.execute(f"UPDATE clones SET {assignments} WHERE id=?",  # noqa: S608
                           (*sets.values(), clone_id))
            return self._get_clone(tx, clone_id)

        return await self._db.run(run)

    async def clone_delete_metadata(self, clone_id: str) -> None:
        def run(tx: Tx) -> None:
            try:
                current = self._get_clone(tx, clone_id, lock=True)
            except CloneNotFound:
                return  # already gone: idempotent
            if current.status not in CLONE_DELETABLE:
                raise WrongStatus(f"clone {clone_id} is {current.status.value}; delete it "
                                  "first", current=current.status.value)
            tx.execute("DELETE FROM clones WHERE id=?", (clone_id,))

        await self._db.run(run)

    async def get_clone(self, clone_id: str) -> CloneMeta:
        return await self._db.run(lambda tx: self._get_clone(tx, clone_id))

    async def list_clones(self, snapshot_id: str | None = None,
                          volume_id: str | None = None) -> list[CloneMeta]:
        query = f"SELECT {_COLUMNS} FROM clones WHERE 1=1"  # noqa: S608
        args: list[Any] = []
        for column, value in (("source_snapshot", snapshot_id),
                              ("source_volume_id", volume_id)):
            if value is not None:
                query += f" AND {column} = ?"
                args.append(value)
        query += f" ORDER BY created_at, {self._db.insertion_order}"
        return await self._db.run(lambda tx: [_meta(r) for r in tx.all(query, args)])
