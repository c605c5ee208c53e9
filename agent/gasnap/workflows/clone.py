"""Clones: make, attach, detach, flatten and delete volumes made from snapshots.

Create (each step journaled before it is taken)::

    recording   create-clone-metadata (creating)
    making      the file at a hidden ``.part`` name (linked: qemu-img create
                backed by the image, relative pointer, format named; full:
                qemu-img convert, formats named), renamed whole to volume-<id>
    attaching   hot-plug (optional): live and in the definition, serial = id
    finalizing  finalize-clone-metadata (available)

Cut short before ``attaching``, recovery removes the file and records the
clone ``error``; from ``attaching`` on the file is whole, so the clone ends
``available``, attached as the domain's XML shows it.  Attach, detach,
flatten and delete each journal one step; recovery reads back from the
domain XML and the file's header what happened, and records that.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .. import faults, images, qemuimg
from ..blockjobs import JobInfo
from ..errors import GasnapError, NotFound, Unavailable, from_os_error
from ..hypervisor import Domain
from ..journal import Operation
from ..metadata import (
    Attachment,
    CloneChange,
    CloneMeta,
    CloneMode,
    CloneNotFound,
    CloneStatus,
    NewClone,
)
from . import Context, ProgressSink, space
from .cloneplan import AttachPlan, ClonePlan
from .records import until_recorded
from .steps import CloneStep, Kind

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted: the agent stopped before this clone was made"
PROGRESS_EVERY = 1.0  # seconds between progress reports of a full copy


class CloneFailed(GasnapError):
    code = "clone_failed"


@dataclass(frozen=True)
class Outcome:
    clone: CloneMeta | None = None
    failure: GasnapError | None = None


def _failure(err: GasnapError | OSError) -> GasnapError:
    return err if isinstance(err, GasnapError) else from_os_error(err)


async def _record(ctx: Context, clone_id: str, change: CloneChange) -> CloneMeta:
    """A change after the files changed: it must land (see ``records``)."""
    return await until_recorded(
        functools.partial(ctx.metadata.update_clone_metadata, clone_id, change),
        f"clone {clone_id}")


# --- create -----------------------------------------------------------------------


async def create(ctx: Context, plan: ClonePlan, progress: ProgressSink) -> Outcome:
    op = await ctx.journal.begin(Kind.CLONE, CloneStep.RECORDING,
                                 {"op": "create", **plan.to_dict()},
                                 volumes=[plan.clone_id, plan.source_volume_id])
    faults.hit("clone:recording")
    try:
        await ctx.metadata.create_clone_metadata(NewClone(
            clone_id=plan.clone_id, source_snapshot=plan.snapshot_id, name=plan.name,
            mode=plan.mode, file=plan.file,
            image=plan.image if plan.mode is CloneMode.LINKED else None, size=plan.size,
            created_at=plan.created_at))
    except GasnapError as err:
        if isinstance(err, Unavailable):  # the record may exist: recovery looks
            ctx.journal.release(op)
        else:
            await ctx.journal.finish(op)
        return Outcome(failure=err)
    op = await ctx.journal.step(op, CloneStep.MAKING)
    faults.hit("clone:making")
    try:
        await _make(ctx, plan, progress)
    except (GasnapError, OSError) as err:
        log.debug("clone %s: traceback", plan.clone_id, exc_info=True)
        failure = await space.explain(_failure(err), os.path.dirname(plan.file), ctx.min_free)
        await _undo(ctx, op, plan, failure.message)
        return Outcome(failure=failure)
    faults.hit("clone:made")
    if plan.attach is not None:
        op = await ctx.journal.step(op, CloneStep.ATTACHING)
        faults.hit("clone:attaching")
        try:
            await _attach(ctx, plan.attach)
        except GasnapError as err:
            # Nothing plugged in (one libvirt call): the clone is undone whole.
            await _undo(ctx, op, plan, f"attach to {plan.attach.domain}: {err.message}")
            return Outcome(failure=err)
    op = await ctx.journal.step(op, CloneStep.FINALIZING)
    faults.hit("clone:finalizing")
    meta = await until_recorded(functools.partial(
        ctx.metadata.finalize_clone_metadata, plan.clone_id, CloneStatus.AVAILABLE),
        f"finalize clone {plan.clone_id}")
    await ctx.journal.finish(op)
    return Outcome(clone=meta)


async def _make(ctx: Context, plan: ClonePlan, progress: ProgressSink) -> None:
    part = plan.part
    await _remove(part)  # a leftover of an earlier attempt
    if plan.mode is CloneMode.LINKED:
        await qemuimg.create_overlay(part, images.relative_pointer(part, plan.image),
                                     plan.image_format, plan.size)
    else:
        await _copy(ctx, plan, progress)
    await images.adopt_owner(part, plan.image)
    await asyncio.to_thread(os.rename, part, plan.file)


async def _copy(ctx: Context, plan: ClonePlan, progress: ProgressSink) -> None:
    """The full copy, its progress read from how far the copy has grown
    against the data of the image's chain (an estimate: never 100 before
    the copy is whole)."""
    total = await images.chain_data(plan.image, plan.image_format) or 1
    copy = asyncio.ensure_future(qemuimg.convert(plan.image, plan.image_format, plan.part,
                                                 bandwidth_mib=ctx.merge_bandwidth))
    try:
        while not copy.done():
            await asyncio.wait([copy], timeout=PROGRESS_EVERY)
            with contextlib.suppress(FileNotFoundError):
                await progress(min(99, 100 * await images.allocated(plan.part) // total))
        await copy
    finally:
        if not copy.done():
            copy.cancel()  # qemu-img is killed with it
            await asyncio.gather(copy, return_exceptions=True)


async def _attach(ctx: Context, plan: AttachPlan) -> CloneMeta:
    # Never inside a freeze window: a create there names every disk.
    async with ctx.windows.owning([plan.uuid]), ctx.hv.hold({plan.domain: plan.uuid}):
        await ctx.hv.attach_disk(plan.domain, plan.path, plan.target, plan.clone_id,
                                 readonly=plan.readonly)
    return await _record(ctx, plan.clone_id, CloneChange(
        attached_to=Attachment(plan.domain, plan.target, plan.readonly)))


async def _undo(ctx: Context, op: Operation, plan: ClonePlan, why: str) -> None:
    await _remove(plan.part)
    await _remove(plan.file)
    await until_recorded(functools.partial(
        ctx.metadata.finalize_clone_metadata, plan.clone_id, CloneStatus.ERROR, why),
        f"finalize clone {plan.clone_id}")
    await ctx.journal.finish(op)


async def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        await asyncio.to_thread(os.unlink, path)


# --- attach and detach ------------------------------------------------------------


async def _one_step(ctx: Context, step: CloneStep, plan: dict[str, Any],
                    work: Callable[[], Awaitable[CloneMeta]]) -> Outcome:
    """WORK journaled as STEP: on failure the journal entry is settled by
    reading back what happened (recovery does the same after a crash)."""
    op = await ctx.journal.begin(Kind.CLONE, step, plan, volumes=[plan["clone_id"]])
    faults.hit(f"clone:{step}")
    try:
        meta = await work()
    except (GasnapError, OSError) as err:
        log.debug("clone %s: %s: traceback", plan["clone_id"], step, exc_info=True)
        try:
            await _settle(ctx, op)
        except GasnapError as settle_err:
            log.error("clone %s: %s not settled: %s; recovery will", plan["clone_id"],
                      step, settle_err.message)
            ctx.journal.release(op)
        return Outcome(failure=_failure(err))
    await ctx.journal.finish(op)
    return Outcome(clone=meta)


async def attach(ctx: Context, plan: AttachPlan) -> Outcome:
    return await _one_step(ctx, CloneStep.ATTACHING, {"op": "attach", **plan.to_dict()},
                           lambda: _attach(ctx, plan))


async def detach(ctx: Context, meta: CloneMeta) -> Outcome:
    where = meta.attached_to
    if where is None:
        return Outcome(clone=meta)

    async def work() -> CloneMeta:
        dom = await _holder(ctx, where.domain, meta.id)
        if dom is not None:  # None: undefined since, nothing holds the clone any more
            async with ctx.windows.owning([dom.uuid]):  # as attach: never in a window
                await ctx.hv.detach_disk(dom.name, meta.id, timeout=ctx.detach_timeout)
        return await _record(ctx, meta.id, CloneChange(detach=True))

    return await _one_step(ctx, CloneStep.DETACHING,
                           {"op": "detach", "clone_id": meta.id, "domain": where.domain,
                            "readonly": where.readonly}, work)


async def _holder(ctx: Context, name: str, clone_id: str) -> Domain | None:
    """The domain that has the clone: the one the record names (its live
    view may have let go while its definition still holds the disk), or,
    renamed since, whichever has a disk with the clone's id as serial."""
    try:
        return await ctx.hv.get_domain(name)
    except NotFound:
        pass
    return next((dom for dom in await ctx.hv.list_domains()
                 if any(vol.serial == clone_id for vol in dom.volumes)), None)


async def _reconcile(ctx: Context, clone_id: str, domain: str, uuid: str | None,
                     readonly: bool) -> CloneMeta:
    """Record the attachment the domain's XML shows (live or defined); a
    domain renamed since is found by the clone's serial on its disk."""
    try:
        dom = await ctx.hv.get_domain(domain, uuid=uuid)
    except NotFound:
        held = await _holder(ctx, domain, clone_id)
        if held is None:
            return await _record(ctx, clone_id, CloneChange(detach=True))
        dom = held
    try:
        found = await ctx.hv.disk_targets(dom.name)
    except NotFound:
        return await _record(ctx, clone_id, CloneChange(detach=True))
    target = next((t for t, serial in found.items() if serial == clone_id), None)
    if target is None:
        return await _record(ctx, clone_id, CloneChange(detach=True))
    return await _record(ctx, clone_id, CloneChange(
        attached_to=Attachment(dom.name, target, readonly)))


# --- flatten ----------------------------------------------------------------------


async def flatten(ctx: Context, meta: CloneMeta, live: tuple[str, str, str] | None,
                  progress: ProgressSink) -> Outcome:
    """LIVE (domain, uuid, target): pull the data into the running domain's
    disk with a block job; else ``qemu-img rebase`` with no backing file."""

    async def work() -> CloneMeta:
        if live is None:
            await qemuimg.rebase(meta.file, None, None, safe=True)
        else:
            await _pull(ctx, live, progress)
        if await _backing(meta.file) is not None:
            raise CloneFailed(f"clone {meta.id}: {meta.file} still has a backing file")
        return await _record(ctx, meta.id, CloneChange(mode=CloneMode.FULL))

    plan = {"op": "flatten", "clone_id": meta.id, "file": meta.file}
    return await _one_step(ctx, CloneStep.FLATTENING, plan, work)


async def _pull(ctx: Context, live: tuple[str, str, str], progress: ProgressSink) -> None:
    domain, uuid, target = live

    async def report(info: JobInfo) -> None:
        await progress(min(info.percent, 99))

    async with ctx.hv.hold({domain: uuid}):
        # A pull an earlier flatten started (then the agent stopped) is followed.
        if await ctx.hv.block_job_info(domain, target) is None:
            await ctx.hv.block_pull(domain, target, None, bandwidth=ctx.merge_bandwidth)
        faults.hit("clone:pulling")
        await ctx.hv.follow_block_job(domain, target, want_ready=False, progress=report)
        dom = await ctx.hv.get_domain(domain, uuid=uuid)
    vol = dom.volume(target)
    if vol is None or len(vol.chain) != 1:
        raise CloneFailed(f"{domain}/{target}: after the pull the chain is "
                          f"{[layer.path for layer in vol.chain] if vol else 'gone'}")


async def _backing(path: str) -> str | None:
    return (await asyncio.to_thread(images.read_qcow2_header, path)).backing_file


# --- delete -----------------------------------------------------------------------


async def delete(ctx: Context, meta: CloneMeta) -> Outcome:
    async def work() -> CloneMeta:
        await ctx.metadata.update_clone_metadata(meta.id, CloneChange(
            status=CloneStatus.DELETING))
        faults.hit("clone:deleted-status")
        await _finish_delete(ctx, meta.id, meta.file)
        return meta

    return await _one_step(ctx, CloneStep.DELETING,
                           {"op": "delete", "clone_id": meta.id, "file": meta.file}, work)


async def _finish_delete(ctx: Context, clone_id: str, path: str) -> None:
    await _remove(path)
    # The spare overlay a snapshot of the clone's volume may have left on it.
    await ctx.spares.forget(images.spare_path(path), path)
    await until_recorded(functools.partial(ctx.metadata.clone_delete_metadata, clone_id),
                         f"delete clone record {clone_id}")


# --- recovery ---------------------------------------------------------------------


async def resume(ctx: Context, op: Operation) -> None:
    """Settle a clone operation cut short (see the module docstring)."""
    await _settle(ctx, op)


async def _settle(ctx: Context, op: Operation) -> None:
    plan = op.payload["plan"]
    kind, clone_id = plan["op"], plan["clone_id"]
    try:
        meta = await ctx.metadata.get_clone(clone_id)
    except CloneNotFound:
        meta = None
    if kind == "create":
        await _settle_create(ctx, op, ClonePlan.from_dict(
            {k: v for k, v in plan.items() if k != "op"}), meta)
        return
    if meta is None:
        pass  # deleted, or never made: nothing to record
    elif kind == "delete":
        if meta.status is CloneStatus.DELETING:
            await _finish_delete(ctx, clone_id, plan["file"])
    elif kind == "flatten":
        if await _backing(meta.file) is None:
            await _record(ctx, clone_id, CloneChange(mode=CloneMode.FULL))
    else:  # attach, detach
        await _reconcile(ctx, clone_id, plan["domain"], plan.get("uuid"),
                         bool(plan["readonly"]))
    await ctx.journal.finish(op)


async def _settle_create(ctx: Context, op: Operation, plan: ClonePlan,
                         meta: CloneMeta | None) -> None:
    whole = CloneStep(op.step) in (CloneStep.ATTACHING, CloneStep.FINALIZING)
    if meta is None or meta.status is not CloneStatus.CREATING:
        if meta is None or meta.status is CloneStatus.ERROR:
            await _remove(plan.part)
            await _remove(plan.file)
        await ctx.journal.finish(op)
        return
    if not whole:
        await _undo(ctx, op, plan, INTERRUPTED)
        return
    if plan.attach is not None:
        await _reconcile(ctx, plan.clone_id, plan.attach.domain, plan.attach.uuid,
                         plan.attach.readonly)
    await until_recorded(functools.partial(
        ctx.metadata.finalize_clone_metadata, plan.clone_id, CloneStatus.AVAILABLE),
        f"finalize clone {plan.clone_id}")
    await ctx.journal.finish(op)
