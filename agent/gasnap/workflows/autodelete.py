"""Auto-delete: a volume past its soft limit sheds its oldest snapshots.

After a create whose volumes have ``auto_delete``, the oldest snapshots
above the soft limit (of the count, then of the chain's depth) are merged
away one by one through the normal delete workflow (``deleteplan``,
``delete``), within the create's hold of its volumes.  Never the create's
own snapshots; one a linked clone holds is kept and the next one tried.
What stops short is a warning, never the create's failure: its snapshots
exist whatever happens here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import GasnapError
from ..metadata import Limits, SnapshotHasClones, SnapshotMeta, Status
from . import Context, delete, deleteplan, no_progress
from .createplan import VolumePlan
from .identity import VolumeDetached
from .limits import counted, in_force

log = logging.getLogger(__name__)


@dataclass
class Trimmed:
    deleted: list[str] = field(default_factory=list)  # oldest first
    warnings: list[str] = field(default_factory=list)


async def trim(ctx: Context, volumes: Sequence[VolumePlan], keep: set[str]) -> Trimmed:
    """With ``auto_delete``, merge away each volume's oldest snapshots (never
    those in KEEP: the create's own) until it is back at its soft limits.
    What stops short is a warning: the create itself has succeeded."""
    done = Trimmed()
    for v in volumes:
        try:
            limits = await in_force(ctx, v.volume_id)
            if limits.auto_delete:
                await _trim_volume(ctx, v, limits, keep, done)
        except GasnapError as err:
            done.warnings.append(f"auto_delete on volume {v.volume_id} stopped: {err.message}")
            log.error("auto_delete on volume %s stopped: %s", v.volume_id, err.message)
    return done


async def _trim_volume(ctx: Context, v: VolumePlan, limits: Limits, keep: set[str],
                       done: Trimmed) -> None:
    # KEEP, those a linked clone holds, and those already merged: each
    # snapshot is tried once, so the loop ends whatever the records say
    tried: set[str] = set(keep)
    while True:
        candidates = await _excess(ctx, v, limits, tried)
        if candidates is None:
            return
        if not candidates:
            done.warnings.append(f"auto_delete cannot bring volume {v.volume_id} back to its "
                                 "soft limit: what is left is held by linked clones, or is "
                                 "not gasnap's")
            return
        victim = candidates[0]
        tried.add(victim.id)
        try:
            merge = await deleteplan.plan(ctx, victim.id, deleteplan.Strategy.AUTO)
        except (SnapshotHasClones, VolumeDetached) as err:
            log.warning("auto_delete keeps %s: %s", victim.id, err.message)
            continue
        log.info("auto_delete merges %s (%s) of volume %s", victim.id, victim.name,
                 v.volume_id)
        outcome = await delete.execute(ctx, merge, no_progress)
        if outcome.failure is not None:
            raise outcome.failure
        done.deleted.append(victim.id)


async def _excess(ctx: Context, v: VolumePlan, limits: Limits,
                  tried: set[str]) -> list[SnapshotMeta] | None:
    """The snapshots that may go, oldest first, while V is past a soft
    limit (None: it is not): any for the count, those of the running
    chain for its depth."""
    metas = await ctx.metadata.list_snapshots(volume_id=v.volume_id)
    free = sorted((m for m in metas if m.status is Status.AVAILABLE and m.id not in tried
                   and m.automatic), key=lambda m: m.created_at)
    if len(counted(metas)) > limits.soft_snapshots:
        return free
    dom = await ctx.hv.get_domain(v.domain)
    vol = dom.volume(v.target)
    chain = [layer.path for layer in vol.chain] if vol is not None else []
    if len(chain) > limits.soft_depth:
        return [m for m in free if m.file in chain]
    return None
