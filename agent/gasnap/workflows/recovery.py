"""Recovery at start: settle every operation the journal shows unfinished.

Deletes are resumed from the live chain and libvirt's job state (see
``delete.resume``); creates are settled as below.

The journal says what may have happened; the live domain XML says what did.
Guests the journal shows (possibly) frozen are thawed first.  An unfinished
create ends with each volume ``available`` (its overlay is the active layer)
or ``error`` (overlay removed): no record stays ``creating``.
"""

from __future__ import annotations

import logging

from ..errors import GasnapError
from ..guestagent import GuestAgentError
from . import Context, delete
from .create import CreatePlan, settle

log = logging.getLogger(__name__)

THAW_TIMEOUT = 5.0
# Steps after which the journal's consistency is proven: the switch returned
# while the guests were frozen.  Cut short at "freezing" (journals of earlier
# versions: "switching"), a switch libvirt finished after the guard thawed
# would be no frozen image: record crash.
CONSISTENCY_PROVEN = frozenset({"thawed", "offline", "finalizing"})
INTERRUPTED = "interrupted: the agent stopped before this snapshot was finished"


async def thaw(ctx: Context, domains: list[str]) -> None:
    for name in domains:
        try:
            count = await ctx.agent.fsthaw(name, THAW_TIMEOUT)
        except GuestAgentError as err:
            log.warning("recovery: thaw of %s: %s", name, err.message)
        except GasnapError as err:
            log.warning("recovery: cannot reach %s to thaw it: %s", name, err.message)
        else:
            if count:
                log.warning("recovery: %s was still frozen; thawed %d filesystems", name, count)


async def recover(ctx: Context) -> int:
    """Settle unfinished operations; returns how many were settled."""
    settled = 0
    for op in await ctx.journal.unfinished():
        if op.kind == "delete":
            log.warning("recovery: delete %s stopped at step %s; settling it", op.id, op.step)
            await delete.resume(ctx, op)
            settled += 1
            continue
        if op.kind != "create":
            log.error("recovery: unknown operation kind %s (%s); left as is", op.kind, op.id)
            continue
        the_plan = CreatePlan.from_dict(op.payload["plan"])
        log.warning("recovery: create %s stopped at step %s; settling it", op.id, op.step)
        await thaw(ctx, list(op.payload.get("frozen", [])))
        consistency = dict(op.payload.get("consistency", {}))
        if op.step not in CONSISTENCY_PROVEN:
            consistency = {}
        metas = await settle(ctx, the_plan, consistency, INTERRUPTED)
        for meta in metas:
            log.warning("recovery: snapshot %s of %s is %s", meta.id, meta.volume_id,
                        meta.status.value)
        await ctx.journal.finish(op)
        settled += 1
    return settled
