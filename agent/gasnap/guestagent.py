"""The QEMU guest agent boundary: qemu-ga's protocol over a hypervisor's transport.

Each hypervisor backend provides a ``GuestAgent`` (``Hypervisor.agent``) on
its own transport: for libvirt, libvirt's agent channel (``virt.agent``), so
gasnap never opens a second connection to the agent's socket.  Every call
has an explicit timeout: a hung agent must cost a bounded time, never a
stuck task.
"""

from __future__ import annotations

import enum
import logging
from typing import Any, Protocol

from . import metrics
from .errors import Conflict, GasnapError

log = logging.getLogger(__name__)

PING_TIMEOUT = 2.0
THAW_TIMEOUT = 5.0  # a thaw must not wait as long as a freeze may


class GuestAgentError(GasnapError):
    code = "guest_agent"


class AgentAbsent(GuestAgentError, Conflict):
    """No agent channel, or nothing listening inside the guest."""

    code = "guest_agent_absent"


class AgentUnresponsive(GuestAgentError, Conflict):
    """The agent did not answer within the timeout."""

    code = "guest_agent_unresponsive"


class AgentCommandFailed(GuestAgentError, Conflict):
    """The agent answered with an error (a failing fsfreeze hook, say)."""

    code = "guest_agent_command_failed"


class FreezeState(enum.Enum):
    THAWED = "thawed"
    FROZEN = "frozen"


class AgentTransport(Protocol):
    async def agent_command(
        self, domain: str, command: str, arguments: dict[str, Any] | None, timeout: float
    ) -> Any: ...


class GuestAgent:
    """qemu-ga commands gasnap relies on, for any domain of one transport."""

    def __init__(self, transport: AgentTransport) -> None:
        self._transport = transport

    async def command(self, domain: str, command: str, arguments: dict[str, Any] | None,
                      timeout: float) -> Any:
        """Any qemu-ga command, its reply's ``return`` (the lab's guest-exec)."""
        try:
            return await self._transport.agent_command(domain, command, arguments, timeout)
        except GuestAgentError as err:
            metrics.GUEST_AGENT_FAILURES.labels(command, err.code).inc()
            raise

    async def _run(self, domain: str, command: str, timeout: float) -> Any:
        return await self.command(domain, command, None, timeout)

    async def ping(self, domain: str, timeout: float = PING_TIMEOUT) -> None:
        await self._run(domain, "guest-ping", timeout)

    async def fsfreeze_status(self, domain: str, timeout: float) -> FreezeState:
        reply = await self._run(domain, "guest-fsfreeze-status", timeout)
        try:
            return FreezeState(reply)
        except ValueError as err:
            raise AgentCommandFailed(f"{domain}: unexpected fsfreeze status {reply!r}") from err

    async def fsfreeze(self, domain: str, timeout: float) -> int:
        """Freeze every filesystem; returns how many were frozen."""
        reply = await self._run(domain, "guest-fsfreeze-freeze", timeout)
        return int(reply)

    async def fsthaw(self, domain: str, timeout: float) -> int:
        """Thaw every filesystem; returns how many were thawed (0 if none was frozen)."""
        reply = await self._run(domain, "guest-fsfreeze-thaw", timeout)
        return int(reply)

    async def fsinfo(self, domain: str, timeout: float) -> list[dict[str, Any]]:
        reply = await self._run(domain, "guest-get-fsinfo", timeout)
        return list(reply)
