"""Per-volume limits in the metadata store, next to the volume's records.

A row holds the limits an operator set for one volume; a column left null
means the agent's ``[limits]`` default.  Changes are merged inside one
transaction, so two hosts changing different limits of a volume at once
both land.
"""

from __future__ import annotations

from typing import Any

from ..metadata import LIMIT_FIELDS, VolumeLimits, check_limits
from .backend import Backend, Row, Tx

_COLUMNS = ", ".join(LIMIT_FIELDS)


def _limits(row: Row | None) -> VolumeLimits:
    if row is None:
        return VolumeLimits()
    auto = row["auto_delete"]
    # SQLite keeps booleans as integers.
    return VolumeLimits(max_snapshots=row["max_snapshots"],
                        soft_limit_percent=row["soft_limit_percent"],
                        auto_delete=None if auto is None else bool(auto),
                        max_chain_depth=row["max_chain_depth"])


class LimitRecords:
    """The limit calls of ``MetadataService`` (mixed into ``SqlMetadata``)."""

    _db: Backend

    def _get_limits(self, tx: Tx, volume_id: str, *, lock: bool = False) -> VolumeLimits:
        sql = f"SELECT {_COLUMNS} FROM volume_limits WHERE volume_id = ?"  # noqa: S608
        return _limits(tx.one(sql + (self._db.lock_rows if lock else ""), (volume_id,)))

    async def get_volume_limits(self, volume_id: str) -> VolumeLimits:
        return await self._db.run(lambda tx: self._get_limits(tx, volume_id))

    async def update_volume_limits(self, volume_id: str,
                                   change: dict[str, Any]) -> VolumeLimits:
        change = check_limits(change)

        def run(tx: Tx) -> VolumeLimits:
            tx.execute("INSERT INTO volume_limits (volume_id) VALUES (?)"
                       " ON CONFLICT (volume_id) DO NOTHING", (volume_id,))
            merged = self._get_limits(tx, volume_id, lock=True).changed(change)
            if merged == VolumeLimits():
                tx.execute("DELETE FROM volume_limits WHERE volume_id = ?", (volume_id,))
                return merged
            values = merged.to_dict()
            # Column names are LIMIT_FIELDS, never input.
            assignments = ", ".join(f"{column}=?" for column in LIMIT_FIELDS)
            tx.execute(f"UPDATE volume_limits SET {assignments} WHERE volume_id = ?",  # noqa: S608
                       (*(values[c] for c in LIMIT_FIELDS), volume_id))
            return merged

        return await self._db.run(run)
