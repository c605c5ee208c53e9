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
* S on a branch a revert left → a **branch pull** of S.image into every file
  it backs; or, S.file being the branch's newest file and nobody else's, a
  **drop**: no merge, S.file (and S.image, if S alone holds it) removed.

``deleteplan`` finds the method; ``execute`` runs it.  Steps, each
journaled before it is taken: planned → deleting (status) → job
→ pivot (active commit) → cleanup (records, file, snapshot-delete-metadata).
Success is judged from the chain in the live XML, never from the job alone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .. import faults, images, metrics
from ..errors import GasnapError, NotFound, Unavailable, from_os_error
from ..hypervisor import DomainChanged
from ..journal import Operation
from ..metadata import HOLDING, SnapshotMeta, Status
from . import Context, ProgressSink, merging, no_progress, space
from .deleteplan import DeletePlan, MergeFailed, Method, merge_target
from .records import until_recorded
from .steps import JOB_STEPS, DeleteStep, Kind

log = logging.getLogger(__name__)



# --- execute --------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    failure: GasnapError | None = None  # why the snapshot is not deleted, if it is not


async def execute(ctx: Context, merge: DeletePlan, progress: ProgressSink) -> Outcome:
    op = await ctx.journal.begin(Kind.DELETE, DeleteStep.PLANNED, merge.to_dict(),
                                 volumes=[merge.volume_id])
    log.info("delete of %s: %s on %s/%s, removing %s", merge.snapshot_id, merge.method.value,
             merge.domain, merge.target, ", ".join(map(os.path.basename, merge.removed)))
    faults.hit("delete:planned")
    op = await ctx.journal.step(op, DeleteStep.DELETING)
    refused = await _mark_deleting(ctx, op, merge)
    if refused is not None:
        return refused
    faults.hit("delete:deleting")
    op = await ctx.journal.step(op, DeleteStep.JOB)
    started = time.monotonic()
    try:
        async with ctx.hv.hold(_held(merge)):
            if merge.method is Method.DROP:
                pass  # nothing to merge: the files go at clean-up
            elif merge.method is Method.BRANCH_PULL:
                op = await merging.branch_pull(ctx, op, merge, progress, job="start")
            elif merge.method.live:
                op = await merging.live_merge(ctx, op, merge, progress, started=False)
            else:
                await merging.offline_merge(ctx, merge)
            faults.hit("delete:merged")
            await verify(ctx, merge)
    except Unavailable as err:
        # libvirtd away: QEMU goes on with the job.
        return await _ride_out(ctx, op, merge, err)
    except (GasnapError, OSError) as err:
        log.debug("delete of %s: traceback", merge.snapshot_id, exc_info=True)
        failure = await space.explain(_as_gasnap(err), os.path.dirname(merge_target(merge)),
                                      ctx.min_free)
        await _failed(ctx, op, merge, failure)
        return Outcome(failure)
    metrics.MERGE_SECONDS.labels(merge.method.value).observe(time.monotonic() - started)
    metrics.MERGE_BYTES.labels(merge.method.value).inc(merge.moved_bytes)
    try:
        await cleanup(ctx, op, merge)
    except Unavailable as err:
        return await _ride_out(ctx, op, merge, err)
    except (GasnapError, OSError) as err:
        # Merged, not yet cleaned up: the sweep repeats the clean-up.
        log.error("delete of %s: clean-up failed (%s); the sweep will retry it",
                  merge.snapshot_id, err)
        ctx.journal.release(op)
        return Outcome(_as_gasnap(err))
    return Outcome()


async def _mark_deleting(ctx: Context, op: Operation, merge: DeletePlan) -> Outcome | None:
    """The record says deleting before anything moves; the failed Outcome
    if it could not be said."""
    try:
        await ctx.metadata.update_snapshot_status(merge.snapshot_id, Status.DELETING, "0%")
    except Unavailable as err:
        # The write may have landed before its answer was lost: the sweep
        # looks at the record once the service is back (available: nothing
        # happened; deleting: error_deleting, delete again).
        ctx.journal.release(op)
        return Outcome(err)
    except GasnapError as err:
        # The store refused the transition (another delete took the record,
        # a clone names it): nothing happened, nothing is left to settle.
        log.error("delete of %s refused by the metadata service: %s", merge.snapshot_id,
                  err.message)
        await ctx.journal.finish(op)
        return Outcome(err)
    return None


async def _ride_out(ctx: Context, op: Operation, merge: DeletePlan,
                    err: Unavailable) -> Outcome:
    """The hypervisor went away mid-merge (a libvirtd restart): wait for it,
    then finish as recovery would, so that the task says how the delete
    ended.  Past the outage bound the record stays deleting and the sweep
    finishes the merge when libvirtd is back."""
    log.warning("delete of %s: %s; waiting for the hypervisor", merge.snapshot_id,
                err.message)
    try:
        await ctx.hv.reachable()
        await resume(ctx, op)
        meta = await ctx.metadata.get_snapshot(merge.snapshot_id)
    except NotFound:
        return Outcome()  # merged and cleaned up
    except Unavailable as again:
        ctx.journal.release(op)
        return Outcome(again)
    return Outcome(MergeFailed(meta.error or f"the snapshot is {meta.status.value}"))


def _held(merge: DeletePlan) -> dict[str, str]:
    return {merge.domain: merge.uuid} if merge.uuid else {}


def _as_gasnap(err: GasnapError | OSError) -> GasnapError:
    return err if isinstance(err, GasnapError) else from_os_error(err)


async def verify(ctx: Context, merge: DeletePlan) -> None:
    """The merge worked iff the chain is the planned one without ``remove``."""
    chain = await merging.chain(ctx, merge)
    if chain != merge.expected_chain:
        raise MergeFailed(
            f"{merge.domain}/{merge.target}: after the merge the chain is {chain}, "
            f"expected {merge.expected_chain}"
        )
    for dependent in merge.dependents:
        if not await merging.backs_onto(dependent, merge.pull_base):
            raise MergeFailed(f"{dependent} does not back onto {merge.pull_base} after the "
                              "merge")


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
    for path in merge.removed:
        await _remove(ctx, path)
        if await ctx.spares.forget(images.spare_path(path), path):
            await _replace_spare(ctx, merge)
    meta = await until_recorded(functools.partial(meta_svc.get_snapshot, sid), f"read {sid}")
    if meta.status is not Status.DELETING:
        await until_recorded(functools.partial(
            meta_svc.update_snapshot_status, sid, Status.DELETING, "100%"), f"status {sid}")
    await until_recorded(functools.partial(meta_svc.snapshot_delete_metadata, sid),
                         f"delete record {sid}")
    if merge.memory_file is not None:
        await _drop_memory_if_unused(ctx, merge)
    await ctx.journal.finish(op)


async def _drop_memory_if_unused(ctx: Context, merge: DeletePlan) -> None:
    """The group's memory file goes with the last record that names it."""
    group = await until_recorded(functools.partial(
        ctx.metadata.list_snapshots, group_id=merge.group_id), f"group {merge.group_id}")
    if any(m.memory_file == merge.memory_file for m in group if m.status in HOLDING):
        return
    # The directories come from the live domain at plan time (the group's
    # other records are a shared service's data and name nothing here); a
    # plan journaled before plans carried them reads the domain now.
    dirs = merge.memory_dirs or await _chain_dirs(ctx, merge)
    if not images.memory_name_ok(str(merge.memory_file), dirs, merge.group_id, merge.uuid):
        log.error("snapshot %s: its record's memory file %s is not one gasnap named beside "
                  "its images: kept", merge.snapshot_id, merge.memory_file)
        return
    await asyncio.to_thread(images.drop_memory, str(merge.memory_file))


async def _chain_dirs(ctx: Context, merge: DeletePlan) -> list[str]:
    try:
        dom = await ctx.hv.get_domain(merge.domain, uuid=merge.uuid)
    except GasnapError as err:
        log.warning("%s: its disks cannot be read (%s)", merge.domain, err.message)
        return []
    return sorted({os.path.dirname(layer.path) for v in dom.volumes for layer in v.chain})


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


# --- recovery -------------------------------------------------------------------


_JOB_KIND = {Method.PULL: "pull", Method.COMMIT: "commit",
             Method.ACTIVE_COMMIT: "active-commit", Method.BRANCH_PULL: "pull"}


async def own_job_copies(ctx: Context, merge: DeletePlan) -> bool:
    """Whether the block job MERGE started still copies on its disk (one
    ready for its pivot is done copying; a job of another kind there, an
    operator's, is not its own)."""
    job = await ctx.hv.block_job_info(merge.domain, merge.target)
    return (job is not None and job.kind == _JOB_KIND.get(merge.method)
            and job.cur < job.end)


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
        chain = await merging.chain(ctx, merge)
    except (NotFound, DomainChanged) as err:
        await _give_up(ctx, op, merge, meta, f"{err.message}; nothing was changed")
        return
    if merge.method is Method.DROP:
        await _resume_drop(ctx, op, merge, meta)
    elif merge.method is Method.BRANCH_PULL:
        await _resume_branch(ctx, op, merge, meta, chain)
    elif chain == merge.expected_chain:
        log.warning("recovery: merge for %s is done; cleaning up", merge.snapshot_id)
        await cleanup(ctx, op, merge)
    else:
        await _resume_job(ctx, op, merge, meta)


async def _resume_job(ctx: Context, op: Operation, merge: DeletePlan,
                      meta: SnapshotMeta) -> None:
    """Follow (and pivot) the block job gasnap started, if it still runs."""
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
            op = await merging.live_merge(ctx, op, merge, no_progress, started=True)
            await verify(ctx, merge)
    except Unavailable:
        raise  # libvirtd still away: the next sweep tries again
    except GasnapError as err:
        await _failed(ctx, op, merge, err)
        return
    await cleanup(ctx, op, merge)


async def _resume_branch(ctx: Context, op: Operation, merge: DeletePlan, meta: SnapshotMeta,
                         chain: list[str]) -> None:
    """A branch pull's steps are each idempotent: once the job step was
    reached, finish what is left (following a pull that still runs)."""
    step = DeleteStep(op.step)
    if step is DeleteStep.CLEANUP:
        await cleanup(ctx, op, merge)
        return
    if step not in JOB_STEPS:
        await _give_up(ctx, op, merge, meta, "interrupted before the merge started; "
                       "delete again to retry")
        return
    job = "done" if chain == merge.expected_chain else "follow"
    if merge.job and job == "follow":
        running = await ctx.hv.block_job_info(merge.domain, merge.target)
        if running is None or running.kind != "pull":
            await _give_up(ctx, op, merge, meta, "interrupted: the pull did not finish; "
                           "delete again to retry")
            return
    log.warning("recovery: finishing the branch pull of %s", merge.snapshot_id)
    try:
        async with ctx.hv.hold(_held(merge)):
            op = await merging.branch_pull(ctx, op, merge, no_progress, job=job)
            await verify(ctx, merge)
    except Unavailable:
        raise
    except (GasnapError, OSError) as err:
        await _failed(ctx, op, merge, _as_gasnap(err))
        return
    await cleanup(ctx, op, merge)


async def _resume_drop(ctx: Context, op: Operation, merge: DeletePlan,
                       meta: SnapshotMeta) -> None:
    """A drop changes no file before its clean-up: from the job step on,
    the record is deleting and the clean-up finishes; before, nothing moved."""
    if DeleteStep(op.step) in (DeleteStep.PLANNED, DeleteStep.DELETING):
        await _give_up(ctx, op, merge, meta, "interrupted before the files were removed; "
                       "delete again to retry")
        return
    log.warning("recovery: finishing the drop of %s", merge.snapshot_id)
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
