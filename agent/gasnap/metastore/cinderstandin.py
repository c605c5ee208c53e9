"""The reference service's stand-in for Cinder's snapshot records.

Enough of Cinder for gasnap's reports to land somewhere real: a snapshot
made ``creating`` (as Cinder's API makes it before its driver asks Nova),
``os-update_snapshot_status`` validated as Cinder validates it (its status
map, its progress check), ``os-reset_status`` (what Cinder's driver and
admins do), a delete that marks it ``deleting``, and every update kept in
order so a test can read what Cinder heard.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from ..errors import BadRequest, NotFound
from .backend import Backend, Tx

# Cinder's snapshot_actions: from which status to which a caller may move one.
STATUS_MAP = {"creating": ("creating", "available", "error"),
              "deleting": ("deleting", "error_deleting")}
STATUSES = ("creating", "available", "deleting", "error", "error_deleting")


class CinderSnapshotNotFound(NotFound):
    code = "itemNotFound"


class CinderBadRequest(BadRequest):
    code = "badRequest"


class CinderStandIn:
    """Mixed into ``SqlMetadata``."""

    _db: Backend

    def _cinder_get(self, tx: Tx, project: str, sid: str) -> dict[str, Any]:
        sql = ("SELECT id, volume_id, name, status, progress, created_at"
               " FROM cinder_snapshots WHERE id = ? AND project_id = ?")
        row = tx.one(sql + self._db.lock_rows, (sid, project))
        if row is None:
            raise CinderSnapshotNotFound(f"Snapshot {sid} could not be found.")
        updates = tx.all("SELECT status, progress FROM cinder_updates WHERE snapshot_id = ?"
                         " ORDER BY seq", (sid,))
        return {**row, "os-extended-snapshot-attributes:progress": row["progress"],
                "updates": [dict(u) for u in updates]}

    async def cinder_create(self, project: str, volume_id: str, name: str) -> dict[str, Any]:
        sid = str(uuid.uuid4())

        def run(tx: Tx) -> dict[str, Any]:
            tx.execute("INSERT INTO cinder_snapshots (id, project_id, volume_id, name, status,"
                       " progress, created_at) VALUES (?,?,?,?,?,?,?)",
                       (sid, project, volume_id, name, "creating", "0%",
                        datetime.now(UTC).isoformat()))
            return self._cinder_get(tx, project, sid)

        return await self._db.run(run)

    async def cinder_get(self, project: str, sid: str) -> dict[str, Any]:
        return await self._db.run(lambda tx: self._cinder_get(tx, project, sid))

    async def cinder_update_status(self, project: str, sid: str, status: str,
                                   progress: str | None) -> None:
        """os-update_snapshot_status, with Cinder's checks."""
        if progress:
            try:
                value = int(progress[:-1])
            except ValueError as err:
                raise CinderBadRequest("progress must be an integer percentage") from err
            if not 0 <= value <= 100 or not progress.endswith("%"):
                raise CinderBadRequest("progress must be an integer percentage")

        def run(tx: Tx) -> None:
            current = self._cinder_get(tx, project, sid)["status"]
            if current not in STATUS_MAP:
                raise CinderBadRequest(f"Snapshot status {current} not allowed for "
                                       "update_snapshot_status")
            if status not in STATUS_MAP[current]:
                raise CinderBadRequest(f"Provided snapshot status {status} not allowed for "
                                       f"snapshot with status {current}.")
            tx.execute("UPDATE cinder_snapshots SET status = ?, progress = COALESCE(?, progress)"
                       " WHERE id = ?", (status, progress, sid))
            tx.execute("INSERT INTO cinder_updates (snapshot_id, status, progress)"
                       " VALUES (?,?,?)", (sid, status, progress))

        await self._db.run(run)

    async def cinder_reset_status(self, project: str, sid: str, status: str) -> None:
        if status not in STATUSES:
            raise CinderBadRequest(f"Invalid status {status}")

        def run(tx: Tx) -> None:
            self._cinder_get(tx, project, sid)
            tx.execute("UPDATE cinder_snapshots SET status = ? WHERE id = ?", (status, sid))

        await self._db.run(run)

    async def cinder_delete(self, project: str, sid: str) -> None:
        """Cinder's API marks the snapshot deleting, then its driver asks Nova."""
        def run(tx: Tx) -> None:
            current = self._cinder_get(tx, project, sid)["status"]
            if current not in ("available", "error", "error_deleting"):
                raise CinderBadRequest(f"Snapshot status must be available or error and "
                                       f"must not be part of a group, not {current}")
            tx.execute("UPDATE cinder_snapshots SET status = ?, progress = ? WHERE id = ?",
                       ("deleting", "0%", sid))

        await self._db.run(run)
