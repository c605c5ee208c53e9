"""Merging a snapshot's image out of its volume: the mechanics of a delete.

A live commit or pull is a block job of the running domain, started outside
any freeze window of it (``windows``) and followed through BLOCK_JOB_2
events; an active commit ends with a pivot.  A stopped domain, or a branch
the domain does not run, is merged with qemu-img, every format named from
the plan and every pointer relative.  What ran is judged afterwards from the
live chain (``delete.verify``), never from the job alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from .. import faults, images, qemuimg
from ..blockjobs import JobEnd, JobInfo, PivotNotReady
from ..errors import GasnapError, Unavailable
from ..hypervisor import DomainChanged
from ..journal import Operation
from ..metadata import Status
from . import Context, ProgressSink
from .deleteplan import DeletePlan, MergeFailed, Method
from .steps import DeleteStep

log = logging.getLogger(__name__)

PIVOT_TRIES = 20
PIVOT_RETRY = 0.5
CHAIN_SETTLE = 10.0  # after a pivot libvirt's XML can lag the call (VDSM)
CANCEL_WAIT = 30.0  # a cancelled active commit not yet ready ends at once


async def live_merge(ctx: Context, op: Operation, merge: DeletePlan,
                      progress: ProgressSink, *, started: bool) -> Operation:
    name, target = merge.domain, merge.target
    if not started:
        # Never inside a freeze window of the same domain (see windows).
        async with ctx.windows.owning([merge.uuid or name]):
            await _start_job(ctx, merge)
    faults.hit("delete:job")
    want_ready = merge.method is Method.ACTIVE_COMMIT
    reporter = Reporter(ctx, merge.snapshot_id, progress,
                        Convergence(ctx.merge_converge_timeout) if want_ready else None)
    try:
        end = await ctx.hv.follow_block_job(name, target, want_ready=want_ready,
                                            progress=reporter)
    except NotConverging as err:
        await _cancel(ctx, name, target)
        raise MergeFailed(f"{name}/{target}: {err.message}; the active commit was "
                          "cancelled and the chain is as it was",
                          code="merge_not_converging") from err
    log.info("%s/%s: block job ended: %s", name, target, end.value)
    if end is JobEnd.READY:
        op = await ctx.journal.step(op, DeleteStep.PIVOT)
        faults.hit("delete:pivot")
        await _pivot(ctx, name, target)
        await _chain_settles(ctx, merge)
    elif end in (JobEnd.FAILED, JobEnd.CANCELED):
        raise MergeFailed(f"{name}/{target}: the block job {end.value}")
    await reporter.done()
    return op


async def _start_job(ctx: Context, merge: DeletePlan) -> None:
    name, target = merge.domain, merge.target
    if merge.method in (Method.PULL, Method.BRANCH_PULL):
        await ctx.hv.block_pull(name, target, merge.pull_base, bandwidth=ctx.merge_bandwidth)
    else:
        await ctx.hv.block_commit(name, target, merge.top, merge.base,
                                  active=merge.method is Method.ACTIVE_COMMIT,
                                  bandwidth=ctx.merge_bandwidth)


class NotConverging(GasnapError):
    """An active commit copies slower than the guest writes."""

    code = "merge_not_converging"


class Convergence:
    """Whether an active commit gets anywhere: QEMU's mirror becomes ready
    only once nothing is left to copy, and a guest that writes faster than it
    copies keeps it from ever getting there.  The bytes left (``end - cur``)
    must reach a new low within TIMEOUT seconds, measured on the loop's
    monotonic clock; a job that copies steadily, however slowly, does."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.low: int | None = None
        self.since = time.monotonic()

    def observe(self, info: JobInfo) -> None:
        if info.end == 0:
            return  # not sized yet: QEMU has not looked at the dirty bitmap
        left = info.end - info.cur
        now = time.monotonic()
        if self.low is None or left < self.low:
            self.low, self.since = left, now
        elif now - self.since >= self.timeout:
            raise NotConverging(
                f"{left} bytes still to copy, no fewer than {self.timeout:g} s ago: the guest "
                "writes faster than the commit copies (see agent.merge_bandwidth)")


async def _cancel(ctx: Context, name: str, target: str) -> None:
    """Cancel the active commit and wait, bounded, for QEMU to end it."""
    await ctx.hv.cancel_block_job(name, target)
    deadline = time.monotonic() + CANCEL_WAIT
    while await ctx.hv.block_job_info(name, target) is not None:
        if time.monotonic() >= deadline:
            raise MergeFailed(f"{name}/{target}: the active commit was cancelled but has not "
                              f"ended after {CANCEL_WAIT:g} s")
        await asyncio.sleep(0.2)


async def _pivot(ctx: Context, name: str, target: str) -> None:
    """Pivot, retrying the "not ready yet" answers a bounded number of times."""
    for attempt in range(1, PIVOT_TRIES + 1):
        try:
            await ctx.hv.pivot(name, target)
            return
        except PivotNotReady as err:
            if attempt == PIVOT_TRIES:
                raise MergeFailed(f"{name}/{target}: pivot never became possible: "
                                  f"{err.message}") from err
            await asyncio.sleep(PIVOT_RETRY)


async def _chain_settles(ctx: Context, merge: DeletePlan) -> None:
    deadline = time.monotonic() + CHAIN_SETTLE
    while merge.remove in await chain(ctx, merge):
        if time.monotonic() >= deadline:
            return  # verify() says what is wrong
        await asyncio.sleep(0.2)


async def offline_merge(ctx: Context, merge: DeletePlan) -> None:
    """qemu-img with every format named from the plan's chain and relative
    pointers (a layer may sit in another directory than the one below)."""
    if merge.method is Method.OFFLINE_COMMIT:
        await qemuimg.commit(merge.top)
        if merge.above is not None:
            await qemuimg.rebase(merge.above,
                                 images.relative_pointer(merge.above, merge.base),
                                 merge.base_format, safe=False)
    else:
        below = merge.pull_base
        await qemuimg.rebase(
            merge.top, images.relative_pointer(merge.top, below) if below else None,
            merge.format_of(below) if below else None, safe=True)
    # libvirt keeps the whole <backingStore> chain in the persistent definition
    # and trusts it at the next start: rewrite the disk so that it names the
    # new active layer and nothing below it (read from the headers again).
    active = merge.expected_chain[0]
    await ctx.hv.define_disk_source(merge.domain, merge.target, active,
                                    merge.format_of(active))


async def branch_pull(ctx: Context, op: Operation, merge: DeletePlan,
                       progress: ProgressSink, *, job: str) -> Operation:
    """S.image's data into every file it backs.  The active layer of the
    chain through it: a block pull (JOB "start"; "follow" after a restart;
    "done" when the chain shows it finished) or, domain stopped, qemu-img;
    every other dependent: qemu-img rebase, each skipped when done already."""
    if merge.job and job != "done":
        op = await live_merge(ctx, op, merge, progress, started=job == "follow")
    elif merge.pull_active and not merge.job:
        await _rebase_onto_pull_base(merge, merge.top)
        await ctx.hv.define_disk_source(merge.domain, merge.target, merge.top,
                                        merge.format_of(merge.top))
    for dependent in merge.dependents:
        await _rebase_onto_pull_base(merge, dependent)
    return op


async def _rebase_onto_pull_base(merge: DeletePlan, path: str) -> None:
    below = merge.pull_base
    if await backs_onto(path, below):
        return  # done before a restart
    await qemuimg.rebase(path, images.relative_pointer(path, below) if below else None,
                         merge.format_of(below) if below else None, safe=True)


async def backs_onto(path: str, below: str | None) -> bool:
    """Whether PATH (a qcow2 gasnap wrote or rebased) backs onto BELOW (None:
    onto nothing), however each is spelled."""
    found = await backing(path)
    if found is None or below is None:
        return found is below
    return await asyncio.to_thread(images.same_file, found, below)


async def backing(path: str) -> str | None:
    """PATH's backing file (a qcow2 gasnap wrote or rebased), spelled as
    PATH's directory is."""
    header = await asyncio.to_thread(images.read_qcow2_header, path)
    if header.backing_file is None:
        return None
    return await asyncio.to_thread(images.resolve_inside, str(Path(path).parent),
                                   header.backing_file, f"the backing of {path}")


async def chain(ctx: Context, merge: DeletePlan) -> list[str]:
    """The volume's chain now, read from the planned domain (by UUID)."""
    dom = await ctx.hv.get_domain(merge.domain, uuid=merge.uuid)
    if dom.name != merge.domain:
        raise DomainChanged(f"domain {merge.domain} is named {dom.name} now; "
                            "its merge is not touched")
    vol = dom.volume(merge.target)
    return [layer.path for layer in vol.chain] if vol is not None else []


class Reporter:
    """Job progress to the task and, in whole steps of 5 %, to the metadata."""

    def __init__(self, ctx: Context, snapshot_id: str, sink: ProgressSink,
                 convergence: Convergence | None = None) -> None:
        self.ctx = ctx
        self.snapshot_id = snapshot_id
        self.sink = sink
        self.last = -1
        self.convergence = convergence

    async def __call__(self, info: JobInfo) -> None:
        if self.convergence is not None:
            self.convergence.observe(info)  # NotConverging ends the follow
        percent = min(info.percent, 99)  # 100 once the chain says so
        await self.sink(percent)
        if percent // 5 != self.last // 5:
            self.last = percent
            try:
                await self.ctx.metadata.update_snapshot_status(
                    self.snapshot_id, Status.DELETING, f"{percent}%")
            except Unavailable as err:  # progress is a courtesy; the merge goes on
                log.warning("progress of %s not recorded: %s", self.snapshot_id, err.message)

    async def done(self) -> None:
        await self.sink(100)
