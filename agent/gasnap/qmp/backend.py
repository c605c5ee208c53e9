"""``gasnap.hypervisor.Hypervisor`` on bare QEMU, over QMP (``hypervisor = "qmp"``).

A domain is a running QEMU with ``RUN_DIR/NAME.qmp`` (and ``NAME.qga`` for
its guest agent).  Disks, serials and chains come from QEMU itself
(``monitor``).  With no libvirt in between, a create does what libvirt's
snapshot call does in two halves, and only the second runs in the freeze
window:

  staging (before the freeze): ``blockdev-add`` of each overlay, qcow2
      named, with no backing (the header's relative pointer stays as
      qemu-img wrote it)
  switch (frozen): one ``transaction`` of ``blockdev-snapshot`` for every
      disk of the domain: all switch, or none
  leaving staging: ``blockdev-del`` of every added node that did not
      become active

A delete is ``block-commit`` (``job-complete`` is the pivot) or
``block-stream``, each with a job id that names the disk and the kind
(``gasnap-vda-commit``), followed through ``BLOCK_JOB_*`` events on the
domain's session with the same bounded check as on libvirt.  Once a job
has completed, the nodes it left out of every chain are deleted, so QEMU
does not keep the merged files open.

QEMU alone keeps no definition of a stopped guest, no saved RAM to start
from and no device model for disks gasnap would plug in: ``unsupported``
names those features, and plans refuse them with 501.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import images
from ..blockjobs import (
    CANCELED,
    COMPLETED,
    FAILED,
    READY,
    BlockJobEvents,
    JobEnd,
    JobInfo,
    PivotNotReady,
    Progress,
    follow,
)
from ..errors import NotSupported
from ..freezeguard import FreezeGuard, GuardedChannel
from ..guestagent import AgentAbsent, GuestAgent, GuestAgentError
from ..hypervisor import AgentState, Domain, DomainChanged, Feature, Layer
from .graph import PROTOCOL_SUFFIX, disks, format_nodes
from .monitor import (
    QmpDomainNotFound,
    QmpError,
    QmpUnavailable,
    Session,
    Sessions,
    read_domain,
)
from .qga import QgaChannel

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = Path("/run/gasnap/qemu")

_UNSUPPORTED = {
    Feature.MEMORY: "QEMU alone keeps no saved RAM that a revert could start from "
                    "(the qmp backend snapshots disks only)",
    Feature.OFFLINE: "a stopped bare QEMU guest has no definition gasnap could change "
                     "or start (the qmp backend acts on running QEMU processes only)",
    Feature.HOTPLUG: "plugging a disk into a bare QEMU guest is left to whatever "
                     "started it (the qmp backend attaches no disks)",
}
_KINDS = ("active-commit", "commit", "pull")


def job_id(target: str, kind: str) -> str:
    return f"gasnap-{target}-{kind}"


def _job_target(job: str) -> tuple[str, str] | None:
    """(target, kind) of a job gasnap started; None for anybody else's."""
    if not job.startswith("gasnap-"):
        return None
    for kind in _KINDS:
        if job.endswith(f"-{kind}"):
            return job[len("gasnap-"):-len(kind) - 1], kind
    return None


NODE_PREFIX = "gasnap-"


def node_name(path: str) -> str:
    """An overlay's node: QEMU's names are at most 31 characters."""
    return NODE_PREFIX + hashlib.sha256(path.encode()).hexdigest()[:20]


@dataclass
class _Staged:
    roots: dict[str, str]  # target -> the node the overlay goes on top of
    added: dict[str, str]  # target -> the overlay's node


class QmpHypervisor:
    """``gasnap.hypervisor.Hypervisor`` on bare QEMU processes."""

    def __init__(self, run_dir: Path = DEFAULT_RUN_DIR) -> None:
        self.run_dir = run_dir
        self.block_events = BlockJobEvents()
        self.sessions = Sessions(run_dir, self._on_event)
        self.qga = QgaChannel(run_dir)
        self.agent = GuestAgent(self.qga)
        # Per domain: the creates between staging and switch (each on its
        # own disks; several may wait for one domain's window at once).
        self._staged: dict[str, list[_Staged]] = {}
        self._held: dict[str, str] = {}  # name -> UUID while a hold runs
        self._cleanups: set[asyncio.Task[None]] = set()
        # (domain, target) -> the files of the chain a merge started on: its
        # leftovers are the nodes of those the chain no longer holds.
        self._merging: dict[tuple[str, str], set[str]] = {}

    # connection

    async def connect(self) -> None:
        """Nothing to reach ahead: each domain has its own socket."""

    async def close(self) -> None:
        for task in list(self._cleanups):
            task.cancel()
        await asyncio.gather(*self._cleanups, return_exceptions=True)
        await self.sessions.close()

    @property
    def connected(self) -> bool:
        return True  # no daemon in between to lose

    async def reachable(self) -> None:
        return  # each QEMU answers for itself, or its domain is gone

    def unsupported(self, feature: Feature) -> str | None:
        return _UNSUPPORTED.get(feature)

    def guarded_by(self, guard: FreezeGuard) -> None:
        """Send guest-agent commands for the guests GUARD holds armed
        through the guard, on the connection it keeps to each (qemu-ga
        serves one client, and a freeze window must not reconnect)."""
        self.agent = GuestAgent(GuardedChannel(self.qga, guard))

    # domains

    async def domain_names(self) -> list[str]:
        def names() -> list[str]:
            if not self.run_dir.is_dir():
                return []
            return sorted(p.stem for p in self.run_dir.glob("*.qmp") if p.is_socket())

        return await asyncio.to_thread(names)

    async def list_domains(self, *, probe_agent: bool = False) -> list[Domain]:
        found = await asyncio.gather(*(self._domain_or_none(n, probe_agent)
                                       for n in await self.domain_names()))
        return [d for d in found if d is not None]

    async def _domain_or_none(self, name: str, probe: bool) -> Domain | None:
        try:
            return await self.get_domain(name, probe_agent=probe)
        except QmpDomainNotFound:
            return None  # gone between listing and reading

    async def get_domain(self, name: str, *, probe_agent: bool = False,
                         uuid: str | None = None) -> Domain:
        dom = await self._read(name)
        if uuid is not None and dom.uuid != uuid:
            # Another QEMU answers on that name now: find the planned one.
            for other in await self.list_domains():
                if other.uuid == uuid:
                    dom = other
                    break
            else:
                raise QmpDomainNotFound(f"no domain with UUID {uuid} (was {name})")
        if probe_agent and dom.guest_agent is AgentState.CONNECTED:
            dom = await self._probe(dom)
        return dom

    async def _read(self, name: str) -> Domain:
        async with self.sessions.using(name) as qmp:
            return await read_domain(qmp, name, self.run_dir / f"{name}.qga")

    async def _probe(self, dom: Domain) -> Domain:
        try:
            await self.agent.ping(dom.name)
            return dom
        except AgentAbsent:
            state = AgentState.ABSENT
        except GuestAgentError:
            state = AgentState.UNRESPONSIVE
        return Domain(dom.name, dom.uuid, dom.state, state, dom.volumes, dom.memory)

    async def files_in_use(self, *, besides: frozenset[str] = frozenset()) -> set[str]:
        paths = [layer.path for dom in await self.list_domains() if dom.uuid not in besides
                 for vol in dom.volumes for layer in vol.chain]
        return await asyncio.to_thread(lambda: {os.path.realpath(p) for p in paths})

    async def disk_targets(self, name: str) -> dict[str, str | None]:
        dom = await self._read(name)
        return {vol.target: vol.serial for vol in dom.volumes}

    # held domains

    @contextlib.asynccontextmanager
    async def hold(self, domains: dict[str, str]) -> AsyncIterator[None]:
        """Each domain's session stays open while the block runs (the
        window's calls need no connect, and job events keep arriving), and
        a name whose QEMU is not the planned one is refused."""
        async with contextlib.AsyncExitStack() as stack:
            for name, uuid in sorted(domains.items()):
                qmp = await stack.enter_async_context(self.sessions.using(name))
                found = (await qmp.call("query-uuid"))["UUID"]
                if found != uuid:
                    raise DomainChanged(f"domain {name} is {found} now, not {uuid} as planned")
            yield

    # switching overlays

    @contextlib.asynccontextmanager
    async def staging(self, name: str, overlays: dict[str, str]) -> AsyncIterator[None]:
        async with self.sessions.using(name) as qmp:
            top = {target: disk.root for target, disk in (await disks(qmp)).items()}
            staged = _Staged({t: top[t] for t in overlays if t in top}, {})
            self._staged.setdefault(name, []).append(staged)
            try:
                for target, path in overlays.items():
                    node = node_name(path)
                    await qmp.call("blockdev-add", {
                        "driver": "qcow2", "node-name": node, "backing": None,
                        "file": {"driver": "file", "filename": path,
                                 "node-name": f"{node}{PROTOCOL_SUFFIX}"}})
                    staged.added[target] = node
                yield
            finally:
                self._staged[name].remove(staged)
                if not self._staged[name]:
                    del self._staged[name]
                await self._unstage(qmp, staged)

    async def _unstage(self, qmp: Session, staged: _Staged) -> None:
        try:
            active = {disk.root for disk in (await disks(qmp)).values()}
        except QmpError as err:
            log.warning("%s: cannot tell which overlays became active (%s); their nodes "
                        "stay open", qmp.name, err.message)
            return
        for node in staged.added.values():
            if node not in active:
                await _delete_node(qmp, node)

    async def switch_overlays(self, name: str, overlays: dict[str, str],
                              others: list[str], memory: str | None = None) -> float | None:
        """One transaction: every disk of OVERLAYS switches, or none does.
        OTHERS need nothing: QEMU touches only the disks it is told of."""
        if memory is not None:
            raise NotSupported(_UNSUPPORTED[Feature.MEMORY])
        staged = next((s for s in self._staged.get(name, [])
                       if set(s.added) == set(overlays)), None)
        if staged is None:
            raise QmpError(f"{name}: overlays {sorted(overlays)} were not staged before "
                           "the freeze")
        actions = [{"type": "blockdev-snapshot",
                    "data": {"node": staged.roots[t], "overlay": staged.added[t]}}
                   for t in sorted(overlays)]
        async with self.sessions.using(name) as qmp:
            await qmp.call("transaction", {"actions": actions})
        return None

    # what QEMU alone cannot do

    async def restore(self, name: str, memory: str, overlays: dict[str, str], *,
                      paused: bool) -> None:
        raise NotSupported(_UNSUPPORTED[Feature.MEMORY])

    async def define_overlays(self, name: str, overlays: dict[str, str]) -> None:
        raise NotSupported(_UNSUPPORTED[Feature.OFFLINE])

    async def define_disk_source(self, name: str, target: str, path: str, fmt: str) -> None:
        raise NotSupported(_UNSUPPORTED[Feature.OFFLINE])

    async def start(self, name: str) -> None:
        raise NotSupported(_UNSUPPORTED[Feature.OFFLINE])

    async def shutdown(self, name: str, *, agent: bool) -> None:
        raise NotSupported(_UNSUPPORTED[Feature.OFFLINE])

    async def destroy(self, name: str) -> None:
        raise NotSupported(_UNSUPPORTED[Feature.OFFLINE])

    async def attach_disk(self, name: str, path: str, target: str, serial: str, *,
                          readonly: bool) -> None:
        raise NotSupported(_UNSUPPORTED[Feature.HOTPLUG])

    async def detach_disk(self, name: str, serial: str, *, timeout: float) -> None:
        raise NotSupported(_UNSUPPORTED[Feature.HOTPLUG])

    # block jobs

    async def block_commit(self, name: str, target: str, top: str, base: str, *,
                           active: bool, bandwidth: int = 0) -> None:
        """Commit TOP into BASE by node; an inner commit writes BASE's
        relative name into the layer above TOP."""
        kind = "active-commit" if active else "commit"
        async with self.sessions.using(name) as qmp:
            root, chain = await _root_of(qmp, target)
            nodes = await format_nodes(qmp)
            paths = [layer.path for layer in chain]
            args = {"job-id": job_id(target, kind), "device": root,
                    "top-node": _node(nodes, chain, top), "base-node": _node(nodes, chain, base),
                    "speed": bandwidth << 20}
            if not active:
                above = paths[paths.index(top) - 1]
                args["backing-file"] = images.relative_pointer(above, base)
            self.block_events.forget(name, target)
            self._merging[(name, target)] = set(paths)
            await qmp.call("block-commit", args)

    async def block_pull(self, name: str, target: str, base: str | None, *,
                         bandwidth: int = 0) -> None:
        async with self.sessions.using(name) as qmp:
            root, chain = await _root_of(qmp, target)
            args: dict[str, Any] = {"job-id": job_id(target, "pull"), "device": root,
                                       "speed": bandwidth << 20}
            if base is not None:
                args["base-node"] = _node(await format_nodes(qmp), chain, base)
                args["backing-file"] = images.relative_pointer(chain[0].path, base)
            self.block_events.forget(name, target)
            self._merging[(name, target)] = {layer.path for layer in chain}
            await qmp.call("block-stream", args)

    async def block_job_info(self, name: str, target: str) -> JobInfo | None:
        job = await self._job(name, target)
        if job is None:
            return None
        kind = _job_target(str(job["device"]))
        return JobInfo(int(job["offset"]), int(job["len"]), kind[1] if kind else "other")

    async def _job(self, name: str, target: str) -> dict[str, Any] | None:
        async with self.sessions.using(name) as qmp:
            for job in await qmp.call("query-block-jobs"):
                found = _job_target(str(job["device"]))
                if found is not None and found[0] == target:
                    return dict(job)
        return None

    async def pivot(self, name: str, target: str) -> None:
        """Finish a ready active commit: BASE becomes the active layer."""
        job = await self._job(name, target)
        if job is None or not job.get("ready"):
            raise PivotNotReady(f"{name}/{target}: no active commit ready to pivot")
        async with self.sessions.using(name) as qmp:
            try:
                await qmp.call("job-complete", {"id": str(job["device"])})
            except QmpError as err:
                raise PivotNotReady(f"{name}/{target}: {err.message}") from err

    async def cancel_block_job(self, name: str, target: str) -> None:
        job = await self._job(name, target)
        if job is None:
            return
        async with self.sessions.using(name) as qmp:
            await qmp.call("block-job-cancel", {"device": str(job["device"])})

    async def follow_block_job(self, name: str, target: str, *, want_ready: bool,
                               progress: Progress) -> JobEnd:
        """Events first (the session stays open meanwhile), a check every
        few seconds second; QEMU gone mid-job is QmpUnavailable or NotFound,
        and the caller hands the merge on."""

        async def ready() -> bool:
            job = await self._job(name, target)
            return bool(job and job.get("ready"))

        async with self.sessions.using(name):
            end = await follow(self.block_events, name, target,
                               check=lambda: self.block_job_info(name, target),
                               mirror_ready=ready, progress=progress, want_ready=want_ready)
            if end is JobEnd.GONE:
                # Ended while nobody listened (the agent restarted): its
                # event, and the clean-up it starts, never came.
                await self._drop_unused(name, target)
            return end

    # events (on the loop, from a session's pump)

    def _on_event(self, name: str, event: str, data: dict[str, object]) -> None:
        found = _job_target(str(data.get("device", "")))
        if found is None:
            return
        target = found[0]
        if event == "BLOCK_JOB_ERROR":
            log.warning("%s/%s: I/O error in the block job (%s)", name, target,
                        data.get("operation"))
            return
        if event == "BLOCK_JOB_READY":
            self.block_events.on_event(name, target, READY)
        elif event == "BLOCK_JOB_CANCELLED":
            self.block_events.on_event(name, target, CANCELED)
        elif event == "BLOCK_JOB_COMPLETED":
            failed = "error" in data
            self.block_events.on_event(name, target, FAILED if failed else COMPLETED)
            if not failed:
                task = asyncio.get_running_loop().create_task(self._drop_unused(name, target))
                self._cleanups.add(task)
                task.add_done_callback(self._cleanups.discard)

    async def _drop_unused(self, name: str, target: str) -> None:
        """Delete the nodes of the files a merge on TARGET took out of its
        chain (the monitor holds a reference to each node it added, and QEMU
        keeps the file open until it goes).  Only those: a node somebody
        else added is theirs.  A merge this process did not start (followed
        after a restart) leaves only gasnap's own overlays to look at."""
        merged = self._merging.pop((name, target), None)
        staged = {n for each in self._staged.values() for s in each for n in s.added.values()}
        try:
            async with self.sessions.using(name) as qmp:
                used = {layer.path for disk in (await disks(qmp)).values()
                        for layer in disk.chain}
                unused = [node for (path, _), node in (await format_nodes(qmp)).items()
                          if path not in used
                          and node.removesuffix(PROTOCOL_SUFFIX) not in staged
                          and (path in merged if merged is not None
                               else node.startswith(NODE_PREFIX))]
                for _ in range(2):  # a protocol node is free once its format node went
                    unused = [n for n in unused if not await _delete_node(qmp, n, quiet=True)]
        except (QmpDomainNotFound, QmpUnavailable) as err:
            log.warning("%s: merged nodes not deleted: %s", name, err.message)


async def _root_of(qmp: Session, target: str) -> tuple[str, tuple[Layer, ...]]:
    found = (await disks(qmp)).get(target)
    if found is None:
        raise QmpError(f"{qmp.name} has no disk {target}")
    return found.root, found.chain


def _node(nodes: dict[tuple[str, str], str], chain: tuple[Layer, ...], path: str) -> str:
    for layer in chain:
        node = nodes.get((path, layer.format)) if layer.path == path else None
        if node is not None:
            return node
    raise QmpError(f"no block node opens {path} in the chain")


async def _delete_node(qmp: Session, node: str, *, quiet: bool = False) -> bool:
    try:
        await qmp.call("blockdev-del", {"node-name": node})
        return True
    except QmpError as err:
        if not quiet:
            log.warning("%s: node %s stays open: %s", qmp.name, node, err.message)
        return False
