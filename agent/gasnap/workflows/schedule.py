"""A schedule's run: one group snapshot of its domains, then retention.

Retention deletes, through the normal delete workflow, this schedule's oldest
snapshots beyond ``keep`` on each volume the run snapshotted, never another
schedule's nor a manual one, and only after the new snapshots are available.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

from ..config import Schedule
from ..errors import GasnapError
from ..metadata import SnapshotHasClones, SnapshotMeta, Status
from . import Context, ProgressSink, delete, deleteplan, no_progress
from .createplan import CreateRequest
from .identity import VolumeDetached

log = logging.getLogger(__name__)

def request(schedule: Schedule) -> CreateRequest:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return CreateRequest(
        domains=list(schedule.domains), disks={}, name=f"{schedule.name}-{stamp}",
        description=f"taken by schedule {schedule.name}", quiesce=schedule.quiesce,
        schedule=schedule.name,
    )


def expired(metas: list[SnapshotMeta], schedule: str, keep: int,
            volumes: set[str]) -> list[SnapshotMeta]:
    """Per volume in VOLUMES, SCHEDULE's available snapshots beyond the newest
    KEEP, oldest first."""
    by_volume: dict[str, list[SnapshotMeta]] = defaultdict(list)
    for meta in metas:
        if (meta.schedule == schedule and meta.status is Status.AVAILABLE
                and meta.volume_id in volumes):
            by_volume[meta.volume_id].append(meta)
    old: list[SnapshotMeta] = []
    for snapshots in by_volume.values():
        snapshots.sort(key=lambda m: m.created_at)
        old.extend(snapshots[:-keep])
    return sorted(old, key=lambda m: m.created_at)


@dataclass(frozen=True)
class Retained:
    deleted: list[str]  # the snapshots deleted, oldest first
    failure: GasnapError | None = None  # why retention stopped short, if it did


async def retain(ctx: Context, schedule: Schedule, volumes: set[str],
                 progress: ProgressSink) -> Retained:
    """Delete what ``expired`` names, one by one, stopping at the first
    failure; a snapshot a linked clone holds is kept."""
    deleted: list[str] = []
    try:
        # This host's volumes only: a fleet shares the service, and another
        # host's schedule of the same name is its own business.
        metas = [m for volume in sorted(volumes)
                 for m in await ctx.metadata.list_snapshots(volume_id=volume)]
        doomed = expired(metas, schedule.name, schedule.keep, volumes)
        for number, meta in enumerate(doomed, start=1):
            log.info("schedule %s: retention deletes %s (%s)", schedule.name, meta.id,
                     meta.name)
            try:
                merge = await deleteplan.plan(ctx, meta.id, deleteplan.Strategy.AUTO)
            except (SnapshotHasClones, VolumeDetached) as err:
                # Held by a linked clone someone made on purpose, or of a
                # volume that left (its target now another's): kept, and
                # the rest of the retention goes on.
                log.warning("schedule %s: keeps %s: %s", schedule.name, meta.id, err.message)
                continue
            outcome = await delete.execute(ctx, merge, no_progress)
            if outcome.failure is not None:
                return Retained(deleted, outcome.failure)
            deleted.append(meta.id)
            await progress(50 + 50 * number // len(doomed))
    except GasnapError as err:  # a plan refused, the metadata service away
        return Retained(deleted, err)
    return Retained(deleted)
