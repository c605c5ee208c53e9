"""Recovery at start: settle every operation the journal shows unfinished.

Deletes are resumed from the live chain and libvirt's job state (see
``delete.resume``), reverts undone or finished by their step (see
``revert.resume``), clone work read back from the domain XML and the
file's header (see ``clone``); creates are settled as below.  Each operation is
settled on its own: one that cannot be settled now (a domain gone, a
service away, anything unexpected) is logged with its reason and tried
again at the next pass, its volumes held meanwhile, and the others go on.

The journal says what may have happened; the live domain XML says what did.
Guests the journal shows (possibly) frozen are thawed first.  An unfinished
create ends with each volume ``available`` (its overlay is the active layer)
or ``error`` (overlay removed): no record stays ``creating``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import GasnapError, NotFound
from ..guestagent import THAW_TIMEOUT, GuestAgentError
from ..journal import Operation
from . import Context, clone, create, delete, revert
from .createplan import CreatePlan
from .deleteplan import DeletePlan
from .settle import settle
from .steps import CONSISTENCY_PROVEN, JOB_STEPS, CreateStep, Kind

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted: the agent stopped before this snapshot was finished"


async def thaw(ctx: Context, domains: list[str]) -> None:
    for name in domains:
        try:
            count = await ctx.agent.fsthaw(name, THAW_TIMEOUT)
        except GuestAgentError as err:
            log.warning("recovery: thaw of %s: %s", name, err.message)
        except NotFound as err:
            log.warning("recovery: %s is gone; nothing to thaw: %s", name, err.message)
        else:
            if count:
                log.warning("recovery: %s was still frozen; thawed %d filesystems", name, count)


@dataclass
class Pass:
    """What one pass of recovery did."""

    settled: int = 0
    failed: int = 0


async def recover(ctx: Context, *, first: bool = False) -> Pass:
    """Settle the operations no workflow drives.  Each one alone: whatever
    goes wrong with one is logged, leaves it (and its volumes) for the next
    pass, and does not stop the others.  FIRST (the pass at start-up, which
    the whole agent waits for): a merge whose block job QEMU still copies is
    left to the sweep (one ready for its pivot is finished now), so that a
    long merge keeps its own volume busy and not every other one (REVIEW-2
    item 12)."""
    done = Pass()
    for op in await ctx.journal.unfinished():
        if first and await _job_still_runs(ctx, op):
            log.warning("recovery: %s %s: its block job still runs; the sweep follows it",
                        op.kind, op.id)
            done.failed += 1
            continue
        ctx.journal.claim(op)
        try:
            await _settle(ctx, op)
        except Exception as err:  # one operation must not stop the others
            ctx.journal.release(op)
            done.failed += 1
            reason = err.message if isinstance(err, GasnapError) else repr(err)
            log.error("recovery: %s %s (step %s) not settled: %s; trying again later",
                      op.kind, op.id, op.step, reason, exc_info=_LAST_FAILURE.get(op.id) != reason)
            _LAST_FAILURE[op.id] = reason
        else:
            done.settled += 1
            _LAST_FAILURE.pop(op.id, None)
    return done


async def _job_still_runs(ctx: Context, op: Operation) -> bool:
    if op.kind != Kind.DELETE or op.step not in JOB_STEPS:
        return False
    try:
        merge = DeletePlan.from_dict(op.payload["plan"])
        return merge.live_job and await delete.own_job_copies(ctx, merge)
    except (GasnapError, KeyError, TypeError, ValueError):
        return False  # the pass itself settles it, or says why not


# The last failure logged per operation: the traceback is logged when the
# reason changes, not at every pass of the sweep.
_LAST_FAILURE: dict[str, str] = {}


async def _settle(ctx: Context, op: Operation) -> None:
    log.warning("recovery: %s %s stopped at step %s; settling it", op.kind, op.id, op.step)
    try:
        kind = Kind(op.kind)
    except ValueError:
        raise GasnapError(f"unknown operation kind {op.kind}") from None
    if kind is Kind.DELETE:
        await delete.resume(ctx, op)
    elif kind is Kind.REVERT:
        await revert.resume(ctx, op)
    elif kind is Kind.CLONE:
        await clone.resume(ctx, op)
    else:
        await _settle_create(ctx, op)


async def _settle_create(ctx: Context, op: Operation) -> None:
    planned = CreatePlan.from_dict(op.payload["plan"])
    step = CreateStep(op.step)
    if step is CreateStep.FREEZING:
        # Cut short inside its window: those freezes are this operation's
        # (past the window they were thawed, and may belong to a newer one).
        frozen = list(op.payload.get("frozen", []))
        async with ctx.windows.owning(planned.uuids.get(d, d) for d in frozen):
            await thaw(ctx, frozen)
    consistency = dict(op.payload.get("consistency", {}))
    if step not in CONSISTENCY_PROVEN:
        consistency = {}
    metas = await settle(ctx, planned, consistency, INTERRUPTED)
    await create.settle_memory(planned, metas)
    for meta in metas:
        log.warning("recovery: snapshot %s of %s is %s", meta.id, meta.volume_id,
                    meta.status.value)
    await ctx.journal.finish(op)
