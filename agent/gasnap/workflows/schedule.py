"""A schedule's run: one group snapshot of its domains, then retention.

Retention deletes, through the normal delete workflow, this schedule's oldest
snapshots beyond ``keep`` on each volume the run snapshotted, never another
schedule's nor a manual one, and only after the new snapshots are available.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import UTC, datetime

from ..config import Schedule
from ..metadata import SnapshotMeta, Status
from . import Context, ProgressSink, delete, no_progress
from .create import CreateRequest

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


async def retain(ctx: Context, schedule: Schedule, volumes: set[str],
                 progress: ProgressSink) -> list[str]:
    """Delete what ``expired`` names, one by one; the ids deleted."""
    metas = await ctx.metadata.list_snapshots()
    doomed = expired(metas, schedule.name, schedule.keep, volumes)
    deleted = []
    for number, meta in enumerate(doomed, start=1):
        log.info("schedule %s: retention deletes %s (%s)", schedule.name, meta.id, meta.name)
        the_plan = await delete.plan(ctx, meta.id, delete.Strategy.AUTO)
        await delete.execute(ctx, the_plan, no_progress)
        deleted.append(meta.id)
        await progress(50 + 50 * number // len(doomed))
    return deleted
