"""The guest agent's transport on bare QEMU: qemu-ga over ``NAME.qga``.

With no libvirt in between, gasnap opens the agent's socket itself, with
qemu.qmp's client: qemu-ga speaks QMP's wire format without a greeting or
capabilities negotiation.  The socket serves one client at a time, so
commands to one domain are serialised (within this process; other
processes may take turns on it).  A command that timed out leaves its
answer in the channel, to be read by the next client, whichever process it
is.  So every connection numbers its requests with ids no other connection
uses (a late answer meets an id nobody waits for, and is dropped), and
starts with ``guest-sync`` with a random token (its delimited form starts
with a 0xFF byte, which no JSON reader takes): qemu-ga answers in order,
so once the sync's answer is in, nothing older is left.  Every wait is
bounded.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.error import QMPError

from ..guestagent import AgentAbsent, AgentCommandFailed, AgentUnresponsive

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0


class _QgaClient(QMPClient):
    """qemu.qmp's client, speaking to qemu-ga (no greeting, no
    negotiation), with request ids unique to this connection."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.await_greeting = False
        self.negotiate = False
        self._prefix = secrets.token_hex(6)

    def _get_exec_id(self) -> str:
        # qemu.qmp numbers every connection's requests from 0: a late
        # answer to another connection's request N would be taken for ours.
        return f"gasnap-{self._prefix}-{super()._get_exec_id()}"


class QgaChannel:
    """``guestagent.AgentTransport`` over the guests' ``NAME.qga`` sockets.

    Each command connects and disconnects, leaving the socket to other
    tools, except for a *pinned* guest, whose connection stays open
    until it is unpinned (the freeze guard pins a guest while it is armed):
    qemu-ga, once its host side has gone, sleeps 100 ms before it reads
    again, and a freeze window must not pay that between freeze and thaw.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._locks: dict[str, asyncio.Lock] = {}
        self._pins: set[str] = set()
        self._open: dict[str, _QgaClient] = {}  # pinned guests' connections

    def socket_of(self, domain: str) -> Path:
        return self.run_dir / f"{domain}.qga"

    def pin(self, domain: str) -> None:
        self._pins.add(domain)

    async def unpin(self, domain: str) -> None:
        self._pins.discard(domain)
        async with self._lock(domain):
            client = self._open.pop(domain, None)
            if client is not None:
                await client.disconnect()

    def _lock(self, domain: str) -> asyncio.Lock:
        return self._locks.setdefault(domain, asyncio.Lock())

    async def agent_command(
        self, domain: str, command: str, arguments: dict[str, Any] | None, timeout: float
    ) -> Any:
        async with self._lock(domain):
            client = self._open.pop(domain, None)
            # A held connection's last answer came in, and nothing else was
            # asked on it: nothing stale is left to sync past.
            sync = client is None
            if client is None:
                client = await self._connect(domain, f"{domain}: {command}")
            ok = False
            try:
                result = await self._command(client, domain, command, arguments, timeout,
                                             sync=sync)
                ok = True
                return result
            finally:
                # A connection that failed is never used again: what it
                # was left holding is unknown.
                if ok and domain in self._pins:
                    self._open[domain] = client
                else:
                    await client.disconnect()

    async def _connect(self, domain: str, what: str) -> _QgaClient:
        path = self.socket_of(domain)
        client = _QgaClient(f"gasnap-qga-{domain}")
        try:
            await asyncio.wait_for(client.connect(str(path)), CONNECT_TIMEOUT)
        except (OSError, QMPError, TimeoutError) as err:
            await client.disconnect()
            raise AgentAbsent(f"{what}: no guest agent socket at {path} ({err})") from err
        return client

    @staticmethod
    async def _command(client: _QgaClient, domain: str, command: str,
                       arguments: dict[str, Any] | None, timeout: float, *,
                       sync: bool) -> Any:
        what = f"{domain}: {command}"
        try:
            token = random.randint(1, 2**31 - 1)  # noqa: S311 (a sync id, not a secret)
            synced = await asyncio.wait_for(
                client.execute("guest-sync", {"id": token}), timeout) if sync else token
            if synced != token:
                raise AgentUnresponsive(f"{what}: guest-sync answered {synced!r}")
            return await asyncio.wait_for(client.execute(command, arguments), timeout)
        except TimeoutError as err:
            raise AgentUnresponsive(f"{what}: no answer within {timeout:.1f}s") from err
        except ExecuteError as err:
            raise AgentCommandFailed(f"{what}: {err.error.error.desc}") from err
        except QMPError as err:
            raise AgentUnresponsive(f"{what}: {err}") from err
