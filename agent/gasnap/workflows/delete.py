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

Steps, each journaled before it is taken: planned → deleting (status) → job
→ pivot (active commit) → cleanup (records, file, snapshot-delete-metadata).
Success is judged from the chain in the live XML, never from the job alone.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import faults, images, metrics, qemuimg
from ..blockjobs import JobEnd, JobInfo, PivotNotReady
from ..errors import Conflict, GasnapError, NotFound, Unavailable
from ..hypervisor import Domain, DomainChanged, DomainState, Volume
from ..journal import Operation
from ..metadata import SnapshotMeta, Status, WrongStatus
from . import Context, ProgressSink, no_progress
from .create import HostIOError, UnsupportedDisk
from .records import until_recorded
from .steps import JOB_STEPS, DeleteStep, Kind

log = logging.getLogger(__name__)

PIVOT_TRIES = 20
PIVOT_RETRY = 0.5
CHAIN_SETTLE = 10.0  # after a pivot libvirt's XML can lag the call (VDSM)
DELETE_FROM = (Status.AVAILABLE, Status.ERROR_DELETING)  # error_deleting: a retry


class Strategy(enum.Enum):
    AUTO = "auto"
    COMMIT = "commit"
    PULL = "pull"


class Method(enum.Enum):
    COMMIT = "commit"  # live, S.file inner
    ACTIVE_COMMIT = "active-commit"  # live, S.file active: commit + pivot
    PULL = "pull"  # live, S.file active
    OFFLINE_COMMIT = "offline-commit"
    OFFLINE_PULL = "offline-pull"

    @property
    def live(self) -> bool:
        return self in (Method.COMMIT, Method.ACTIVE_COMMIT, Method.PULL)


class ChainMismatch(Conflict):
    code = "chain_mismatch"


class StrategyUnsupported(Conflict):
    code = "strategy_unsupported"


class MergeFailed(GasnapError):
    code = "merge_failed"


@dataclass(frozen=True)
class Relink:
    snapshot_id: str
    file: str | None = None
    backing_file: str | None = None


@dataclass(frozen=True)
class DeletePlan:
    snapshot_id: str
    domain: str
    target: str
    volume_id: str
    method: Method
    top: str  # commit: the layer merged down; pull: the active layer
    base: str  # commit: where its data goes; pull: the layer pulled up
    remove: str  # the file that leaves the chain and is deleted
    pull_base: str | None  # pull: the new backing of the active layer
    above: str | None  # offline inner commit: the layer to re-point at base
    base_format: str
    moved_bytes: int
    chain: list[str]  # the chain when planned, active first
    relinks: list[Relink] = field(default_factory=list)
    uuid: str | None = None  # the domain's, when planned: every step acts on it alone
    formats: dict[str, str] = field(default_factory=dict)  # chain file -> its format

    def format_of(self, path: str) -> str:
        """PATH's format as the live chain named it when planned (never probed)."""
        try:
            return self.formats[path]
        except KeyError:
            raise MergeFailed(f"no recorded format for {path}; delete again to replan") from None

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["method"] = self.method.value
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> DeletePlan:
        fields = dict(doc)
        fields["method"] = Method(doc["method"])
        fields["relinks"] = [Relink(**r) for r in doc["relinks"]]
        return cls(**fields)

    @property
    def expected_chain(self) -> list[str]:
        return [p for p in self.chain if p != self.remove]


# --- plan ---------------------------------------------------------------------


def _locate(meta: SnapshotMeta, dom: Domain) -> tuple[Volume, list[str], int]:
    vol = dom.volume(meta.target or "") or dom.volume(meta.volume_id)
    if vol is None:
        raise ChainMismatch(f"snapshot {meta.id}: domain {dom.name} has no disk "
                            f"{meta.target} any more")
    chain = [layer.path for layer in vol.chain]
    if meta.file not in chain:
        raise ChainMismatch(f"snapshot {meta.id}: its overlay {meta.file} is not in the live "
                            f"chain of {dom.name}/{vol.target}")
    index = chain.index(str(meta.file))
    below = chain[index + 1] if index + 1 < len(chain) else None
    if below != meta.backing_file:
        raise ChainMismatch(f"snapshot {meta.id}: below its overlay the live chain has "
                            f"{below}, the record says {meta.backing_file}")
    return vol, chain, index


async def plan(ctx: Context, snapshot_id: str, strategy: Strategy) -> DeletePlan:
    meta = await ctx.metadata.get_snapshot(snapshot_id)
    if meta.status not in DELETE_FROM:
        raise WrongStatus(f"snapshot {snapshot_id} is {meta.status.value}; only available "
                          "snapshots can be deleted")
    dom = await ctx.hv.get_domain(meta.domain)
    if dom.state not in (DomainState.RUNNING, DomainState.PAUSED, DomainState.SHUTOFF):
        raise Conflict(f"{dom.name} is {dom.state.value}", code="domain_state")
    live = dom.state is not DomainState.SHUTOFF
    vol, chain, index = _locate(meta, dom)
    if vol.chain_error is not None or vol.shareable or vol.readonly:
        raise UnsupportedDisk(f"{dom.name}/{vol.target} cannot be merged safely: "
                              f"{vol.chain_error or 'shareable or read-only'}")
    if live and await ctx.hv.block_job_info(dom.name, vol.target) is not None:
        raise Conflict(f"a block job already runs on {dom.name}/{vol.target}",
                       code="block_job_running")
    image = str(meta.backing_file)
    others = [m for m in await ctx.metadata.list_snapshots(volume_id=meta.volume_id)
              if m.id != meta.id]
    base_format = vol.chain[index + 1].format

    def make(method: Method, remove: str, *, pull_base: str | None = None,
             above: str | None = None, moved: int, relinks: list[Relink] | None = None
             ) -> DeletePlan:
        return DeletePlan(
            snapshot_id=meta.id, domain=dom.name, target=vol.target,
            volume_id=meta.volume_id, method=method, top=str(meta.file), base=image,
            remove=remove, pull_base=pull_base, above=above, base_format=base_format,
            moved_bytes=moved, chain=chain, relinks=relinks or [], uuid=dom.uuid,
            formats={layer.path: layer.format for layer in vol.chain},
        )

    if index > 0:  # inner
        if strategy is Strategy.PULL:
            raise StrategyUnsupported(f"snapshot {meta.id} is not the newest of its volume: "
                                      "only commit can merge an inner layer")
        return make(Method.COMMIT if live else Method.OFFLINE_COMMIT, str(meta.file),
                    above=chain[index - 1], moved=await images.allocated(str(meta.file)),
                    relinks=[Relink(m.id, backing_file=image) for m in others
                             if m.backing_file == meta.file])
    top_bytes, base_bytes = await images.allocated(str(meta.file)), await images.allocated(image)
    if strategy is Strategy.AUTO:
        strategy = Strategy.PULL if base_bytes < top_bytes else Strategy.COMMIT
    if strategy is Strategy.COMMIT:
        return make(Method.ACTIVE_COMMIT if live else Method.OFFLINE_COMMIT, str(meta.file),
                    moved=top_bytes)
    return make(Method.PULL if live else Method.OFFLINE_PULL, image,
                pull_base=chain[index + 2] if index + 2 < len(chain) else None,
                moved=base_bytes,
                relinks=[Relink(m.id, file=str(meta.file)) for m in others if m.file == image])


# --- execute --------------------------------------------------------------------


async def execute(ctx: Context, the_plan: DeletePlan, progress: ProgressSink) -> None:
    op = await ctx.journal.begin(Kind.DELETE, DeleteStep.PLANNED, {"plan": the_plan.to_dict()},
                                 volumes=[the_plan.volume_id])
    faults.hit("delete:planned")
    op = await ctx.journal.step(op, DeleteStep.DELETING)
    try:
        await ctx.metadata.update_snapshot_status(the_plan.snapshot_id, Status.DELETING, "0%")
    except Unavailable:
        # The write may have landed before its answer was lost: the sweep
        # looks at the record once the service is back (available: nothing
        # happened; deleting: error_deleting, delete again).
        ctx.journal.release(op)
        raise
    faults.hit("delete:deleting")
    op = await ctx.journal.step(op, DeleteStep.JOB)
    started = time.monotonic()
    try:
        async with ctx.hv.hold(_held(the_plan)):
            if the_plan.method.live:
                op = await _live_merge(ctx, op, the_plan, progress, started=False)
            else:
                await _offline_merge(ctx, the_plan)
            faults.hit("delete:merged")
            await verify(ctx, the_plan)
    except Unavailable:
        # libvirtd away: QEMU goes on with the job.  The record stays
        # deleting and the sweep finishes the merge when libvirtd is back.
        ctx.journal.release(op)
        raise
    except (GasnapError, OSError) as err:
        failure = _as_gasnap(err)
        await _failed(ctx, op, the_plan, failure)
        raise failure from err
    metrics.MERGE_SECONDS.labels(the_plan.method.value).observe(time.monotonic() - started)
    metrics.MERGE_BYTES.labels(the_plan.method.value).inc(the_plan.moved_bytes)
    await cleanup(ctx, op, the_plan)


def _held(the_plan: DeletePlan) -> dict[str, str]:
    return {the_plan.domain: the_plan.uuid} if the_plan.uuid else {}


def _as_gasnap(err: GasnapError | OSError) -> GasnapError:
    if isinstance(err, GasnapError):
        return err
    return HostIOError(f"{err.strerror or err}: {err.filename or ''}".rstrip(": "))


async def _live_merge(ctx: Context, op: Operation, the_plan: DeletePlan,
                      progress: ProgressSink, *, started: bool) -> Operation:
    name, target = the_plan.domain, the_plan.target
    if not started:
        # Never inside a freeze window of the same domain (see windows).
        async with ctx.windows.owning([the_plan.uuid or name]):
            await _start_job(ctx, the_plan)
    faults.hit("delete:job")
    reporter = _Reporter(ctx, the_plan.snapshot_id, progress)
    want_ready = the_plan.method is Method.ACTIVE_COMMIT
    end = await ctx.hv.follow_block_job(name, target, want_ready=want_ready,
                                        progress=reporter)
    log.info("%s/%s: block job ended: %s", name, target, end.value)
    if end is JobEnd.READY:
        op = await ctx.journal.step(op, DeleteStep.PIVOT)
        faults.hit("delete:pivot")
        await _pivot(ctx, name, target)
        await _chain_settles(ctx, the_plan)
    elif end in (JobEnd.FAILED, JobEnd.CANCELED):
        raise MergeFailed(f"{name}/{target}: the block job {end.value}")
    await reporter.done()
    return op


async def _start_job(ctx: Context, the_plan: DeletePlan) -> None:
    name, target = the_plan.domain, the_plan.target
    if the_plan.method is Method.PULL:
        await ctx.hv.block_pull(name, target, the_plan.pull_base, bandwidth=ctx.merge_bandwidth)
    else:
        await ctx.hv.block_commit(name, target, the_plan.top, the_plan.base,
                                  active=the_plan.method is Method.ACTIVE_COMMIT,
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


async def _chain_settles(ctx: Context, the_plan: DeletePlan) -> None:
    deadline = time.monotonic() + CHAIN_SETTLE
    while the_plan.remove in await _chain(ctx, the_plan):
        if time.monotonic() >= deadline:
            return  # verify() says what is wrong
        await asyncio.sleep(0.2)


async def _offline_merge(ctx: Context, the_plan: DeletePlan) -> None:
    """qemu-img with every format named from the plan's chain and relative
    pointers (a layer may sit in another directory than the one below)."""
    if the_plan.method is Method.OFFLINE_COMMIT:
        await qemuimg.commit(the_plan.top)
        if the_plan.above is not None:
            await qemuimg.rebase(the_plan.above,
                                 images.relative_pointer(the_plan.above, the_plan.base),
                                 the_plan.base_format, safe=False)
    else:
        below = the_plan.pull_base
        await qemuimg.rebase(
            the_plan.top, images.relative_pointer(the_plan.top, below) if below else None,
            the_plan.format_of(below) if below else None, safe=True)
    # libvirt keeps the whole <backingStore> chain in the persistent definition
    # and trusts it at the next start: rewrite the disk so that it names the
    # new active layer and nothing below it (read from the headers again).
    active = the_plan.expected_chain[0]
    await ctx.hv.define_disk_source(the_plan.domain, the_plan.target, active,
                                    the_plan.format_of(active))


async def _chain(ctx: Context, the_plan: DeletePlan) -> list[str]:
    """The volume's chain now, read from the planned domain (by UUID)."""
    dom = await ctx.hv.get_domain(the_plan.domain, uuid=the_plan.uuid)
    if dom.name != the_plan.domain:
        raise DomainChanged(f"domain {the_plan.domain} is named {dom.name} now; "
                            "its merge is not touched")
    vol = dom.volume(the_plan.target)
    return [layer.path for layer in vol.chain] if vol is not None else []


async def verify(ctx: Context, the_plan: DeletePlan) -> None:
    """The merge worked iff the chain is the planned one without ``remove``."""
    chain = await _chain(ctx, the_plan)
    if chain != the_plan.expected_chain:
        raise MergeFailed(
            f"{the_plan.domain}/{the_plan.target}: after the merge the chain is {chain}, "
            f"expected {the_plan.expected_chain}"
        )


async def cleanup(ctx: Context, op: Operation, the_plan: DeletePlan) -> None:
    """Records first (they must never point at a file that is gone), then the
    file, then the snapshot's own record.  Idempotent: recovery repeats it."""
    op = await ctx.journal.step(op, DeleteStep.CLEANUP)
    sid, meta_svc = the_plan.snapshot_id, ctx.metadata
    for relink in the_plan.relinks:
        await until_recorded(
            functools.partial(meta_svc.update_snapshot_files, relink.snapshot_id, relink.file,
                              relink.backing_file), f"relink {relink.snapshot_id}")
    faults.hit("delete:cleanup")
    await _remove(ctx, the_plan.remove)
    if await ctx.spares.forget(images.spare_path(the_plan.remove), the_plan.remove):
        await _replace_spare(ctx, the_plan)
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


async def _replace_spare(ctx: Context, the_plan: DeletePlan) -> None:
    """The volume's spare pointed at the file just removed.  After an active
    commit S.image is the active layer again: the next snapshot's spare goes
    on top of it, as after a create.  (A volume that had no spare, such as
    one whose overlays Cinder makes, gets none.)"""
    if the_plan.method is not Method.ACTIVE_COMMIT:
        return
    try:
        size = await images.virtual_size(the_plan.base, the_plan.base_format)
    except (OSError, GasnapError) as err:
        log.debug("no spare on %s: %s", the_plan.base, err)
        return
    ctx.spares.prepare(images.spare_path(the_plan.base), the_plan.base, the_plan.base_format, size)


async def _failed(ctx: Context, op: Operation, the_plan: DeletePlan, err: GasnapError) -> None:
    log.error("delete of %s failed: %s", the_plan.snapshot_id, err.message)
    await until_recorded(functools.partial(
        ctx.metadata.update_snapshot_status, the_plan.snapshot_id, Status.ERROR_DELETING, "0%"),
        f"status {the_plan.snapshot_id}")
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
    the_plan = DeletePlan.from_dict(op.payload["plan"])
    try:
        meta = await ctx.metadata.get_snapshot(the_plan.snapshot_id)
    except NotFound:
        await ctx.journal.finish(op)  # cleanup had already finished
        return
    try:
        chain = await _chain(ctx, the_plan)
    except (NotFound, DomainChanged) as err:
        await _give_up(ctx, op, the_plan, meta, f"{err.message}; nothing was changed")
        return
    if chain == the_plan.expected_chain:
        log.warning("recovery: merge for %s is done; cleaning up", the_plan.snapshot_id)
        await cleanup(ctx, op, the_plan)
        return
    job = None
    if the_plan.method.live and op.step in JOB_STEPS:
        job = await ctx.hv.block_job_info(the_plan.domain, the_plan.target)
    if job is not None and job.kind != _JOB_KIND[the_plan.method]:
        await _give_up(ctx, op, the_plan, meta, f"a {job.kind} job that gasnap did not start "
                       f"runs on {the_plan.domain}/{the_plan.target}; left alone")
        return
    if job is None:
        await _give_up(ctx, op, the_plan, meta,
                       "interrupted: the merge did not finish; delete again to retry")
        return
    log.warning("recovery: resuming the block job of %s", the_plan.snapshot_id)
    try:
        async with ctx.hv.hold(_held(the_plan)):
            op = await _live_merge(ctx, op, the_plan, no_progress, started=True)
            await verify(ctx, the_plan)
    except Unavailable:
        raise  # libvirtd still away: the next sweep tries again
    except GasnapError as err:
        await _failed(ctx, op, the_plan, err)
        return
    await cleanup(ctx, op, the_plan)


async def _give_up(ctx: Context, op: Operation, the_plan: DeletePlan, meta: SnapshotMeta,
                   reason: str) -> None:
    """End OP without touching disks: error_deleting if the merge may have
    started (delete again to retry), the record as it was otherwise."""
    if meta.status is Status.DELETING:
        await _failed(ctx, op, the_plan, MergeFailed(reason))
    else:
        log.warning("recovery: delete of %s never started (%s)", the_plan.snapshot_id, reason)
        await ctx.journal.finish(op)
