"""The libvirt boundary: the connection, domains, disks, chains, agent transport.

Owns the one ``virConnect`` of the process.  libvirt API calls block, so each
runs in a worker thread; libvirt's own events are integrated into the asyncio
loop through ``libvirtaio``, registered once, the first time a connection is
opened from a running loop.  When libvirtd goes away (restart, crash) the
close callback drops the connection and the next call opens a new one.
``libvirt.libvirtError`` never leaves this module: it becomes a
``VirtError`` (or a guest-agent error for agent calls).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt
import libvirt_qemu
import libvirtaio

from . import domxml, hypervisor, images
from .blockjobs import BlockJobEvents, JobEnd, JobInfo, PivotNotReady, Progress, follow
from .errors import Conflict, GasnapError, NotFound, Unavailable
from .guestagent import (
    AgentAbsent,
    AgentCommandFailed,
    AgentUnresponsive,
    GuestAgent,
    GuestAgentError,
)
from .hypervisor import AgentState, Domain, DomainState, Layer, Volume

log = logging.getLogger(__name__)

T = TypeVar("T")

KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
LIBVIRT_THREADS = 32  # concurrent libvirt calls (a group of 32 guests freezes at once)
OUTAGE_WAIT = 120.0  # how long a block job's follower waits for libvirtd to return


class VirtError(GasnapError):
    code = "libvirt"


class LibvirtUnavailable(VirtError, Unavailable):
    code = "libvirt_unavailable"


class DomainNotFound(VirtError, NotFound):
    code = "domain_not_found"


class DomainNotRunning(VirtError, Conflict):
    code = "domain_not_running"


class DomainChanged(VirtError, hypervisor.DomainChanged):
    code = "domain_changed"


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

_CONNECTION_ERRORS = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_AUTH_FAILED,
}


# --- process-wide libvirt set-up -------------------------------------------

class _LoopThreadProxy:
    """The asyncio loop as libvirtaio sees it, safe to use from any thread.

    libvirt calls the event implementation from whatever thread is inside a
    libvirt API call, and gasnap makes those calls in worker threads.
    libvirtaio then touches the loop directly (``add_reader``, tasks for
    timers and free callbacks), which asyncio only allows on the loop's own
    thread.  This proxy hands such calls to the loop thread instead.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.get_ident()

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread

    def _defer(self, method: str, *args: Any) -> None:
        if self._loop.is_closed():
            return  # the process is exiting: nothing is watched any more
        if self._on_loop_thread():
            getattr(self._loop, method)(*args)
        else:
            self._loop.call_soon_threadsafe(getattr(self._loop, method), *args)

    def add_reader(self, fd: int, callback: Callable[..., None], *args: Any) -> None:
        self._defer("add_reader", fd, callback, *args)

    def remove_reader(self, fd: int) -> None:
        self._defer("remove_reader", fd)

    def add_writer(self, fd: int, callback: Callable[..., None], *args: Any) -> None:
        self._defer("add_writer", fd, callback, *args)

    def remove_writer(self, fd: int) -> None:
        self._defer("remove_writer", fd)

    def create_task(self, coro: Coroutine[Any, Any, Any], **kwargs: Any) -> Any:
        if self._loop.is_closed():
            coro.close()
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            done.cancel()
            return done
        if self._on_loop_thread():
            return self._loop.create_task(coro, **kwargs)
        # A concurrent future: libvirtaio only ever cancels what it gets back.
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


_event_loop: asyncio.AbstractEventLoop | None = None


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; gasnap reports its own."""


libvirt.registerErrorHandler(_ignore_libvirt_error, None)


def _register_event_loop() -> None:
    """libvirt accepts one event implementation per process, forever."""
    global _event_loop  # noqa: PLW0603 - process-wide by libvirt's design
    loop = asyncio.get_running_loop()
    if _event_loop is None:
        libvirtaio.virEventAsyncIOImpl(loop=_LoopThreadProxy(loop)).register()
        _event_loop = loop
    elif _event_loop is not loop:
        raise VirtError("libvirt events are already bound to another asyncio loop")


async def _settle() -> None:
    """Let the loop run what libvirt handed over while a connection closed
    (handle removals, free callbacks), so nothing is left for a closed loop."""
    for _ in range(4):
        await asyncio.sleep(0)


# --- error mapping ---------------------------------------------------------


def _is_connection_error(err: libvirt.libvirtError) -> bool:
    return err.get_error_code() in _CONNECTION_ERRORS or (
        err.get_error_domain() == libvirt.VIR_FROM_RPC
    )


def _map_error(err: libvirt.libvirtError, what: str) -> GasnapError:
    code = err.get_error_code()
    message = f"{what}: {err.get_error_message()}"
    if _is_connection_error(err):
        return LibvirtUnavailable(message)
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainNotFound(message)
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return DomainNotRunning(message)
    return VirtError(message)


def _map_job_error(err: libvirt.libvirtError, what: str) -> GasnapError:
    if err.get_error_code() in (libvirt.VIR_ERR_BLOCK_COPY_ACTIVE,
                                libvirt.VIR_ERR_OPERATION_INVALID):
        return PivotNotReady(f"{what}: {err.get_error_message()}")
    return _map_error(err, what)


def _map_agent_error(err: libvirt.libvirtError, what: str) -> GasnapError:
    code = err.get_error_code()
    message = f"{what}: {err.get_error_message()}"
    if code == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED:
        return AgentAbsent(message)
    if code in (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED):
        if "not connected" in message:
            return AgentAbsent(message)
        return AgentUnresponsive(message)
    if code == libvirt.VIR_ERR_INTERNAL_ERROR and "agent command" in message:
        return AgentCommandFailed(message)
    return _map_error(err, what)


# --- the hypervisor --------------------------------------------------------


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
        # Its own threads: asyncio's default pool has cores + 4 of them (6
        # here), so the 7th guest of a group would wait for a thread to
        # freeze, inside the others' freeze window.  These threads mostly wait
        # on libvirtd (guest agents, block jobs), not on the CPU.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            LIBVIRT_THREADS, thread_name_prefix="libvirt")
        self._conn: libvirt.virConnect | None = None
        self._lock = asyncio.Lock()
        self.agent = GuestAgent(self)
        self.block_events = BlockJobEvents()
        self._held: dict[str, _Held] = {}  # by name; read from worker threads

    # connection

    async def connect(self) -> None:
        await self._connection()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.to_thread(_close, conn)
            await _settle()

    @property
    def connected(self) -> bool:
        # isAlive reads the client's own socket state: no round trip.
        return self._conn is not None and bool(self._conn.isAlive())

    async def _connection(self) -> libvirt.virConnect:
        async with self._lock:
            if self._conn is None:
                _register_event_loop()
                self._conn = await asyncio.to_thread(self._open)
            return self._conn

    def _open(self) -> libvirt.virConnect:
        try:
            conn = libvirt.open(self.uri)
            conn.registerCloseCallback(self._on_close, None)
            conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            # Per connection: after a reconnect the new one gets it again.
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._on_block_job, None
            )
        except libvirt.libvirtError as err:
            raise LibvirtUnavailable(
                f"cannot connect to {self.uri}: {err.get_error_message()}"
            ) from err
        log.info("connected to %s", self.uri)
        return conn

    def _on_close(self, conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        log.warning("libvirt connection to %s closed (reason %d)", self.uri, reason)
        if self._conn is conn:
            self._conn = None

    def _on_block_job(self, _conn: libvirt.virConnect, dom: libvirt.virDomain, disk: str,
                      _type: int, status: int, _opaque: object) -> None:
        self.block_events.on_event(dom.name(), disk, status)

    def _drop(self, conn: libvirt.virConnect) -> None:
        if self._conn is conn:
            self._conn = None

    async def call(
        self,
        fn: Callable[..., T],
        *args: Any,
        what: str,
        retry: bool = True,
        mapper: Callable[[libvirt.libvirtError, str], GasnapError] = _map_error,
    ) -> T:
        """Run ``fn(conn, *args)`` in a thread.  A connection error drops the
        connection; idempotent calls (``retry``) get one more try on a fresh one,
        which is what makes a libvirtd restart invisible to readers.  A
        connection found dead before the call was sent (libvirtd restarted
        while it sat idle) is replaced for every call: nothing was sent."""
        for attempt in (1, 2):
            conn = await self._connection()
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    self._pool, functools.partial(_alive_call, fn, conn, *args))
            except _Stale:
                self._drop(conn)
                if attempt == 1:
                    log.info("%s: connection found closed, reconnecting", what)
                    continue
                raise LibvirtUnavailable(f"{what}: the connection to libvirtd closed") from None
            except libvirt.libvirtError as err:
                if _is_connection_error(err):
                    self._drop(conn)
                    if retry and attempt == 1:
                        log.info("%s: connection lost, reconnecting", what)
                        continue
                raise mapper(err, what) from err
        raise AssertionError("unreachable")

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
            conn, dom = await self.call(lambda c: (c, _by_uuid(c, name, uuid)),
                                        what=f"domain {name}")
            self._held.setdefault(name, _Held(uuid, conn, dom))
        held = self._held[name]
        if held.uuid != uuid:
            raise DomainChanged(f"domain {name} is {held.uuid} for another operation, "
                                f"not {uuid} as planned")
        held.holders += 1

    def _domain(self, conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
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
        found, found_uuid, state, xml = await self.call(_read_domain, name, uuid,
                                                        what=f"domain {name}")
        specs = domxml.disks(xml)
        volumes = await asyncio.gather(*(self._volume(found, spec) for spec in specs))
        agent = await self._agent_state(found, state, xml, probe_agent)
        return Domain(found, found_uuid, state, agent, tuple(volumes))

    async def files_in_use(self, *, besides: frozenset[str] = frozenset()) -> set[str]:
        """The real path of every layer of every disk of every domain (but
        those whose UUID is in BESIDES), in its running and its persistent
        definition alike."""
        paths: list[str] = []
        for xml in await self.call(_all_definitions, besides, what="domains' disks"):
            for spec in domxml.disks(xml):
                chain = spec.chain
                if not spec.chain_complete and spec.source_type == "file" and chain[0].path:
                    chain, _ = await _read_chain(chain)
                paths.extend(layer.path for layer in chain if layer.path)
        return await asyncio.to_thread(lambda: {os.path.realpath(p) for p in paths})

    async def domain_xml(self, name: str, *, inactive: bool = False) -> str:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return await self.call(
            lambda c: self._domain(c, name).XMLDesc(flags), what=f"domain {name} XML"
        )

    async def _volume(self, domain: str, spec: domxml.DiskSpec) -> Volume:
        chain, error = spec.chain, None
        if not spec.chain_complete and spec.source_type == "file" and chain[0].path:
            chain, error = await _read_chain(chain)
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

    async def agent_command(
        self, domain: str, command: str, arguments: dict[str, Any] | None, timeout: float
    ) -> Any:
        payload: dict[str, Any] = {"execute": command}
        if arguments is not None:
            payload["arguments"] = arguments
        # libvirt takes whole seconds; never round a short timeout down to "no wait".
        seconds = max(1, int(-(-timeout // 1)))
        text = json.dumps(payload)
        raw = await self.call(
            lambda c: str(libvirt_qemu.qemuAgentCommand(self._domain(c, domain), text,
                                                        seconds, 0)),
            what=f"{domain}: {command}",
            retry=False,  # an agent command may have side effects
            mapper=_map_agent_error,
        )
        try:
            return json.loads(raw)["return"]
        except (ValueError, KeyError, TypeError) as err:
            raise AgentCommandFailed(f"{domain}: {command}: malformed reply {raw!r}") from err


    # switching overlays

    async def switch_overlays(self, name: str, overlays: dict[str, str],
                              others: list[str]) -> None:
        """Make each pre-created overlay the active layer of its disk, all
        disks of the domain at once (ATOMIC), without libvirt metadata.  OTHERS
        are named ``snapshot='no'``: a disk left out would get an overlay of
        libvirt's choosing."""
        flags = (
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        )

        # Built before the call: the guest is frozen while it runs, and reading
        # the definition here cost an XMLDesc inside the freeze window.
        xml = domxml.snapshot_xml(overlays, [*overlays, *others])

        def run(conn: libvirt.virConnect) -> None:
            self._domain(conn, name).snapshotCreateXML(xml, flags)

        await self.call(run, what=f"{name}: snapshot", retry=False)

    async def define_overlays(self, name: str, overlays: dict[str, str]) -> None:
        """The offline switch: the persistent definition of a stopped domain
        points each disk at its overlay."""

        def run(conn: libvirt.virConnect) -> None:
            dom = self._domain(conn, name)
            if dom.isActive():
                raise VirtError(f"{name} started while its overlays were being switched")
            conn.defineXML(domxml.with_disk_sources(_current_xml(dom, name), overlays))

        await self.call(run, what=f"{name}: switch overlays", retry=False)

    # block jobs

    async def block_commit(self, name: str, target: str, top: str, base: str, *,
                           active: bool, bandwidth: int = 0) -> None:
        """Commit TOP into BASE, keeping relative backing names.  ACTIVE: TOP
        is the active layer (two phases: READY, then ``pivot``)."""
        flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE
        if active:
            flags |= libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE
        self.block_events.forget(name, target)
        await self.call(lambda c: self._domain(c, name).blockCommit(
            target, base, top, bandwidth, flags), what=f"{name}/{target}: block commit",
            retry=False)

    async def block_pull(self, name: str, target: str, base: str | None, *,
                         bandwidth: int = 0) -> None:
        """Pull everything above BASE into the active layer (BASE None: all)."""
        flags = libvirt.VIR_DOMAIN_BLOCK_REBASE_RELATIVE if base else 0
        self.block_events.forget(name, target)
        await self.call(lambda c: self._domain(c, name).blockRebase(
            target, base, bandwidth, flags), what=f"{name}/{target}: block pull", retry=False)

    async def block_job_info(self, name: str, target: str) -> JobInfo | None:
        info = await self.call(lambda c: self._domain(c, name).blockJobInfo(target, 0),
                               what=f"{name}/{target}: block job")
        if not info:
            return None
        return JobInfo(int(info["cur"]), int(info["end"]),
                       _JOB_KINDS.get(int(info.get("type", 0)), "other"))

    async def mirror_ready(self, name: str, target: str) -> bool:
        xml = await self.domain_xml(name)
        return domxml.mirror_ready(xml, target)

    async def pivot(self, name: str, target: str) -> None:
        await self.call(lambda c: self._domain(c, name).blockJobAbort(
            target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT),
            what=f"{name}/{target}: pivot", retry=False, mapper=_map_job_error)

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

    async def define_disk_source(self, name: str, target: str, path: str, fmt: str) -> None:
        def run(conn: libvirt.virConnect) -> None:
            dom = self._domain(conn, name)
            if dom.isActive():
                raise VirtError(f"{name} started while its disk {target} was being changed")
            conn.defineXML(domxml.with_disk_sources(_current_xml(dom, name), {target: path},
                                                    fmt=fmt))

        await self.call(run, what=f"{name}/{target}: change source", retry=False)

    # definitions (used by the lab; workflow code does not define domains)

    async def define_and_start(self, xml: str) -> str:
        def run(conn: libvirt.virConnect) -> str:
            dom = conn.defineXML(xml)
            try:
                dom.create()
            except libvirt.libvirtError:
                dom.undefine()
                raise
            return str(dom.name())

        return await self.call(run, what="define domain", retry=False)

    async def start(self, name: str) -> None:
        await self.call(lambda c: self._domain(c, name).create(), what=f"start {name}",
                        retry=False)

    async def reboot(self, name: str) -> None:
        """A clean reboot through the guest agent (qemu-ga never answers it)."""
        await self.call(lambda c: self._domain(c, name).reboot(
            libvirt.VIR_DOMAIN_REBOOT_GUEST_AGENT), what=f"reboot {name}", retry=False)

    async def destroy(self, name: str) -> None:
        """Power off at once; a domain that is already off is fine."""

        def run(conn: libvirt.virConnect) -> None:
            dom = self._domain(conn, name)
            if dom.isActive():
                dom.destroy()

        await self.call(run, what=f"destroy {name}")

    async def undefine(self, name: str) -> None:
        await self.call(lambda c: self._domain(c, name).undefine(), what=f"undefine {name}")

    async def metadata(self, name: str, uri: str) -> str | None:
        """The custom metadata element under URI, or None."""

        def run(conn: libvirt.virConnect) -> str | None:
            dom = self._domain(conn, name)
            try:
                return str(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, uri, 0))
            except libvirt.libvirtError as err:
                if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                    return None
                raise

        return await self.call(run, what=f"domain {name} metadata")

    async def domain_names(self) -> list[str]:
        return await self.call(
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


def _current_xml(dom: libvirt.virDomain, name: str) -> str:
    """DOM's persistent definition, refused if the domain is not called NAME
    any more (renamed since it was planned: never acted on)."""
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    current = domxml.name(xml)
    if current != name:
        raise DomainChanged(f"domain {name} is named {current} now; not changed")
    return str(xml)


class _Stale(Exception):
    """The connection was already closed: the call was never sent."""


def _alive_call(fn: Callable[..., T], conn: libvirt.virConnect, *args: Any) -> T:
    # isAlive looks at the client's own socket: no round trip to libvirtd.
    if not conn.isAlive():
        raise _Stale
    return fn(conn, *args)


def _close(conn: libvirt.virConnect) -> None:
    try:
        conn.unregisterCloseCallback()
    except libvirt.libvirtError:
        log.debug("unregisterCloseCallback failed", exc_info=True)
    conn.close()


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
