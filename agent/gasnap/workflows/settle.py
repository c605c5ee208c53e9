"""Settling a create: the live chain decides what each snapshot is.

Used by the create that just ran and by recovery alike.  Each volume's
domain is read by the UUID planned (whatever it is called now); the overlay
is ``available`` only if the chain shows it right on the planned image.
Anything else is ``error``, and the overlay goes only after its record says
so, only if it is the create's own file, and only if no chain of any domain
holds it: a file that is, or may become, part of a chain is never removed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import TYPE_CHECKING

from .. import images, metrics
from ..errors import NotFound
from ..hypervisor import Domain, Volume
from ..metadata import (
    Consistency,
    Finalization,
    SnapshotMeta,
    SnapshotNotFound,
    Status,
    WrongStatus,
)
from . import Context
from .records import until_recorded

if TYPE_CHECKING:
    from .createplan import CreatePlan, VolumePlan

log = logging.getLogger(__name__)


async def settle(
    ctx: Context, planned: CreatePlan, consistency: dict[str, str], reason: str,
    *, persist: bool = False,
) -> list[SnapshotMeta]:
    """Finalize every volume from what its domain (found by the UUID planned,
    whatever its name now) uses: the overlay in the chain on the planned
    image → available; otherwise error, and the overlay is removed only
    after the record says so and only if no chain of any domain holds it.
    Used by create and by recovery alike.  PERSIST: wait out a metadata
    outage instead of failing (the disks already changed)."""
    metas = []
    in_use: set[str] | None = None  # read once, and only if a file may go
    for name in dict.fromkeys(v.domain for v in planned.volumes):
        dom = await _planned_domain(ctx, planned, name)
        for v in planned.of(name):
            vol = dom.volume(v.target) if dom is not None else None
            final = _judge(v, vol, consistency.get(name), reason)
            # Not the caller's file, not in this chain, and the chain known:
            # then every other domain's chains are asked too.
            remove = final.status is Status.ERROR and not v.reuse and (vol is None or (
                vol.chain_error is None and v.overlay not in (x.path for x in vol.chain)))
            if remove and in_use is None:
                in_use = await ctx.hv.files_in_use()
            try:
                metas.append(await _finalize(ctx, v, final, persist=persist))
            except SnapshotNotFound:
                # Never recorded, so no overlay of this operation's was made
                # (records come first): a file of that name is not its own.
                log.info("snapshot %s was never recorded; nothing to finalize", v.snapshot_id)
                continue
            except WrongStatus as err:
                # Settled already, and not by this operation: a record of the
                # same id another call made (a Nova create sent twice).  Its
                # status and its files are its own.
                log.error("snapshot %s is not this operation's to finalize: %s",
                          v.snapshot_id, err.message)
                continue
            if remove and await images.real_path(v.overlay) not in (in_use or set()):
                await asyncio.to_thread(Path(v.overlay).unlink, missing_ok=True)
            elif remove:
                log.warning("snapshot %s failed, but its overlay %s is in a chain: kept",
                            v.snapshot_id, v.overlay)
    return metas


async def _planned_domain(ctx: Context, planned: CreatePlan, name: str) -> Domain | None:
    try:
        return await ctx.hv.get_domain(name, uuid=planned.uuids.get(name))
    except NotFound:
        return None


def _judge(v: VolumePlan, vol: Volume | None, consistency: str | None,
           reason: str) -> Finalization:
    chain = [layer.path for layer in vol.chain] if vol is not None else []
    if v.overlay in chain:
        index = chain.index(v.overlay)
        below = chain[index + 1] if index + 1 < len(chain) else None
        if below == v.image:
            return Finalization(
                Status.AVAILABLE, file=v.overlay, backing_file=v.image,
                consistency=Consistency(consistency or Consistency.CRASH.value))
        reason = (f"the overlay {v.overlay} lies on {below} in the live chain, not on the "
                  f"planned image {v.image}")
    elif vol is not None and vol.chain_error is not None:
        reason = f"{reason} (the chain cannot be read: {vol.chain_error})"
    return Finalization(Status.ERROR, file=None, backing_file=None, consistency=None,
                        error=reason)


async def _finalize(ctx: Context, v: VolumePlan, final: Finalization, *,
                    persist: bool) -> SnapshotMeta:
    def finalize() -> Awaitable[SnapshotMeta]:
        return ctx.metadata.finalize_snapshot_metadata(v.snapshot_id, final)

    meta = await (until_recorded(finalize, f"finalize {v.snapshot_id}") if persist
                  else finalize())
    metrics.SNAPSHOTS.labels(meta.status.value,
                             meta.consistency.value if meta.consistency else "none").inc()
    return meta
