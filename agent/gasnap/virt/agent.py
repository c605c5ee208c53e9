"""The guest agent's transport on libvirt: qemu-ga through libvirt's channel.

libvirt already owns the agent's socket, so gasnap speaks to qemu-ga through
``virDomainQemuAgentCommand`` rather than opening a second connection to it.
libvirt's agent errors become the guest-agent boundary's own errors here.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import libvirt
import libvirt_qemu

from ..errors import GasnapError
from ..guestagent import AgentAbsent, AgentCommandFailed, AgentUnresponsive
from .connection import Connection, map_error

# How long after gasnap (re)connected to libvirtd an agent "not connected"
# may be libvirtd still reconnecting to it, after its own restart.
AGENT_RECONNECT = 3.0
RECONNECT_POLL = 0.1
NOT_CONNECTED = "not connected"

# Resolves a domain name to its handle on a connection, in a worker thread.
Resolver = Callable[[libvirt.virConnect, str], libvirt.virDomain]


def map_agent_error(err: libvirt.libvirtError, what: str) -> GasnapError:
    code = err.get_error_code()
    message = f"{what}: {err.get_error_message()}"
    if code == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED:
        return AgentAbsent(message)
    if code in (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED):
        if NOT_CONNECTED in message:
            return AgentAbsent(message)
        return AgentUnresponsive(message)
    if code == libvirt.VIR_ERR_INTERNAL_ERROR and "agent command" in message:
        return AgentCommandFailed(message)
    return map_error(err, what)


class AgentChannel:
    """``guestagent.AgentTransport`` over libvirt's agent channel."""

    def __init__(self, connection: Connection, resolve: Resolver) -> None:
        self._connection = connection
        self._resolve = resolve

    async def agent_command(
        self, domain: str, command: str, arguments: dict[str, Any] | None, timeout: float
    ) -> Any:
        payload: dict[str, Any] = {"execute": command}
        if arguments is not None:
            payload["arguments"] = arguments
        # libvirt takes whole seconds; never round a short timeout down to "no wait".
        seconds = max(1, int(-(-timeout // 1)))
        text = json.dumps(payload)
        while True:
            try:
                raw = await self._connection.call(
                    lambda c: str(libvirt_qemu.qemuAgentCommand(self._resolve(c, domain),
                                                                text, seconds, 0)),
                    what=f"{domain}: {command}",
                    retry=False,  # an agent command may have side effects
                    mapper=map_agent_error,
                )
                break
            except AgentAbsent as err:
                # Never sent.  A libvirtd that has just restarted connects to
                # the guests' agents after it answers: not yet, not absent.
                settled = self._connection.opened_at + AGENT_RECONNECT
                if NOT_CONNECTED not in err.message or time.monotonic() >= settled:
                    raise
            await asyncio.sleep(RECONNECT_POLL)
        try:
            return json.loads(raw)["return"]
        except (ValueError, KeyError, TypeError) as err:
            raise AgentCommandFailed(f"{domain}: {command}: malformed reply {raw!r}") from err
