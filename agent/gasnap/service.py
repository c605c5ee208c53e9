"""What the API offers, over the workflows: snapshot records, tasks, requests.

The contract's snapshot record is assembled here from the metadata service's
view: ``image`` is the point-in-time file (the overlay's backing file) and
``parent`` the previous snapshot of the same volume.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from .config import Schedule
from .errors import BadRequest, Conflict, GasnapError, Unavailable
from .hypervisor import Domain, Volume
from .metadata import NOVA_DESCRIPTION, CloneNotFound, SnapshotMeta, Status, check_limits
from .tasks import Done, Task, TaskManager, VolumeBusy
from .workflows import (
    Context,
    autodelete,
    create,
    createplan,
    delete,
    deleteplan,
    limits,
    manage,
    revert,
    revertplan,
    tree,
)
from .workflows import schedule as schedule_flow

log = logging.getLogger(__name__)


class SnapshotFailed(GasnapError):
    code = "snapshot_failed"


class ScheduleRunning(Conflict):
    code = "schedule_running"


def snapshot_record(meta: SnapshotMeta, memory_size: int | None = None) -> dict[str, Any]:
    return {
        "id": meta.id,
        "name": meta.name,
        "description": meta.description,
        "domain": meta.domain,
        "volume_id": meta.volume_id,
        "target": meta.target,
        "status": meta.status.value,
        "consistency": meta.consistency.value if meta.consistency else None,
        "file": meta.file,
        "image": meta.backing_file,
        "parent": meta.parent,
        "group_id": meta.group_id,
        "created_at": meta.created_at,
        "size": meta.size,
        "error": meta.error,
        "schedule": meta.schedule,
        "origin": meta.origin.value,
        "domain_state": meta.domain_state,
        "memory_file": meta.memory_file,
        "memory_size": memory_size,
    }


async def snapshot_records(metas: list[SnapshotMeta]) -> list[dict[str, Any]]:
    """The records of METAS, each with its memory file's size (read off the
    loop, and only for those that have one)."""
    sizes = await asyncio.to_thread(lambda: [_size(m.memory_file) for m in metas])
    return [snapshot_record(m, size) for m, size in zip(metas, sizes, strict=True)]


def _size(path: str | None) -> int | None:
    """The size of a file of this host (the memory file), or None."""
    try:
        return os.stat(path).st_size if path else None
    except OSError:
        return None


class SnapshotService:
    def __init__(self, ctx: Context, tasks: TaskManager) -> None:
        self.ctx = ctx
        self.tasks = tasks
        # Set once recovery has settled the journal: until then a new create
        # could collide with an unfinished one.
        self.ready = asyncio.Event()
        self._schedule_runs: dict[str, Task] = {}  # the last run of each schedule

    # reading

    async def records(self, *, domain: str | None = None, volume_id: str | None = None,
                      status: str | None = None, limit: int | None = None,
                      marker: str | None = None, parent: str | None = None,
                      roots: bool = False) -> list[dict[str, Any]]:
        """The records, oldest first; LIMIT and MARKER page through them."""
        try:
            wanted = Status(status) if status is not None else None
        except ValueError as err:
            raise BadRequest(f"unknown status {status!r}", code="invalid_status") from err
        metas = await self.ctx.metadata.list_snapshots(
            volume_id=volume_id, status=wanted, domain=domain, limit=limit, marker=marker,
            parent=parent, roots=roots)
        return await snapshot_records(metas)

    async def domain_records(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every domain (or NAME), guest agents probed, each volume with the
        snapshot its active layer descends from (``current``)."""
        if name is None:
            domains = await self.ctx.hv.list_domains(probe_agent=True)
        else:
            domains = [await self.ctx.hv.get_domain(name, probe_agent=True)]
        # Each volume's own records: the service may hold a whole fleet's.
        ids = sorted({vol.volume_id for dom in domains for vol in dom.volumes})
        listed = await asyncio.gather(*(self.ctx.metadata.list_snapshots(volume_id=v)
                                        for v in ids))
        by_volume = dict(zip(ids, listed, strict=True))
        records = []
        for dom in domains:
            record = dom.to_record()
            for vol, doc in zip(dom.volumes, record["volumes"], strict=True):
                found = tree.current(vol, by_volume.get(vol.volume_id, []))
                doc["current"] = found.id if found else None
            records.append(record)
        return records

    async def domains(self) -> list[Domain]:
        """Every domain with its disks (no guest agent is pinged)."""
        return await self.ctx.hv.list_domains()

    async def snapshot(self, snapshot_id: str) -> SnapshotMeta:
        """The metadata service's view of one snapshot."""
        return await self.ctx.metadata.get_snapshot(snapshot_id)

    async def record(self, snapshot_id: str) -> dict[str, Any]:
        return (await snapshot_records([await self.ctx.metadata.get_snapshot(snapshot_id)]))[0]

    async def rename(self, snapshot_id: str, name: str | None,
                     description: str | None) -> dict[str, Any]:
        if name is not None:
            createplan.check_name(name)
        if description is not None:
            createplan.check_caller_description(description)
            if (await self.ctx.metadata.get_snapshot(snapshot_id)).description == \
                    NOVA_DESCRIPTION and description != NOVA_DESCRIPTION:
                # It tells Cinder's snapshots apart (kept from auto-delete,
                # guarding the volume's active file): they keep it.
                raise BadRequest("the description of a snapshot Nova took is Cinder's; it "
                                 "is not changed", code="invalid_description")
        await self.ctx.metadata.update_snapshot_metadata(snapshot_id, name, description)
        return await self.record(snapshot_id)

    # managing existing layers

    async def manageable(self, volume_id: str) -> list[dict[str, Any]]:
        _, _, layers = await manage.layers(self.ctx, volume_id)
        return [layer.to_dict() for layer in layers]

    async def manage(self, volume_id: str, ref: str, name: str,
                     description: str) -> dict[str, Any]:
        """Held like any work on the volume: a create or delete meanwhile
        would change the chain the layer is found in."""
        self._check_ready()
        task = self.tasks.reserve("snapshot-manage", {volume_id})
        try:
            meta = await manage.manage(self.ctx, volume_id, ref, name, description)
        finally:
            self.tasks.drop(task)
        await limits.observe(self.ctx, [volume_id])
        return (await snapshot_records([meta]))[0]

    async def unmanage(self, snapshot_id: str) -> None:
        self._check_ready()
        meta = await self.ctx.metadata.get_snapshot(snapshot_id)
        task = self.tasks.reserve("snapshot-unmanage", {meta.volume_id})
        try:
            await manage.unmanage(self.ctx, snapshot_id)
        finally:
            self.tasks.drop(task)
        await limits.observe(self.ctx, [meta.volume_id])

    # limits

    async def volume_limits(self, volume_id: str) -> dict[str, Any]:
        """The limits in force on VOLUME_ID, which it sets itself (``own``),
        where its soft limits fall, and where it stands (``snapshots``;
        ``chain_depth`` when a domain of this host has it)."""
        vol = await self._volume_here(volume_id)
        metas = await self.ctx.metadata.list_snapshots(volume_id=volume_id)
        if vol is None and not metas:
            try:
                await self.ctx.metadata.get_clone(volume_id)
            except CloneNotFound:
                raise createplan.VolumeNotFound(f"no domain has volume {volume_id}, and no "
                                                "record names it", volume_id=volume_id) from None
        own = await self.ctx.metadata.get_volume_limits(volume_id)
        in_force = self.ctx.limits.under(own)
        return {**in_force.to_dict(),
                "own": [k for k, v in own.to_dict().items() if v is not None],
                "soft_snapshots": in_force.soft_snapshots,
                "soft_chain_depth": in_force.soft_depth,
                "snapshots": len(limits.counted(metas)),
                "chain_depth": len(vol.chain) if vol is not None else None}

    async def set_volume_limits(self, volume_id: str, change: dict[str, Any]) -> dict[str, Any]:
        """Set the limits CHANGE names (null: back to the default)."""
        check_limits(change)
        await self.volume_limits(volume_id)  # an unknown volume is 404
        await self.ctx.metadata.update_volume_limits(volume_id, change)
        await limits.observe(self.ctx, [volume_id])
        return await self.volume_limits(volume_id)

    async def _volume_here(self, volume_id: str) -> Volume | None:
        try:
            return (await manage.find_volume(self.ctx, volume_id))[1]
        except createplan.VolumeNotFound:
            return None

    # creating

    def _check_ready(self) -> None:
        if not self.ready.is_set():
            raise Unavailable("the agent is still recovering unfinished operations",
                              code="recovering")

    async def _created(self, planned: createplan.CreatePlan,
                       extra: dict[str, Any] | None = None) -> Done:
        """Run a planned create: its records as finalize answered them
        (parents included: no second read each), and why it failed, if it did."""
        outcome = await create.execute(self.ctx, planned)
        result = {**(extra or {}), "snapshots": await snapshot_records(outcome.snapshots)}
        if outcome.window:
            # Each phase of the freeze window, and the guest that took longest.
            result["window"] = outcome.window
        if planned.memory:
            # How long each guest stood still while its RAM was saved.
            result["pause_ms"] = {d: round(s * 1000, 1) for d, s in outcome.pauses.items()}
        if planned.warnings or outcome.warnings:
            result["warnings"] = [*planned.warnings, *outcome.warnings]
        if outcome.failure is not None:
            return Done(result, SnapshotFailed(outcome.failure.message,
                                               code=outcome.failure.code))
        failed = [m for m in outcome.snapshots if m.status is not Status.AVAILABLE]
        if failed:
            return Done(result, SnapshotFailed(
                f"{len(failed)} of {len(outcome.snapshots)} snapshots failed: "
                f"{failed[0].error}"))
        return Done(result)

    async def _trimmed(self, planned: createplan.CreatePlan, created: Done,
                       auto_delete: bool) -> Done:
        """After a create that succeeded: its volumes' auto-delete, whose
        merges and warnings join the result (``deleted``, ``warnings``)."""
        if created.error is None and auto_delete:
            trimmed = await autodelete.trim(self.ctx, planned.volumes,
                                            {v.snapshot_id for v in planned.volumes})
            result = dict(created.result or {})
            result["deleted"] = [*result.get("deleted", []), *trimmed.deleted]
            if trimmed.warnings:
                result["warnings"] = [*result.get("warnings", []), *trimmed.warnings]
            created = Done(result)
        await limits.observe(self.ctx, [v.volume_id for v in planned.volumes])
        return created

    async def _reserved_plan(self, kind: str, request: createplan.CreateRequest
                             ) -> tuple[Task, createplan.CreatePlan]:
        """Reserve the request's volumes, then plan it: a plan read before its
        volumes were held could name an active file that a finishing task
        replaces (an overlay then built on a stale image).  The first plan
        only names the volumes; the one returned is read under the hold."""
        self._check_ready()
        volumes = {v.volume_id for v in (await createplan.plan(self.ctx, request)).volumes}
        task = self.tasks.reserve(kind, volumes)
        try:
            planned = await self._plan_held(request, volumes)
        except BaseException:
            self.tasks.drop(task)
            raise
        return task, planned

    async def _plan_held(self, request: createplan.CreateRequest, volumes: set[str]
                         ) -> createplan.CreatePlan:
        """The plan read once VOLUMES are held (the one a create runs)."""
        planned = await createplan.plan(self.ctx, request)
        if {v.volume_id for v in planned.volumes} != volumes:
            raise Conflict("the domains' disks changed while the request was planned; "
                           "try again", code="domain_changed")
        await createplan.check_exclusive(self.ctx, planned)
        return planned

    async def create_queued(self, request: createplan.CreateRequest, wait: float,
                            recheck: Callable[[], Awaitable[None]] | None = None) -> Task:
        """Nova's create: what is wrong with the request is refused now; a
        busy volume (a schedule, a merge, a create still finalizing) is
        waited for, up to WAIT seconds, as Nova queues work on an instance.
        RECHECK: what the caller checked against the volume as it was, asked
        again once it is held (the work before may have changed it)."""
        self._check_ready()
        volumes = {v.volume_id for v in (await createplan.plan(self.ctx, request)).volumes}
        task = self.tasks.queue("snapshot-create")

        async def work(task: Task) -> Done:
            await self.tasks.hold(task, volumes, wait)
            if recheck is not None:
                await recheck()
            planned = await self._plan_held(request, volumes)
            return await self._trimmed(planned, await self._created(planned),
                                       request.auto_delete)

        await self.tasks.start(task, work)
        return task

    async def create(self, request: createplan.CreateRequest) -> Task:
        """Validate now (errors reach the caller), then run as a task."""
        task, planned = await self._reserved_plan("snapshot-create", request)

        async def work(_task: Task) -> Done:
            return await self._trimmed(planned, await self._created(planned),
                                       request.auto_delete)

        await self.tasks.start(task, work)
        return task

    # schedules

    async def run_schedule(self, schedule: Schedule) -> Task:
        """One group snapshot of the schedule's domains, then its retention.
        Refused while the schedule's previous run is still going."""
        self._check_ready()
        previous = self._schedule_runs.get(schedule.name)
        if previous is not None and not previous.finished:
            raise ScheduleRunning(f"schedule {schedule.name} is still running "
                                  f"(task {previous.id}); try again when it ends",
                                  task=previous.id)
        task, planned = await self._reserved_plan("schedule-run",
                                                   schedule_flow.request(schedule))
        volumes = {v.volume_id for v in planned.volumes}
        self._schedule_runs[schedule.name] = task

        async def work(task: Task) -> Done:
            created = await self._created(planned, {"schedule": schedule.name})
            if created.error is not None:
                return created  # no retention after a failed snapshot
            await self.tasks.update(task, progress=50)

            async def progress(percent: int) -> None:
                await self.tasks.update(task, progress=percent)

            retained = await schedule_flow.retain(self.ctx, schedule, volumes, progress)
            result = {**(created.result or {}), "deleted": retained.deleted}
            if retained.failure is not None:
                return Done(result, SnapshotFailed(
                    f"retention of schedule {schedule.name} failed: "
                    f"{retained.failure.message}", code="retention_failed"))
            return await self._trimmed(planned, Done(result), auto_delete=True)

        await self.tasks.start(task, work)
        return task

    # reverting

    async def revert(self, snapshot_id: str, scope: revertplan.Scope, *, force: bool,
                     start: bool | None) -> Task:
        """Plan under a reservation of every volume going back, and of every
        other disk of their domains (the revert stops and starts them), so
        the plan stays true; then run as a task."""
        self._check_ready()
        first = await revertplan.plan(self.ctx, snapshot_id, scope, force=force, start=start)
        task = self.tasks.reserve("snapshot-revert", first.holds)
        try:
            planned = await revertplan.plan(self.ctx, snapshot_id, scope, force=force,
                                            start=start)
            if planned.holds != task.volumes:
                raise Conflict("the snapshot's group or its domains' disks changed while the "
                               "revert was planned; try again", code="domain_changed")
        except BaseException:
            self.tasks.drop(task)
            raise

        async def work(_task: Task) -> Done:
            outcome = await revert.execute(self.ctx, planned)
            result = {"reverted": [v.snapshot_id for v in planned.volumes],
                      "before": [m.id for m in outcome.before],
                      "domains": planned.domains, "phases": outcome.phases,
                      "thawed": outcome.thawed}
            return Done(result, outcome.failure)

        await self.tasks.start(task, work)
        return task

    # deleting

    async def delete(self, snapshot_id: str, strategy: deleteplan.Strategy, *,
                     force: bool = False) -> Task:
        """gasnap's own delete.  A snapshot Cinder keeps (taken through
        Nova) is Cinder's to delete: deleted here, Cinder's record and its
        ``.info`` would name files gone (FORCE: the operator knows)."""
        self._check_ready()
        meta = await self.ctx.metadata.get_snapshot(snapshot_id)
        if meta.description == NOVA_DESCRIPTION and not force:
            raise limits.CinderVolume(
                f"snapshot {snapshot_id} is Cinder's (taken through Nova): delete it through "
                "Cinder, or force", volume_id=meta.volume_id)
        # Hold the volume before reading its chain, so the plan stays true.
        task = self.tasks.reserve("snapshot-delete", {meta.volume_id})
        try:
            merge = await deleteplan.plan(self.ctx, snapshot_id, strategy)
        except BaseException:
            self.tasks.drop(task)
            raise

        async def work(task: Task) -> Done:
            return await self._deleted(task, merge)

        await self.tasks.start(task, work)
        return task

    async def delete_queued(self, snapshot_id: str,
                            choose: Callable[[], Awaitable[deleteplan.Strategy]],
                            wait: float) -> Task:
        """Nova's delete: an unknown snapshot is refused now; a busy volume
        (the snapshot's own create still finalizing, a schedule, a merge) is
        waited for, up to WAIT seconds.  CHOOSE checks the request against
        the record and the chain once the volume is held, and names the
        strategy."""
        self._check_ready()
        meta = await self.ctx.metadata.get_snapshot(snapshot_id)
        try:
            task = self.tasks.reserve("snapshot-delete", {meta.volume_id})
        except VolumeBusy:
            task = self.tasks.queue("snapshot-delete")

            async def queued(task: Task) -> Done:
                await self.tasks.hold(task, {meta.volume_id}, wait)
                merge = await deleteplan.plan(self.ctx, snapshot_id, await choose())
                return await self._deleted(task, merge)

            await self.tasks.start(task, queued)
            return task
        # A free volume is planned now, as gasnap's own delete is: what would
        # refuse it (a linked clone reading its files, a dependent) reaches
        # Cinder as the call's answer, not as a task failed after a 202.
        try:
            merge = await deleteplan.plan(self.ctx, snapshot_id, await choose())
        except BaseException:
            self.tasks.drop(task)
            raise

        async def work(task: Task) -> Done:
            return await self._deleted(task, merge)

        await self.tasks.start(task, work)
        return task

    async def _deleted(self, task: Task, merge: deleteplan.DeletePlan) -> Done:
        async def progress(percent: int) -> None:
            if percent != task.progress:
                await self.tasks.update(task, progress=percent)

        outcome = await delete.execute(self.ctx, merge, progress)
        await limits.observe(self.ctx, [merge.volume_id])
        if outcome.failure is not None:
            return Done(None, outcome.failure)
        return Done({"snapshot": merge.snapshot_id, "strategy": merge.method.value,
                     "merged_bytes": merge.moved_bytes, "removed": merge.remove})
