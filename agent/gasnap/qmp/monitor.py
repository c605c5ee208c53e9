"""QEMU over its QMP socket (``NAME.qmp``), with qemu.qmp's client.

QEMU's QMP socket serves one client at a time, and other tools on the host
(Proxmox's ``qm``, an operator's ``socat``) need it too.  So the backend
holds **one session per domain**, shared by every caller, open only while
somebody uses it (a read, a held domain, a block job being followed) and
closed as soon as nobody does.  Block-job events arrive on that session.

What a bare-QEMU domain is, read from QEMU itself and never guessed: its
run state (``query-status``), its UUID, its RAM, and each disk's device id
(the target), serial (``qom-get`` on the device) and chain (``graph``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, Runstate
from qemu.qmp.error import QMPError
from qemu.qmp.protocol import ConnectError

from .. import images
from ..errors import GasnapError, NotFound
from ..hypervisor import AgentState, Domain, DomainState, HypervisorUnavailable, Volume
from . import graph

log = logging.getLogger(__name__)

# Another client may hold the socket for a moment (QEMU queues the next
# one until it lets go): the greeting is waited for, bounded.
CONNECT_TIMEOUT = 5.0
CALL_TIMEOUT = 10.0
RESET_TRIES = 3

JOB_EVENTS = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_READY",
              "BLOCK_JOB_ERROR")

_STATES = {"running": DomainState.RUNNING, "paused": DomainState.PAUSED,
           "suspended": DomainState.PMSUSPENDED, "shutdown": DomainState.SHUTDOWN,
           "guest-panicked": DomainState.CRASHED, "internal-error": DomainState.CRASHED,
           "prelaunch": DomainState.PAUSED, "inmigrate": DomainState.PAUSED,
           "postmigrate": DomainState.PAUSED, "finish-migrate": DomainState.PAUSED,
           "save-vm": DomainState.PAUSED, "restore-vm": DomainState.PAUSED,
           "io-error": DomainState.PAUSED, "watchdog": DomainState.PAUSED,
           "colo": DomainState.PAUSED, "debug": DomainState.PAUSED}


class QmpError(GasnapError):
    """QEMU refused a command."""

    code = "qmp"


class QmpDomainNotFound(QmpError, NotFound):
    code = "domain_not_found"


class QmpUnavailable(QmpError, HypervisorUnavailable):
    code = "qmp_unavailable"


EventSink = Callable[[str, str, dict[str, Any]], None]  # domain, event, data


# --- one session -------------------------------------------------------------


class Session:
    """One QMP connection to one domain's QEMU."""

    def __init__(self, run_dir: Path, name: str, on_event: EventSink | None = None) -> None:
        self.name = name
        self.path = run_dir / f"{name}.qmp"
        self._client = QMPClient(f"gasnap-{name}")
        # Only job events are kept: qemu.qmp's default listener (which cannot
        # be removed) would otherwise hold every event of a long session.
        self._client.events.event_filter = lambda _event: False
        self._listener = EventListener(JOB_EVENTS)
        self._client.register_listener(self._listener)
        self._on_event = on_event
        self._pump: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._client.runstate is Runstate.RUNNING

    async def open(self) -> None:
        for attempt in range(RESET_TRIES):
            try:
                await asyncio.wait_for(self._client.connect(str(self.path)), CONNECT_TIMEOUT)
                break
            except (OSError, QMPError, TimeoutError) as err:
                await self._client.disconnect()
                cause = err.exc if isinstance(err, ConnectError) else err
                if isinstance(cause, FileNotFoundError | ConnectionRefusedError):
                    # No socket, or nobody listening on it (a QEMU that was
                    # killed leaves its socket behind): no such domain runs.
                    raise QmpDomainNotFound(f"no domain {self.name}: QEMU does not listen "
                                            f"on {self.path}") from err
                if isinstance(cause, ConnectionResetError) and attempt + 1 < RESET_TRIES:
                    # A QEMU dying as we connect: the next try tells.
                    await asyncio.sleep(0.2)
                    continue
                raise QmpUnavailable(f"{self.name}: QEMU does not answer on {self.path} "
                                     f"({err or 'no greeting'})") from err
        self._pump = asyncio.get_running_loop().create_task(self._pump_events())

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        await self._client.disconnect()

    async def __aenter__(self) -> Session:
        await self.open()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def call(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        what = f"{self.name}: {command}"
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments),
                                          CALL_TIMEOUT)
        except ExecuteError as err:
            raise QmpError(f"{what}: {err.error.error.desc}",
                           qmp_class=err.error.error.class_) from err
        except (QMPError, TimeoutError) as err:
            raise QmpUnavailable(f"{what}: {err or 'no answer'}") from err

    async def _pump_events(self) -> None:
        async for event in self._listener:
            if self._on_event is not None:
                data: Any = event.get("data") or {}
                self._on_event(self.name, str(event["event"]), dict(data))


# Kept under the name the lab's tests know: one session, ``async with``.
Monitor = Session


@dataclass
class _Use:
    session: Session
    users: int = 0


class Sessions:
    """The sessions of one backend: one per domain, open while in use."""

    def __init__(self, run_dir: Path, on_event: EventSink | None = None) -> None:
        self.run_dir = run_dir
        self._on_event = on_event
        self._open: dict[str, _Use] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def using(self, name: str) -> AsyncIterator[Session]:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            use = self._open.get(name)
            if use is None or not use.session.alive:
                session = Session(self.run_dir, name, self._on_event)
                await session.open()
                use = self._open[name] = _Use(session)
            use.users += 1
        try:
            yield use.session
        finally:
            use.users -= 1
            if not use.users:
                if self._open.get(name) is use:
                    del self._open[name]
                await use.session.close()

    def is_open(self, name: str) -> bool:
        return name in self._open

    async def close(self) -> None:
        uses, self._open = list(self._open.values()), {}
        for use in uses:
            await use.session.close()


# --- reading a domain ---------------------------------------------------------


async def read_domain(qmp: Session, name: str, qga_socket: Path | None = None) -> Domain:
    """NAME as its QEMU sees it now.  The guest agent is CONNECTED when the
    guest has opened the port of the chardev listening on QGA_SOCKET (what
    libvirt reports as the channel's state), ABSENT otherwise."""
    status = await qmp.call("query-status")
    uuid = (await qmp.call("query-uuid"))["UUID"]
    memory = (await qmp.call("query-memory-size-summary"))["base-memory"]
    volumes = []
    for disk in (await graph.disks(qmp)).values():
        serial = await qmp.call("qom-get", {"path": disk.qdev, "property": "serial"})
        kind = "file" if disk.chain[0].path.startswith("/") else "network"
        # QEMU's names are a process's word, not the host's: one gasnap would
        # have to interpret leaves the volume untouchable.
        error = (await asyncio.to_thread(images.chain_problem, disk.chain) if kind == "file"
                 else None)
        volumes.append(Volume(serial or f"{name}/{disk.target}", disk.target, serial or None,
                              kind, disk.chain, chain_error=error, readonly=disk.readonly))
    state = _STATES.get(status["status"], DomainState.NOSTATE)
    agent = AgentState.ABSENT
    if qga_socket is not None and await _agent_port_open(qmp, qga_socket):
        agent = AgentState.CONNECTED
    if agent is AgentState.CONNECTED and state is not DomainState.RUNNING:
        agent = AgentState.UNRESPONSIVE  # the vCPUs that would answer are stopped
    return Domain(name, uuid, state, agent, tuple(sorted(volumes, key=lambda v: v.target)),
                  memory=int(memory))


async def _agent_port_open(qmp: Session, socket: Path) -> bool:
    for chardev in await qmp.call("query-chardev"):
        if f"{socket}," in f"{chardev.get('filename', '')},":
            return bool(chardev.get("frontend-open"))
    return False
