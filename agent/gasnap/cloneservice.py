"""What the API offers for clones, over ``workflows.clone``.

Every clone operation holds the volumes it touches (the clone's id is its
volume id; a create also holds the source volume, so no merge changes the
image while it is read) and checks everything before it changes anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .errors import Conflict, Unavailable
from .hypervisor import DomainState
from .metadata import CloneMeta, CloneMode, CloneStatus, WrongStatus
from .tasks import Done, Task, TaskManager, Work
from .workflows import Context, clone, cloneplan
from .workflows.cloneplan import AttachRequest, CloneRequest


def clone_record(meta: CloneMeta) -> dict[str, Any]:
    return meta.to_dict()


class CloneService:
    def __init__(self, ctx: Context, tasks: TaskManager, ready: asyncio.Event) -> None:
        self.ctx = ctx
        self.tasks = tasks
        self.ready = ready  # the snapshot service's: set once recovery has run

    def _check_ready(self) -> None:
        if not self.ready.is_set():
            raise Unavailable("the agent is still recovering unfinished operations",
                              code="recovering")

    @asynccontextmanager
    async def _holding(self, kind: str, volumes: set[str]) -> AsyncIterator[Task]:
        """VOLUMES held for work done before the answer (attach, detach)."""
        self._check_ready()
        task = self.tasks.reserve(kind, volumes)
        try:
            yield task
        finally:
            self.tasks.drop(task)

    async def _start(self, task: Task, work: Work) -> Task:
        await self.tasks.start(task, work)
        return task

    def _reserve(self, kind: str, volumes: set[str]) -> Task:
        self._check_ready()
        return self.tasks.reserve(kind, volumes)

    # reading

    async def records(self, snapshot_id: str | None = None) -> list[dict[str, Any]]:
        return [clone_record(m) for m in await self.ctx.metadata.list_clones(snapshot_id)]

    async def record(self, clone_id: str) -> dict[str, Any]:
        return clone_record(await self.ctx.metadata.get_clone(clone_id))

    # creating

    async def create(self, request: CloneRequest) -> Task:
        source = await self.ctx.metadata.get_snapshot(request.snapshot_id)
        task = self._reserve("clone-create", {source.volume_id})
        try:
            planned = await cloneplan.plan_create(self.ctx, request)
        except BaseException:
            self.tasks.drop(task)
            raise

        async def work(task: Task) -> Done:
            async def progress(percent: int) -> None:
                if percent != task.progress:
                    await self.tasks.update(task, progress=percent)

            outcome = await clone.create(self.ctx, planned, progress)
            result = {"clone": clone_record(outcome.clone)} if outcome.clone else {
                "clone_id": planned.clone_id}
            return Done(result, outcome.failure)

        return await self._start(task, work)

    # attaching

    async def attach(self, clone_id: str, request: AttachRequest) -> dict[str, Any]:
        async with self._holding("clone-attach", {clone_id}):
            meta = await self.ctx.metadata.get_clone(clone_id)
            cloneplan.check_own_file(meta)
            cloneplan.check_available(meta)
            await cloneplan.check_detached(self.ctx, meta)
            planned = await cloneplan.plan_attach(self.ctx, clone_id, meta.file, request)
            return self._answer(await clone.attach(self.ctx, planned))

    async def detach(self, clone_id: str) -> dict[str, Any]:
        async with self._holding("clone-detach", {clone_id}):
            meta = await self.ctx.metadata.get_clone(clone_id)
            # Its snapshots are of the disk it is there: they are merged
            # through that domain, so they go first.
            await cloneplan.check_no_snapshots(self.ctx, meta)
            return self._answer(await clone.detach(self.ctx, meta))

    @staticmethod
    def _answer(outcome: clone.Outcome) -> dict[str, Any]:
        if outcome.failure is not None:
            raise outcome.failure
        assert outcome.clone is not None
        return {"clone": clone_record(outcome.clone)}

    # flattening and deleting

    async def flatten(self, clone_id: str) -> Task:
        task = self._reserve("clone-flatten", {clone_id})
        try:
            meta = await self.ctx.metadata.get_clone(clone_id)
            cloneplan.check_own_file(meta)
            cloneplan.check_available(meta)
            await cloneplan.check_no_snapshots(self.ctx, meta)
            live = await self._live_disk(meta) if meta.mode is CloneMode.LINKED else None
        except BaseException:
            self.tasks.drop(task)
            raise

        async def work(task: Task) -> Done:
            if meta.mode is CloneMode.FULL:
                return Done({"clone": clone_record(meta)})  # nothing to do

            async def progress(percent: int) -> None:
                if percent != task.progress:
                    await self.tasks.update(task, progress=percent)

            outcome = await clone.flatten(self.ctx, meta, live, progress)
            return Done({"clone": clone_record(outcome.clone or meta)}, outcome.failure)

        return await self._start(task, work)

    async def _live_disk(self, meta: CloneMeta) -> tuple[str, str, str] | None:
        """The running domain and disk target that read the clone, or None
        when no QEMU has it open (then qemu-img may rewrite it)."""
        if meta.attached_to is None:
            await cloneplan.check_detached(self.ctx, meta)  # nothing else may use it
            return None
        dom = await self.ctx.hv.get_domain(meta.attached_to.domain)
        if dom.state is DomainState.SHUTOFF:
            return None
        if dom.state not in (DomainState.RUNNING, DomainState.PAUSED):
            raise Conflict(f"{dom.name} is {dom.state.value}", code="domain_state")
        if meta.attached_to.readonly:
            # QEMU opened it read-only: no job may write it, nor qemu-img.
            raise cloneplan.CloneAttached(
                f"clone {meta.id} is attached read-only to {dom.name}, which runs; detach "
                "it to flatten it", domain=dom.name)
        found = await self.ctx.hv.disk_targets(dom.name)
        target = next((t for t, serial in found.items() if serial == meta.id), None)
        if target is None:
            raise Conflict(f"clone {meta.id} is recorded on {dom.name}, which does not have "
                           "it; detach it to settle the record", code="chain_mismatch")
        return dom.name, dom.uuid, target

    async def delete(self, clone_id: str) -> Task:
        task = self._reserve("clone-delete", {clone_id})
        try:
            meta = await self.ctx.metadata.get_clone(clone_id)
            if meta.status not in (CloneStatus.AVAILABLE, CloneStatus.ERROR):
                raise WrongStatus(f"clone {clone_id} is {meta.status.value}",
                                  current=meta.status.value)
            cloneplan.check_own_file(meta)
            await cloneplan.check_detached(self.ctx, meta)
            await cloneplan.check_no_snapshots(self.ctx, meta)
        except BaseException:
            self.tasks.drop(task)
            raise

        async def work(_task: Task) -> Done:
            outcome = await clone.delete(self.ctx, meta)
            return Done({"clone": clone_id, "removed": meta.file}, outcome.failure)

        return await self._start(task, work)

