"""The small interface workflow code uses to talk to a hypervisor.

Two implementations: libvirt (the ``gasnap.virt`` package) and bare QEMU
over QMP (``gasnap.qmp``).  Workflow code depends on this module, never on
either.  What a backend cannot do at all it names in ``unsupported`` (a
``Feature``), and plans refuse such a request before anything is touched
(501 ``not_supported_on_backend``).
"""

from __future__ import annotations

import enum
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from .blockjobs import JobEnd, JobInfo, Progress
from .errors import Conflict, NotSupported, Unavailable
from .guestagent import GuestAgent


class HypervisorUnavailable(Unavailable):
    """The hypervisor cannot be reached now (libvirtd restarting, a QEMU
    monitor gone): what ``Hypervisor.reachable`` waits out."""


class DomainChanged(Conflict):
    """The name no longer belongs to the domain planned (renamed or replaced
    since): whatever the backend, such a domain is never acted on."""

    code = "domain_changed"


class DetachTimeout(Conflict):
    """A guest did not release a hot-plugged disk in time; it stays attached."""

    code = "detach_timeout"


class Feature(enum.Enum):
    """What not every backend can do."""

    MEMORY = "memory"  # a snapshot's RAM and device state, and its restore
    OFFLINE = "offline"  # stopped domains: a definition to change, start, shut down
    HOTPLUG = "hotplug"  # disks attached to and detached from a domain (clones)


def require(hv: Hypervisor, feature: Feature) -> None:
    """NotSupported (501) with the backend's reason when HV cannot do FEATURE."""
    reason = hv.unsupported(feature)
    if reason is not None:
        raise NotSupported(reason)


class DomainState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    SHUTDOWN = "shutdown"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"
    BLOCKED = "blocked"
    NOSTATE = "nostate"


class AgentState(enum.Enum):
    CONNECTED = "connected"
    ABSENT = "absent"
    UNRESPONSIVE = "unresponsive"


@dataclass(frozen=True)
class Layer:
    """One image of a backing chain."""

    path: str
    format: str


@dataclass(frozen=True)
class Volume:
    """One disk of a domain, with its chain as the hypervisor sees it now."""

    volume_id: str
    target: str
    serial: str | None
    source_type: str  # "file", "block", "network", ...
    chain: tuple[Layer, ...]  # active layer first
    # Why the chain below the first layer could not be read without guessing
    # (a stopped domain's images); then ``chain`` holds the first layer only
    # and nothing may act on the volume.
    chain_error: str | None = None
    shareable: bool = False  # <shareable/>: other domains may write it too
    readonly: bool = False  # <readonly/>

    @property
    def active_file(self) -> str:
        return self.chain[0].path if self.chain else ""

    @property
    def format(self) -> str:
        return self.chain[0].format if self.chain else ""

    def to_record(self) -> dict[str, Any]:
        return {
            "volume_id": self.volume_id,
            "target": self.target,
            "active_file": self.active_file,
            "chain": [layer.path for layer in self.chain],
        }


@dataclass(frozen=True)
class Domain:
    name: str
    uuid: str
    state: DomainState
    guest_agent: AgentState
    volumes: tuple[Volume, ...] = field(default=())
    memory: int = 0  # bytes of RAM the guest has now (what a memory file holds at most)

    def volume(self, target_or_id: str) -> Volume | None:
        for vol in self.volumes:
            if target_or_id in (vol.target, vol.volume_id):
                return vol
        return None

    def to_record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "guest_agent": self.guest_agent.value,
            "volumes": [vol.to_record() for vol in self.volumes],
        }


class Hypervisor(Protocol):
    """What gasnap needs from a hypervisor.  Every method may block on I/O and
    is therefore async; implementations keep blocking calls off the loop.

    Each backend provides the guest agent on its own transport (``agent``).
    """

    @property
    def agent(self) -> GuestAgent:
        """qemu-ga of this backend's domains (ping, freeze, thaw, ...)."""

    async def connect(self) -> None:
        """Reach the hypervisor now (calls reconnect by themselves anyway)."""

    async def close(self) -> None: ...

    @property
    def connected(self) -> bool:
        """Whether the backend is reachable now, as far as it knows without asking."""

    async def reachable(self) -> None:
        """Wait for a daemon between gasnap and QEMU that went away (a
        libvirtd restart) to answer again, up to the backend's outage bound;
        Unavailable past it.  Never called inside a freeze window."""

    async def domain_names(self) -> list[str]: ...

    async def list_domains(self, *, probe_agent: bool = False) -> list[Domain]: ...

    async def get_domain(self, name: str, *, probe_agent: bool = False,
                         uuid: str | None = None) -> Domain:
        """NAME as it is now, or with UUID the domain of that UUID whatever
        it is called now (its record carries the current name).  The guest
        agent's state comes from the definition alone (ABSENT or CONNECTED)
        unless ``probe_agent`` asks for a ping."""

    async def files_in_use(self, *, besides: frozenset[str] = frozenset()) -> set[str]:
        """The real path of every layer of every chain of every domain (but
        those whose UUID is in BESIDES), in its running and its persistent
        definition: what nothing may remove."""

    def hold(self, domains: dict[str, str]) -> AbstractAsyncContextManager[None]:
        """Keep DOMAINS (name -> UUID, from ``get_domain`` at plan time)
        resolved while the block runs, so that the calls inside reach the
        planned domains without resolving their names again; a name that no
        longer belongs to its planned domain fails here (DomainChanged)."""

    def unsupported(self, feature: Feature) -> str | None:
        """Why this backend cannot do FEATURE; None when it can."""

    def staging(self, name: str, overlays: dict[str, str]
                ) -> AbstractAsyncContextManager[None]:
        """Before the freeze: whatever making OVERLAYS (target -> path) the
        active layers of running domain NAME can do ahead, so that the
        switch in the window does the least; on leaving, whatever did not
        become active is undone."""

    async def switch_overlays(self, name: str, overlays: dict[str, str],
                              others: list[str], memory: str | None = None) -> float | None:
        """Running or paused domain: make each target's pre-created overlay its
        active layer, all at once; the disks in OTHERS stay as they are.  Called
        with the guest frozen: everything it can learn beforehand, it is told.
        MEMORY: save the RAM and device state there in the same instant, and
        return how many seconds the guest stood still."""

    async def restore(self, name: str, memory: str, overlays: dict[str, str], *,
                      paused: bool) -> None:
        """Stopped domain: run it again from MEMORY (saved by a switch), its
        disks on OVERLAYS; PAUSED: left paused."""

    async def define_overlays(self, name: str, overlays: dict[str, str]) -> None:
        """Stopped domain: point the persistent definition at the overlays."""

    async def define_disk_source(self, name: str, target: str, path: str, fmt: str) -> None:
        """Stopped domain: point one disk of the persistent definition at PATH."""

    async def start(self, name: str) -> None:
        """Start a stopped domain from its persistent definition."""

    async def shutdown(self, name: str, *, agent: bool) -> None:
        """Ask the guest to power off (through its agent, or ACPI); returns
        at once: the caller waits for the state, bounded."""

    async def destroy(self, name: str) -> None:
        """Power off at once; a domain that is already off is fine."""

    async def disk_targets(self, name: str) -> dict[str, str | None]:
        """Every disk target NAME uses (live or defined) and its serial."""

    async def attach_disk(self, name: str, path: str, target: str, serial: str, *,
                          readonly: bool) -> None:
        """Plug the qcow2 PATH in at TARGET (live when running, and in the
        definition)."""

    async def detach_disk(self, name: str, serial: str, *, timeout: float) -> None:
        """Unplug the disk with SERIAL, live (bounded wait for the guest)
        then from the definition; DetachTimeout leaves it attached."""

    async def block_commit(self, name: str, target: str, top: str, base: str, *,
                           active: bool, bandwidth: int = 0) -> None:
        """Start committing TOP into BASE (ACTIVE: TOP is the active layer)."""

    async def block_pull(self, name: str, target: str, base: str | None, *,
                         bandwidth: int = 0) -> None:
        """Start pulling everything above BASE into the active layer."""

    async def block_job_info(self, name: str, target: str) -> JobInfo | None: ...

    async def follow_block_job(self, name: str, target: str, *, want_ready: bool,
                               progress: Progress) -> JobEnd: ...

    async def pivot(self, name: str, target: str) -> None:
        """Finish an active commit that is ready: BASE becomes the active layer."""

    async def cancel_block_job(self, name: str, target: str) -> None:
        """Cancel the job on TARGET, not pivoting: an active commit not yet
        ready leaves the chain as it was."""
