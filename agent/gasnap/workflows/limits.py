"""Limits on a volume's snapshots and chain (gluster's hard and soft limits).

Each volume has ``max_snapshots`` and ``max_chain_depth`` (files in its
chain, the active one included) as hard limits, and a soft limit at
``soft_limit_percent`` of each: the agent's ``[limits]``, unless the volume
has its own (stored with its records, so every host uses the same).

  plan   → ``refuse_early``: a create that would pass a hard limit is 409
           ``snapshot_limit`` before anything changes (bounded: during a
           metadata outage the record step decides instead)
  record → ``check``: the same rule, read while no record exists yet, so
           an outage never lets a create past the limit; warnings for every
           volume past its soft limit
  after  → ``autodelete.trim``: with ``auto_delete``, the oldest snapshots
           above the soft limit are merged away

A record counts until it is gone, except a failed create's (``error``),
which holds no file.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import metrics
from ..errors import Conflict, GasnapError, Unavailable
from ..metadata import HOLDING, NOVA_DESCRIPTION, Limits, SnapshotMeta, Status
from . import Context

if TYPE_CHECKING:
    from .createplan import VolumePlan

log = logging.getLogger(__name__)

# How long a plan waits for the metadata service to read the limits before
# it leaves the check to the record step (which waits out an outage).
EARLY_WAIT = 2.0


class SnapshotLimit(Conflict):
    code = "snapshot_limit"


def counted(metas: Sequence[SnapshotMeta]) -> list[SnapshotMeta]:
    return [m for m in metas if m.status is not Status.ERROR]


async def in_force(ctx: Context, volume_id: str) -> Limits:
    return ctx.limits.under(await ctx.metadata.get_volume_limits(volume_id))


def depth_after(v: VolumePlan) -> int:
    """Files in V's chain once its overlay is active."""
    return len(v.below) + 2


# --- before a create ------------------------------------------------------------


async def check(ctx: Context, volumes: Sequence[VolumePlan], *, cinder_ok: bool
                ) -> list[str]:
    """Refuse (``SnapshotLimit``) if any of VOLUMES would pass a hard limit
    with one more snapshot, or (``CinderVolume``, unless CINDER_OK) if Cinder
    keeps snapshots of it; otherwise the warnings of those past a soft one."""
    over: list[str] = []
    at_limit: list[str] = []
    warnings: list[str] = []
    for v in volumes:
        limits = await in_force(ctx, v.volume_id)
        records = await ctx.metadata.list_snapshots(volume_id=v.volume_id)
        if not cinder_ok:
            refuse_cinder_volume(v.volume_id, records)
        count = len(counted(records)) + 1
        depth = depth_after(v)
        name = f"{v.domain}/{v.target} (volume {v.volume_id})"
        for value, what, key, hard, soft in (
                (count, "snapshots", "max_snapshots", limits.max_snapshots,
                 limits.soft_snapshots),
                (depth, "files in its chain", "max_chain_depth", limits.max_chain_depth,
                 limits.soft_depth)):
            if value > hard:
                over.append(f"{name} would have {value} {what}, its {key} is {hard}")
                at_limit.append(v.volume_id)
            elif value > soft:
                warnings.append(f"{name} has {value} {what}, past its soft limit of {soft} "
                                f"({limits.soft_limit_percent}% of {key} {hard})"
                                + _fate(limits))
    if over:
        raise SnapshotLimit("; ".join(over) + ": delete snapshots first, or raise the "
                            "volume's limits (gasnap volume limits)",
                            volumes=list(dict.fromkeys(at_limit)))
    return warnings


class CinderVolume(Conflict):
    code = "cinder_volume"


def refuse_cinder_volume(volume_id: str, records: Sequence[SnapshotMeta]) -> None:
    """CinderVolume if Cinder keeps snapshots of VOLUME_ID (taken through
    Nova): Cinder tracks the volume's active file in its ``.info`` and
    builds on it; gasnap changing it on its own (a snapshot, a revert) would
    leave Cinder's idea stale (REVIEW-2 item 6)."""
    cinders = [m.id for m in records if m.status in HOLDING and m.description == NOVA_DESCRIPTION]
    if cinders:
        raise CinderVolume(
            f"volume {volume_id} has snapshots Cinder keeps ({', '.join(cinders[:3])}"
            f"{', ...' if len(cinders) > 3 else ''}): changing its active file outside Cinder "
            "would leave Cinder's view stale; ask Cinder, or force", volume_id=volume_id)


def _fate(limits: Limits) -> str:
    return "; auto_delete merges the oldest away" if limits.auto_delete else ""


async def refuse_early(ctx: Context, volumes: Sequence[VolumePlan], *, cinder_ok: bool
                       ) -> None:
    """``check`` at plan time, so the caller hears 409 at once; a metadata
    service that does not answer soon leaves it to the record step."""
    try:
        await asyncio.wait_for(check(ctx, volumes, cinder_ok=cinder_ok), EARLY_WAIT)
    except (TimeoutError, Unavailable) as err:
        log.info("limits not read at plan time (%s); the record step checks them", err)


# --- what the metrics show ----------------------------------------------------------


async def observe(ctx: Context, volume_ids: Sequence[str]) -> None:
    """Each volume's snapshot count and hard limit, as the metrics show them."""
    for volume_id in dict.fromkeys(volume_ids):
        try:
            limits = await in_force(ctx, volume_id)
            count = len(counted(await ctx.metadata.list_snapshots(volume_id=volume_id)))
        except GasnapError as err:  # the numbers wait for the next change
            log.debug("volume %s: limits not observed: %s", volume_id, err.message)
            continue
        metrics.VOLUME_SNAPSHOTS.labels(volume_id).set(count)
        metrics.VOLUME_SNAPSHOT_LIMIT.labels(volume_id).set(limits.max_snapshots)
