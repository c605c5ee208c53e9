"""``gasnap.hypervisor.Hypervisor`` on libvirt: domains, disks, chains, jobs.

Reads domains and their chains (formats from the XML, never guessed),
switches overlays, runs and follows block jobs.  Everything goes through the
one ``Connection``; the guest agent is reached through libvirt's channel
(``virt.agent``).  Domains taking part in an operation are held by UUID, so
a rename or a replacement between plan and action is refused, never acted on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import libvirt

from .. import domxml, images, metrics
from ..blockjobs import BlockJobEvents, JobEnd, JobInfo, PivotNotReady, Progress, follow
from ..errors import GasnapError
from ..guestagent import AgentAbsent, GuestAgent, GuestAgentError
from ..hypervisor import (
    AgentState,
    DetachTimeout,
    Domain,
    DomainState,
    Feature,
    Layer,
    Volume,
)
from .agent import AgentChannel
from .connection import (
    Connection,
    DomainChanged,
    DomainNotFound,
    LibvirtUnavailable,
    VirtError,
    map_error,
)

log = logging.getLogger(__name__)

OUTAGE_WAIT = 120.0  # how long a block job's follower waits for libvirtd to return
OUTAGE_POLL = 0.5  # between two tries to reach a libvirtd that went away

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: DomainState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PMSUSPENDED,
}

_JOB_KINDS = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "pull",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "copy",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active-commit",
}


_IO_ACTIONS = {
    libvirt.VIR_DOMAIN_EVENT_IO_ERROR_PAUSE: "paused",
    libvirt.VIR_DOMAIN_EVENT_IO_ERROR_REPORT: "told",
    libvirt.VIR_DOMAIN_EVENT_IO_ERROR_NONE: "not told",
}


def _map_job_error(err: libvirt.libvirtError, what: str) -> GasnapError:
    if err.get_error_code() in (libvirt.VIR_ERR_BLOCK_COPY_ACTIVE,
                                libvirt.VIR_ERR_OPERATION_INVALID):
        return PivotNotReady(f"{what}: {err.get_error_message()}")
    return map_error(err, what)


@dataclass
class _Held:
    """A domain held by ``hold``: its handle is valid on CONN only."""

    uuid: str
    conn: libvirt.virConnect
    dom: libvirt.virDomain
    holders: int = 0


class LibvirtHypervisor:
    """``gasnap.hypervisor.Hypervisor`` on top of libvirt."""

    def __init__(self, uri: str, *, outage_wait: float = OUTAGE_WAIT) -> None:
        self.uri = uri
        self.outage_wait = outage_wait
        self.connection = Connection(uri, on_open=self._register_events)
        self.block_events = BlockJobEvents()
        self._held: dict[str, _Held] = {}  # by name; read from worker threads
        # One change of a persistent definition at a time per domain: a
        # read-modify-write (the offline switch) and a device change (a
        # clone's attach) at once would lose one of the two (REVIEW-2 item 15).
        self._definitions: collections.defaultdict[str, asyncio.Lock] = \
            collections.defaultdict(asyncio.Lock)
        self.agent_channel = AgentChannel(self.connection, self.resolve)
        self.agent = GuestAgent(self.agent_channel)

    # connection

    async def connect(self) -> None:
        await self.connection.connect()

    async def close(self) -> None:
        await self.connection.close()

    @property
    def connected(self) -> bool:
        return self.connection.connected

    async def reachable(self) -> None:
        deadline = time.monotonic() + self.outage_wait
        while True:
            try:
                await self.connection.call(lambda c: c.getLibVersion(), what="libvirtd")
                return
            except LibvirtUnavailable:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(OUTAGE_POLL)

    def _register_events(self, conn: libvirt.virConnect) -> None:
        conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job, None
        )
        conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON, self._on_io_error, None
        )

    def _on_block_job(self, _conn: libvirt.virConnect, dom: libvirt.virDomain, disk: str,
                      _type: int, status: int, _opaque: object) -> None:
        self.block_events.on_event(dom.name(), disk, status)

    def _on_io_error(self, _conn: libvirt.virConnect, dom: libvirt.virDomain, path: str,
                     _alias: str, action: int, reason: str, _opaque: object) -> None:
        # QEMU stops the guest on ENOSPC (libvirt's default error policy):
        # nothing gasnap does can finish there until space is freed.
        metrics.DOMAIN_IO_ERRORS.labels(dom.name(), reason or "unknown").inc()
        what = _IO_ACTIONS.get(action, "reported")
        log.warning("%s: I/O error on %s (%s); the guest is %s", dom.name(), path,
                    reason or "unknown", what)

    # held domains

    @contextlib.asynccontextmanager
    async def hold(self, domains: dict[str, str]) -> AsyncIterator[None]:
        """Keep DOMAINS (name -> UUID, as planned) resolved while the block
        runs: calls on them use the handle found here, by UUID, instead of a
        lookup by name each (a freeze window makes three, each a round trip
        to libvirtd with the guest frozen), and a name that no longer belongs
        to the planned domain is refused (DomainChanged), never acted on."""
        taken: list[str] = []
        try:
            for name, uuid in domains.items():
                await self._hold(name, uuid)
                taken.append(name)
            yield
        finally:
            for name in taken:
                held = self._held[name]
                held.holders -= 1
                if not held.holders:
                    del self._held[name]

    async def _hold(self, name: str, uuid: str) -> None:
        if name not in self._held:
            def find(c: libvirt.virConnect) -> tuple[libvirt.virConnect, libvirt.virDomain]:
                return c, _by_uuid(c, name, uuid)

            try:
                conn, dom = await self.connection.call(find, what=f"domain {name}")
            except LibvirtUnavailable:
                # Before any window: a libvirtd restarting (an upgrade) is waited out.
                await self.reachable()
                conn, dom = await self.connection.call(find, what=f"domain {name}")
            self._held.setdefault(name, _Held(uuid, conn, dom))
        held = self._held[name]
        if held.uuid != uuid:
            raise DomainChanged(f"domain {name} is {held.uuid} for another operation, "
                                f"not {uuid} as planned")
        held.holders += 1

    def resolve(self, conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
        """NAME's handle, in a worker thread: the held one, else by name."""
        held = self._held.get(name)
        if held is None:
            return conn.lookupByName(name)
        if held.conn is conn:
            return held.dom
        return _by_uuid(conn, name, held.uuid)  # reconnected since the hold

    # domains

    async def list_domains(self, *, probe_agent: bool = False) -> list[Domain]:
        names = await self.domain_names()
        found = await asyncio.gather(*(self._domain_or_none(n, probe_agent) for n in names))
        return sorted((d for d in found if d is not None), key=lambda d: d.name)

    async def _domain_or_none(self, name: str, probe_agent: bool) -> Domain | None:
        try:
            return await self.get_domain(name, probe_agent=probe_agent)
        except DomainNotFound:
            return None  # undefined between listing and reading

    async def get_domain(self, name: str, *, probe_agent: bool = False,
                         uuid: str | None = None) -> Domain:
        found, found_uuid, state, xml = await self.connection.call(_read_domain, name, uuid,
                                                        what=f"domain {name}")
        specs = domxml.disks(xml)
        volumes = await asyncio.gather(*(self._volume(found, spec) for spec in specs))
        agent = await self._agent_state(found, state, xml, probe_agent)
        return Domain(found, found_uuid, state, agent, tuple(volumes), domxml.memory(xml))

    async def files_in_use(self, *, besides: frozenset[str] = frozenset()) -> set[str]:
        """The real path of every layer of every disk of every domain (but
        those whose UUID is in BESIDES), in its running and its persistent
        definition alike."""
        paths: list[str] = []
        for xml in await self.connection.call(_all_definitions, besides, what="domains' disks"):
            for spec in domxml.disks(xml):
                chain = spec.chain
                if not spec.chain_complete and spec.source_type == "file" and chain[0].path:
                    chain, _ = await _read_chain(chain)
                paths.extend(layer.path for layer in chain if layer.path)
        return await asyncio.to_thread(lambda: {os.path.realpath(p) for p in paths})

    async def domain_xml(self, name: str, *, inactive: bool = False) -> str:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return await self.connection.call(
            lambda c: self.resolve(c, name).XMLDesc(flags), what=f"domain {name} XML"
        )

    async def _volume(self, domain: str, spec: domxml.DiskSpec) -> Volume:
        chain, error = spec.chain, None
        if not spec.chain_complete and spec.source_type == "file" and chain[0].path:
            chain, error = await _read_chain(chain)
        if spec.source_type == "file" and error is None:
            error = await asyncio.to_thread(images.chain_problem, chain)
        return Volume(domxml.volume_id(domain, spec), spec.target, spec.serial,
                      spec.source_type, chain, chain_error=error, shareable=spec.shareable,
                      readonly=spec.readonly)

    # guest agent

    async def _agent_state(self, name: str, state: DomainState, xml: str,
                           probe: bool) -> AgentState:
        channel = domxml.agent_channel(xml)
        live = state in (DomainState.RUNNING, DomainState.PAUSED)
        if not (channel.present and channel.connected and live):
            return AgentState.ABSENT
        if state is DomainState.PAUSED:
            return AgentState.UNRESPONSIVE  # the vCPUs that would answer are stopped
        if not probe:
            return AgentState.CONNECTED  # as far as the channel tells
        try:
            await self.agent.ping(name)
        except AgentAbsent:
            return AgentState.ABSENT
        except GuestAgentError:
            return AgentState.UNRESPONSIVE
        return AgentState.CONNECTED

    # switching overlays

    def unsupported(self, feature: Feature) -> str | None:
        return None  # libvirt does all of it

    @contextlib.asynccontextmanager
    async def staging(self, name: str, overlays: dict[str, str]) -> AsyncIterator[None]:
        """Nothing to do ahead: libvirt opens the overlays in its snapshot call."""
        yield

    async def switch_overlays(self, name: str, overlays: dict[str, str],
                              others: list[str], memory: str | None = None) -> float | None:
        """Make each pre-created overlay the active layer of its disk, all
        disks of the domain at once (ATOMIC), without libvirt metadata.  OTHERS
        are named ``snapshot='no'``: a disk left out would get an overlay of
        libvirt's choosing.  MEMORY: the RAM and device state go to that file
        in the same instant, the guest running meanwhile (LIVE) but for the
        final stop-and-copy; the seconds it stood still are returned."""
        flags = (
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        )
        if memory is None:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY

        # Built before the call: the guest is frozen while it runs, and reading
        # the definition here cost an XMLDesc inside the freeze window.
        xml = domxml.snapshot_xml(overlays, [*overlays, *others], memory)

        def run(conn: libvirt.virConnect) -> float | None:
            dom = self.resolve(conn, name)
            if memory is None:
                dom.snapshotCreateXML(xml, flags)
                return None
            live = dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
            dom.snapshotCreateXML(xml, flags | (
                libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_LIVE if live else 0))
            stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
            return float(stats.get("downtime", 0)) / 1000.0

        return await self.connection.call(run, what=f"{name}: snapshot", retry=False)

    async def restore(self, name: str, memory: str, overlays: dict[str, str], *,
                      paused: bool) -> None:
        """Start stopped domain NAME from the RAM and device state saved in
        MEMORY, its disks on OVERLAYS (the saved definition names the disks
        as they were, which must not be written again)."""

        def run(conn: libvirt.virConnect) -> None:
            saved = conn.saveImageGetXMLDesc(memory, libvirt.VIR_DOMAIN_SAVE_IMAGE_XML_SECURE)
            if domxml.name(saved) != name:
                raise DomainChanged(f"{memory} holds domain {domxml.name(saved)}, not {name}")
            if self.resolve(conn, name).isActive():
                raise VirtError(f"{name} started while its memory was being restored")
            flags = (libvirt.VIR_DOMAIN_SAVE_PAUSED if paused
                     else libvirt.VIR_DOMAIN_SAVE_RUNNING)
            conn.restoreFlags(memory, domxml.with_disk_sources(saved, overlays), flags)

        await self.connection.call(run, what=f"{name}: restore", retry=False)

    async def define_overlays(self, name: str, overlays: dict[str, str]) -> None:
        """The offline switch: the persistent definition of a stopped domain
        points each disk at its overlay."""

        def run(conn: libvirt.virConnect) -> None:
            dom = self.resolve(conn, name)
            if dom.isActive():
                raise VirtError(f"{name} started while its overlays were being switched")
            conn.defineXML(domxml.with_disk_sources(_current_xml(dom, name), overlays))

        async with self._definitions[name]:
            await self.connection.call(run, what=f"{name}: switch overlays", retry=False)

    # block jobs

    async def block_commit(self, name: str, target: str, top: str, base: str, *,
                           active: bool, bandwidth: int = 0) -> None:
        """Commit TOP into BASE, keeping relative backing names.  ACTIVE: TOP
        is the active layer (two phases: READY, then ``pivot``)."""
        flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE
        if active:
            flags |= libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
        self.block_events.forget(name, target)
        await self.connection.call(lambda c: _keeping_relative(
            lambda f: self.resolve(c, name).blockCommit(target, base, top, bandwidth, f),
            flags, libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE, f"{name}/{target}"),
            what=f"{name}/{target}: block commit", retry=False)

    async def block_pull(self, name: str, target: str, base: str | None, *,
                         bandwidth: int = 0) -> None:
        """Pull everything above BASE into the active layer (BASE None: all)."""
        flags = libvirt.VIR_DOMAIN_BLOCK_REBASE_RELATIVE if base else 0
        self.block_events.forget(name, target)
        await self.connection.call(lambda c: _keeping_relative(
            lambda f: self.resolve(c, name).blockRebase(target, base, bandwidth, f),
            flags, libvirt.VIR_DOMAIN_BLOCK_REBASE_RELATIVE, f"{name}/{target}"),
            what=f"{name}/{target}: block pull", retry=False)

    async def block_job_info(self, name: str, target: str) -> JobInfo | None:
        info = await self.connection.call(lambda c: self.resolve(c, name).blockJobInfo(target, 0),
                               what=f"{name}/{target}: block job")
        if not info:
            return None
        return JobInfo(int(info["cur"]), int(info["end"]),
                       _JOB_KINDS.get(int(info.get("type", 0)), "other"))

    async def mirror_ready(self, name: str, target: str) -> bool:
        xml = await self.domain_xml(name)
        return domxml.mirror_ready(xml, target)

    async def pivot(self, name: str, target: str) -> None:
        await self.connection.call(lambda c: self.resolve(c, name).blockJobAbort(
            target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT),
            what=f"{name}/{target}: pivot", retry=False, mapper=_map_job_error)

    async def cancel_block_job(self, name: str, target: str) -> None:
        await self.connection.call(lambda c: self.resolve(c, name).blockJobAbort(target, 0),
                                   what=f"{name}/{target}: cancel the block job", retry=False)

    async def follow_block_job(self, name: str, target: str, *, want_ready: bool,
                               progress: Progress) -> JobEnd:
        """Events first, a check every few seconds second; a libvirtd outage
        is waited out (QEMU keeps running the job), up to ``outage_wait``;
        past it LibvirtUnavailable, and the caller hands the merge on."""

        async def check() -> JobInfo | None:
            deadline = time.monotonic() + self.outage_wait
            while True:
                try:
                    return await self.block_job_info(name, target)
                except LibvirtUnavailable:
                    if time.monotonic() >= deadline:
                        raise
                    await asyncio.sleep(1.0)

        return await follow(self.block_events, name, target, check=check,
                            mirror_ready=lambda: self.mirror_ready(name, target),
                            progress=progress, want_ready=want_ready)

    # power

    async def start(self, name: str) -> None:
        await self.connection.call(lambda c: self.resolve(c, name).create(),
                                   what=f"start {name}", retry=False)

    async def shutdown(self, name: str, *, agent: bool) -> None:
        """Ask the guest to power off: through its agent, or the ACPI button."""
        flags = (libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT if agent
                 else libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        await self.connection.call(lambda c: self.resolve(c, name).shutdownFlags(flags),
                                   what=f"shut down {name}", retry=False)

    async def destroy(self, name: str) -> None:
        """Power off at once; a domain that is already off is fine."""

        def run(conn: libvirt.virConnect) -> None:
            dom = self.resolve(conn, name)
            if dom.isActive():
                dom.destroy()

        await self.connection.call(run, what=f"destroy {name}")

    async def define_disk_source(self, name: str, target: str, path: str, fmt: str) -> None:
        def run(conn: libvirt.virConnect) -> None:
            dom = self.resolve(conn, name)
            if dom.isActive():
                raise VirtError(f"{name} started while its disk {target} was being changed")
            conn.defineXML(domxml.with_disk_sources(_current_xml(dom, name), {target: path},
                                                    fmt=fmt))

        async with self._definitions[name]:
            await self.connection.call(run, what=f"{name}/{target}: change source",
                                       retry=False)

    # hot-plugged disks

    async def disk_targets(self, name: str) -> dict[str, str | None]:
        """Every disk target NAME uses, live or in its definition, with its serial."""

        def run(conn: libvirt.virConnect) -> dict[str, str | None]:
            dom = self.resolve(conn, name)
            found = domxml.targets(dom.XMLDesc(0))
            if dom.isActive() and dom.isPersistent():
                found.update(domxml.targets(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
            return found

        return await self.connection.call(run, what=f"{name}: disk targets")

    async def attach_disk(self, name: str, path: str, target: str, serial: str, *,
                          readonly: bool) -> None:
        """Plug the qcow2 PATH in at TARGET: live when the domain runs, and in
        its persistent definition, in one call."""
        xml = domxml.disk_xml(path, target, serial, readonly=readonly)

        def run(conn: libvirt.virConnect) -> None:
            dom = self.resolve(conn, name)
            flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent() else 0
            if dom.isActive():
                flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
            dom.attachDeviceFlags(xml, flags)

        async with self._definitions[name]:
            await self.connection.call(run, what=f"{name}/{target}: attach", retry=False)

    async def detach_disk(self, name: str, serial: str, *, timeout: float) -> None:
        """Unplug the disk whose serial is SERIAL: from the running guest
        first, waiting (up to TIMEOUT) until the guest has let it go, then
        from the definition; a guest that holds on leaves both as they were
        (DetachTimeout)."""
        deadline = time.monotonic() + timeout

        def live(conn: libvirt.virConnect) -> bool:
            """Ask the guest; True while the disk is still plugged in."""
            dom = self.resolve(conn, name)
            if not dom.isActive():
                return False
            disk = domxml.disk_with_serial(dom.XMLDesc(0), serial)
            if disk is not None:
                dom.detachDeviceFlags(disk, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            return disk is not None

        def still_live(conn: libvirt.virConnect) -> bool:
            dom = self.resolve(conn, name)
            return dom.isActive() and domxml.disk_with_serial(dom.XMLDesc(0), serial) is not None

        def config(conn: libvirt.virConnect) -> None:
            dom = self.resolve(conn, name)
            if not dom.isPersistent():
                return
            disk = domxml.disk_with_serial(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), serial)
            if disk is not None:
                dom.detachDeviceFlags(disk, libvirt.VIR_DOMAIN_AFFECT_CONFIG)

        what = f"{name}: detach {serial}"
        if await self.connection.call(live, what=what, retry=False):
            # The guest releases the device when it is ready (ACPI hot-unplug);
            # libvirt reports it in the live XML.
            while await self.connection.call(still_live, what=what):
                if time.monotonic() >= deadline:
                    raise DetachTimeout(f"{name} did not release disk {serial} within "
                                        f"{timeout:.0f}s; it stays attached")
                await asyncio.sleep(0.5)
        async with self._definitions[name]:
            await self.connection.call(config, what=what, retry=False)

    async def domain_names(self) -> list[str]:
        return await self.connection.call(
            lambda c: sorted(d.name() for d in c.listAllDomains(0)), what="list domains"
        )


# --- blocking helpers (run in worker threads) -------------------------------


def _read_domain(conn: libvirt.virConnect, name: str, uuid: str | None
                 ) -> tuple[str, str, DomainState, str]:
    # By UUID when one is given (whatever the domain is called now), else by
    # name, never a held handle: this is where names are resolved.
    dom = conn.lookupByUUIDString(uuid) if uuid else conn.lookupByName(name)
    state = _STATES.get(dom.state()[0], DomainState.NOSTATE)
    return str(dom.name()), dom.UUIDString(), state, dom.XMLDesc(0)


def _all_definitions(conn: libvirt.virConnect, besides: frozenset[str]) -> list[str]:
    xmls = []
    for dom in conn.listAllDomains(0):
        try:
            if dom.UUIDString() in besides:
                continue
            xmls.append(dom.XMLDesc(0))
            if dom.isActive() and dom.isPersistent():
                xmls.append(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise  # one undefined meanwhile uses nothing any more
    return xmls


def _keeping_relative(start: Callable[[int], object], flags: int, relative: int,
                      what: str) -> None:
    """Start a job with FLAGS, keeping backing pointers relative where they
    are.  A chain made elsewhere (virsh writes absolute pointers, and gasnap
    adopts such layers) cannot: libvirt refuses RELATIVE there, and the job
    runs as the chain was written."""
    try:
        start(flags)
    except libvirt.libvirtError as err:
        if not flags & relative or "relative backing" not in (err.get_error_message() or ""):
            raise
        log.warning("%s: the chain has absolute backing pointers (made outside gasnap); "
                    "the merge keeps them absolute", what)
        start(flags & ~relative)


def _current_xml(dom: libvirt.virDomain, name: str) -> str:
    """DOM's persistent definition, refused if the domain is not called NAME
    any more (renamed since it was planned: never acted on)."""
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    current = domxml.name(xml)
    if current != name:
        raise DomainChanged(f"domain {name} is named {current} now; not changed")
    return str(xml)


def _by_uuid(conn: libvirt.virConnect, name: str, uuid: str) -> libvirt.virDomain:
    dom = conn.lookupByUUIDString(uuid)
    if dom.name() != name:
        raise DomainChanged(f"domain {uuid} is named {dom.name()} now, not {name}")
    return dom


async def _read_chain(known: tuple[Layer, ...]) -> tuple[tuple[Layer, ...], str | None]:
    """The chain of an inactive disk: below the layers the XML names, read
    from the headers with every format named (never guessed).  When that is
    not possible, the layers known and the reason."""
    last = known[-1]
    try:
        below = await images.read_chain(last.path, last.format)
    except (OSError, GasnapError) as err:
        reason = err.message if isinstance(err, GasnapError) else str(err)
        log.warning("cannot read the chain below %s: %s", last.path, reason)
        return known, reason
    return (*known[:-1], *below), None
