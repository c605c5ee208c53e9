"""Deleting a snapshot: merge its point-in-time image out of the chain.

With S the snapshot, the live chain reads ``... ← S.image ← S.file ← ...``
(active first: ``[..., S.file, S.image, ...]``):

* S.file is an inner layer → **commit** S.file into S.image (RELATIVE); the
  layer above now backs onto S.image, so the next snapshot's ``image`` becomes
  S.image; S.file is removed.
* S.file is the active layer → **pull** S.image's data into S.file (Nova's
  choice; the previous snapshot's overlay is then S.file; S.image is removed),
  or **active commit + pivot** (S.image becomes the active layer again; S.file
  is removed).  ``auto`` moves the fewer allocated bytes.
* Domain stopped → the same with ``qemu-img commit``/``rebase`` and relative
  pointers; the persistent definition follows when the active file changes.

``deleteplan`` finds the method; ``execute`` runs it.  Steps, each
journaled before it is taken: planned → deleting (status) → job
→ pivot (active commit) → cleanup (records, file, snapshot-delete-metadata).
Success is judged from the chain in the live XML, never from the job alone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .. import faults, images, metrics, qemuimg
from ..blockjobs import JobEnd, JobInfo, PivotNotReady
from ..errors import GasnapError, NotFound, Unavailable
from ..hypervisor import DomainChanged
from ..journal import Operation
from ..metadata import SnapshotMeta, Status
from . import Context, ProgressSink, no_progress
from .deleteplan import DeletePlan, MergeFailed, Method
from .records import until_recorded
from .steps import JOB_STEPS, DeleteStep, Kind

log = logging.getLogger(__name__)

PIVOT_TRIES = 20
PIVOT_RETRY = 0.5
CHAIN_SETTLE = 10.0  # after a pivot libvirt's XML can lag the call (VDSM)


# --- execute --------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    failure: GasnapError | None = None  # why the snapshot is not deleted, if it is not


async def execute(ctx: Context, merge: DeletePlan, progress: ProgressSink) -> Outcome:
    op = await ctx.journal.begin(Kind.DELETE, DeleteStep.PLANNED, merge.to_dict(),
                                 volumes=[merge.volume_id])
    faults.hit("delete:planned")
    op = await ctx.journal.step(op, DeleteStep.DELETING)
    try:
        await ctx.metadata.update_snapshot_status(merge.snapshot_id, Status.DELETING, "0%")
    except Unavailable as err:
        # The write may have landed before its answer was lost: the sweep
        # looks at the record once the service is back (available: nothing
        # happened; deleting: error_deleting, delete again).
        ctx.journal.release(op)
        return Outcome(err)
    faults.hit("delete:deleting")
    op = await ctx.journal.step(op, DeleteStep.JOB)
    started = time.monotonic()
    try:
        async with ctx.hv.hold(_held(merge)):
            if merge.method.live:
                op = await _live_merge(ctx, op, merge, progress, started=False)
            else:
                await _offline_merge(ctx, merge)
            faults.hit("delete:merged")
            await verify(ctx, merge)
    except Unavailable as err:
        # libvirtd away: QEMU goes on with the job.  The record stays
        # deleting and the sweep finishes the merge when libvirtd is back.
        ctx.journal.release(op)
        return Outcome(err)
    except (GasnapError, OSError) as err:
        log.debug("delete of %s: traceback", merge.snapshot_id, exc_info=True)
        failure = _as_gasnap(err)
        await _failed(ctx, op, merge, failure)
        return Outcome(failure)
    metrics.MERGE_SECONDS.labels(merge.method.value).observe(time.monotonic() - started)
    metrics.MERGE_BYTES.labels(merge.method.value).inc(merge.moved_bytes)
    await cleanup(ctx, op, merge)
    return Outcome()


def _held(merge: DeletePlan) -> dict[str, str]:
    return {merge.domain: merge.uuid} if merge.uuid else {}


def _as_gasnap(err: GasnapError | OSError) -> GasnapError:
    return err if isinstance(err, GasnapError) else images.host_error(err)


async def _live_merge(ctx: Context, op: Operation, merge: DeletePlan,
                      progress: ProgressSink, *, started: bool) -> Operation:
    name, target = merge.domain, merge.target
    if not started:
        # Never inside a freeze window of the same domain (see windows).
        async with ctx.windows.owning([merge.uuid or name]):
            await _start_job(ctx, merge)
    faults.hit("delete:job")
    reporter = _Reporter(ctx, merge.snapshot_id, progress)
    want_ready = merge.method is Method.ACTIVE_COMMIT
    end = await ctx.hv.follow_block_job(name, target, want_ready=want_ready,
                                        progress=reporter)
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
    if merge.method is Method.PULL:
        await ctx.hv.block_pull(name, target, merge.pull_base, bandwidth=ctx.merge_bandwidth)
    else:
        await ctx.hv.block_commit(name, target, merge.top, merge.base,
                                  active=merge.method is Method.ACTIVE_COMMIT,
                                  bandwidth=ctx.merge_bandwidth)


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
    while merge.remove in await _chain(ctx, merge):
        if time.monotonic() >= deadline:
            return  # verify() says what is wrong
        await asyncio.sleep(0.2)


async def _offline_merge(ctx: Context, merge: DeletePlan) -> None:
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


async def _chain(ctx: Context, merge: DeletePlan) -> list[str]:
    """The volume's chain now, read from the planned domain (by UUID)."""
    dom = await ctx.hv.get_domain(merge.domain, uuid=merge.uuid)
    if dom.name != merge.domain:
        raise DomainChanged(f"domain {merge.domain} is named {dom.name} now; "
                            "its merge is not touched")
    vol = dom.volume(merge.target)
    return [layer.path for layer in vol.chain] if vol is not None else []


async def verify(ctx: Context, merge: DeletePlan) -> None:
    """The merge worked iff the chain is the planned one without ``remove``."""
    chain = await _chain(ctx, merge)
    if chain != merge.expected_chain:
        raise MergeFailed(
            f"{merge.domain}/{merge.target}: after the merge the chain is {chain}, "
            f"expected {merge.expected_chain}"
        )


async def cleanup(ctx: Context, op: Operation, merge: DeletePlan) -> None:
    """Records first (they must never point at a file that is gone), then the
    file, then the snapshot's own record.  Idempotent: recovery repeats it."""
    op = await ctx.journal.step(op, DeleteStep.CLEANUP)
    sid, meta_svc = merge.snapshot_id, ctx.metadata
    for relink in merge.relinks:
        await until_recorded(
            functools.partial(meta_svc.update_snapshot_files, relink.snapshot_id, relink.file,
                              relink.backing_file), f"relink {relink.snapshot_id}")
    faults.hit("delete:cleanup")
    await _remove(ctx, merge.remove)
    if await ctx.spares.forget(images.spare_path(merge.remove), merge.remove):
        await _replace_spare(ctx, merge)
    meta = await until_recorded(functools.partial(meta_svc.get_snapshot, sid), f"read {sid}")
    if meta.status is not Status.DELETING:
        await until_recorded(functools.partial(
            meta_svc.update_snapshot_status, sid, Status.DELETING, "100%"), f"status {sid}")
    await until_recorded(functools.partial(meta_svc.snapshot_delete_metadata, sid),
                         f"delete record {sid}")
    await ctx.journal.finish(op)


async def _remove(ctx: Context, path: str) -> None:
    """PATH left the planned chain; it goes unless another chain holds it."""
    if await images.real_path(path) in await ctx.hv.files_in_use():
        log.error("%s left the merged chain but another chain uses it: kept", path)
        return
    try:
        await asyncio.to_thread(Path(path).unlink, missing_ok=True)
    except OSError as err:
        # The merge is done and verified: the snapshot is gone from the chain
        # whatever happens to the file, which is in no chain now.
        log.error("%s left the chain but cannot be removed (%s); remove it by hand",
                  path, err.strerror or err)


async def _replace_spare(ctx: Context, merge: DeletePlan) -> None:
    """The volume's spare pointed at the file just removed.  After an active
    commit S.image is the active layer again: the next snapshot's spare goes
    on top of it, as after a create.  (A volume that had no spare, such as
    one whose overlays Cinder makes, gets none.)"""
    if merge.method is not Method.ACTIVE_COMMIT:
        return
    try:
        size = await images.virtual_size(merge.base, merge.base_format)
    except (OSError, GasnapError) as err:
        log.debug("no spare on %s: %s", merge.base, err)
        return
    ctx.spares.prepare(images.spare_path(merge.base), merge.base, merge.base_format, size)


async def _failed(ctx: Context, op: Operation, merge: DeletePlan, err: GasnapError) -> None:
    log.error("delete of %s failed: %s", merge.snapshot_id, err.message)
    await until_recorded(functools.partial(
        ctx.metadata.update_snapshot_status, merge.snapshot_id, Status.ERROR_DELETING, "0%"),
        f"status {merge.snapshot_id}")
    await ctx.journal.finish(op)


class _Reporter:
    """Job progress to the task and, in whole steps of 5 %, to the metadata."""

    def __init__(self, ctx: Context, snapshot_id: str, sink: ProgressSink) -> None:
        self.ctx = ctx
        self.snapshot_id = snapshot_id
        self.sink = sink
        self.last = -1

    async def __call__(self, info: JobInfo) -> None:
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


# --- recovery -------------------------------------------------------------------


_JOB_KIND = {Method.PULL: "pull", Method.COMMIT: "commit",
             Method.ACTIVE_COMMIT: "active-commit"}


async def resume(ctx: Context, op: Operation) -> None:
    """Finish or settle a delete the journal shows unfinished, from the live
    chain and libvirt's job state (libvirt keeps jobs across our restarts).
    Only the planned domain (by UUID, under its planned name) is acted on,
    and only a job of the kind gasnap started is followed or pivoted."""
    merge = DeletePlan.from_dict(op.payload["plan"])
    try:
        meta = await ctx.metadata.get_snapshot(merge.snapshot_id)
    except NotFound:
        await ctx.journal.finish(op)  # cleanup had already finished
        return
    try:
        chain = await _chain(ctx, merge)
    except (NotFound, DomainChanged) as err:
        await _give_up(ctx, op, merge, meta, f"{err.message}; nothing was changed")
        return
    if chain == merge.expected_chain:
        log.warning("recovery: merge for %s is done; cleaning up", merge.snapshot_id)
        await cleanup(ctx, op, merge)
        return
    job = None
    if merge.method.live and DeleteStep(op.step) in JOB_STEPS:
        job = await ctx.hv.block_job_info(merge.domain, merge.target)
    if job is not None and job.kind != _JOB_KIND[merge.method]:
        await _give_up(ctx, op, merge, meta, f"a {job.kind} job that gasnap did not start "
                       f"runs on {merge.domain}/{merge.target}; left alone")
        return
    if job is None:
        await _give_up(ctx, op, merge, meta,
                       "interrupted: the merge did not finish; delete again to retry")
        return
    log.warning("recovery: resuming the block job of %s", merge.snapshot_id)
    try:
        async with ctx.hv.hold(_held(merge)):
            op = await _live_merge(ctx, op, merge, no_progress, started=True)
            await verify(ctx, merge)
    except Unavailable:
        raise  # libvirtd still away: the next sweep tries again
    except GasnapError as err:
        await _failed(ctx, op, merge, err)
        return
    await cleanup(ctx, op, merge)


async def _give_up(ctx: Context, op: Operation, merge: DeletePlan, meta: SnapshotMeta,
                   reason: str) -> None:
    """End OP without touching disks: error_deleting if the merge may have
    started (delete again to retry), the record as it was otherwise."""
    if meta.status is Status.DELETING:
        await _failed(ctx, op, merge, MergeFailed(reason))
    else:
        log.warning("recovery: delete of %s never started (%s)", merge.snapshot_id, reason)
        await ctx.journal.finish(op)
