"""The freeze guard: no guest stays frozen past ``freeze_timeout``, even if the
agent is killed with SIGKILL while guests are frozen.

Linux qemu-ga never thaws by itself, so the guard cannot live in the agent's
process.  The agent starts one guard process, in its own session so that a
signal to the agent does not reach it, and talks to it over a pipe:

* ``arm`` DOMAINS TIMEOUT OWNER before freezing: the guard starts a
  deadline per domain on its own monotonic clock, for that owner (the
  operation freezing);
* ``disarm`` DOMAINS OWNER once the owner has thawed them: a domain armed
  by another owner is left armed, so nobody cancels a deadline it did not set.

* ``agent`` DOMAIN COMMAND ARGUMENTS TIMEOUT (bare QEMU): a guest-agent
  command sent by the guard.  It holds one connection to each armed
  guest's qemu-ga (``NAME.qga`` takes one client, and qemu-ga sleeps
  100 ms after a client leaves), so the agent's freeze and thaw travel on
  it, and the guard's own thaw needs no connection the agent could be
  holding.  The reply comes when the command is done; other requests are
  served meanwhile.

The guard thaws an armed domain when its deadline passes, and thaws every
armed domain at once when the pipe closes (the agent died, however) or when
it receives SIGTERM (systemd stopping the service).  A thaw is retried,
through guest-agent errors and libvirtd restarts alike, until it succeeds
or the domain is no longer running.  It uses its own libvirt connection and
the same guest-agent code as the agent.

Run as ``python -m gasnap.freezeguard --uri URI``; protocol: one JSON object
per line each way, each reply carrying the ``id`` of its request (a reply
that comes after its request timed out is recognised and dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import GasnapError, NotFound, Unavailable
from .guestagent import (
    THAW_TIMEOUT,
    AgentAbsent,
    AgentCommandFailed,
    AgentTransport,
    AgentUnresponsive,
    GuestAgentError,
)
from .hypervisor import DomainState, Hypervisor

log = logging.getLogger(__name__)

THAW_PAUSE_MAX = 5.0  # between thaw attempts, growing from 0.2 s
START_TIMEOUT = 30.0
REPLY_TIMEOUT = 10.0


class FreezeGuardError(Unavailable):
    code = "freeze_guard_unavailable"


# --- the agent's side -------------------------------------------------------

_AGENT_ERRORS: dict[str, type[GuestAgentError]] = {
    cls.code: cls for cls in (AgentAbsent, AgentUnresponsive, AgentCommandFailed)}


class FreezeGuard:
    """Handle on the guard process, owned by the agent.  Requests may be
    under way at once (a freeze waits on one guest while another window
    arms): each reply is handed to its request by id."""

    def __init__(self, uri: str, *, qmp_run_dir: Path | None = None) -> None:
        self.uri = uri
        # The guard reaches the guests the way the agent does.
        self.backend = (["--qmp-run-dir", str(qmp_run_dir)] if qmp_run_dir is not None
                        else ["--uri", uri])
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.armed: set[str] = set()  # domains this agent armed and has not disarmed

    async def start(self) -> None:
        async with self._lock:
            await self._ensure()

    async def _ensure(self) -> asyncio.subprocess.Process:
        if self._proc is not None and self._proc.returncode is None:
            return self._proc
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gasnap.freezeguard", *self.backend,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        self._proc = proc
        self.armed.clear()  # a new guard holds no deadline
        try:
            reply = await self._read(proc, START_TIMEOUT)
        except FreezeGuardError:
            proc.kill()
            await proc.wait()
            raise
        if reply.get("ready") is not True:
            raise FreezeGuardError(f"freeze guard did not start: {reply}")
        self._reader = asyncio.get_running_loop().create_task(self._dispatch(proc))
        log.info("freeze guard running (pid %d)", proc.pid)
        return proc

    @staticmethod
    async def _read(proc: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        except TimeoutError as err:
            raise FreezeGuardError("freeze guard did not answer") from err
        if not line:
            raise FreezeGuardError("freeze guard exited")
        doc: dict[str, Any] = json.loads(line)
        return doc

    async def _dispatch(self, proc: asyncio.subprocess.Process) -> None:
        """Each reply to the request waiting for it; one whose request
        timed out meanwhile is dropped, never taken for another's."""
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            reply = json.loads(line)
            waiting = self._waiting.get(reply.get("id", -1))
            if waiting is None or waiting.done():
                log.warning("freeze guard: dropped a late reply %s", reply)
            else:
                waiting.set_result(reply)
        for waiting in self._waiting.values():
            if not waiting.done():
                waiting.set_exception(FreezeGuardError("freeze guard exited"))

    async def _call(self, doc: dict[str, Any], timeout: float = 0.0) -> dict[str, Any]:
        """DOC's reply, within REPLY_TIMEOUT plus TIMEOUT (what the guard may
        itself wait, for a guest agent)."""
        request = next(self._ids)
        waiting: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        async with self._lock:
            proc = await self._ensure()
            assert proc.stdin is not None
            self._waiting[request] = waiting
            try:
                proc.stdin.write(json.dumps({**doc, "id": request}).encode() + b"\n")
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError) as err:
                del self._waiting[request]
                raise FreezeGuardError("freeze guard is gone") from err
        try:
            reply = await asyncio.wait_for(waiting, REPLY_TIMEOUT + timeout)
        except TimeoutError as err:
            raise FreezeGuardError("freeze guard did not answer") from err
        finally:
            del self._waiting[request]
        if not reply.get("ok"):
            raise FreezeGuardError(f"freeze guard refused {doc['op']}: "
                                   f"{reply.get('error', reply)}", reply=reply)
        return reply

    async def arm(self, domains: list[str], timeout: float, *, owner: str) -> None:
        await self._call({"op": "arm", "domains": domains, "timeout": timeout,
                          "owner": owner})
        self.armed.update(domains)

    async def disarm(self, domains: list[str], *, owner: str, thawed: bool = False) -> None:
        """THAWED: the owner thawed DOMAINS itself (on a connection of its
        own, which the guard cannot see)."""
        self.armed.difference_update(domains)
        await self._call({"op": "disarm", "domains": domains, "owner": owner,
                          "thawed": thawed})

    async def agent_command(self, domain: str, command: str,
                            arguments: dict[str, Any] | None, timeout: float) -> Any:
        """A guest-agent command sent by the guard, on the connection it
        holds to the guest while the domain is armed (see ``GuardedAgent``)."""
        try:
            reply = await self._call({"op": "agent", "domain": domain, "command": command,
                                      "arguments": arguments, "timeout": timeout}, timeout)
        except FreezeGuardError as err:
            failed = err.details.get("reply")
            if failed is None or "agent_error" not in failed:
                raise
            kind = _AGENT_ERRORS.get(failed["agent_error"], AgentUnresponsive)
            raise kind(str(failed.get("error", ""))) from err
        return reply.get("result")

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if self._reader is not None:
            self._reader.cancel()
        if proc is None or proc.returncode is not None:
            return
        assert proc.stdin is not None
        try:
            proc.stdin.write(b'{"op": "exit"}\n')
            await proc.stdin.drain()
            proc.stdin.close()
            await asyncio.wait_for(proc.wait(), 10)
        except OSError:
            log.warning("freeze guard did not take its exit; killing it")
            proc.kill()
            await proc.wait()
        except TimeoutError:
            # It thaws whatever is still armed before it exits, retrying
            # until each guest is thawed or gone: killed now, a guest would
            # stay frozen.  It runs in its own session and ends by itself.
            log.warning("freeze guard (pid %d) is still thawing; left to finish", proc.pid)


class GuardedChannel:
    """``guestagent.AgentTransport`` that sends the commands for guests the
    guard holds armed through the guard (bare QEMU: the guard keeps one
    connection to each armed guest's qemu-ga, from freeze to thaw, and the
    socket takes one client), and the others on DIRECT."""

    def __init__(self, direct: AgentTransport, guard: FreezeGuard) -> None:
        self.direct = direct
        self.guard = guard

    async def agent_command(
        self, domain: str, command: str, arguments: dict[str, Any] | None, timeout: float
    ) -> Any:
        if domain in self.guard.armed:
            return await self.guard.agent_command(domain, command, arguments, timeout)
        return await self.direct.agent_command(domain, command, arguments, timeout)


# --- the guard process -------------------------------------------------------


@dataclass
class _Armed:
    owner: str
    timer: asyncio.TimerHandle


class Pins(Protocol):
    """A guest-agent transport that can keep one connection per guest
    (bare QEMU's qga sockets: see ``GuardedAgent``)."""

    def pin(self, domain: str) -> None: ...

    async def unpin(self, domain: str) -> None: ...


class _Guard:
    def __init__(self, hv: Hypervisor, pins: Pins | None = None) -> None:
        self.hv = hv
        self.pins = pins
        self.armed: dict[str, _Armed] = {}
        # domains whose deadline thaw is being sent right now: nobody may arm
        # them until it returns (it could land inside their freeze); between
        # two tries, an arm takes the domain over and the retrying stops
        self.in_flight: set[str] = set()
        # domains whose deadline thaw a later arm took over: still owed
        # until that owner thaws the guest (through the guard, or saying so
        # at its disarm); an owner that lets go without thawing (its freeze
        # was refused: the guest was still frozen) hands the thaw back
        self.owed: set[str] = set()
        self.pending: set[asyncio.Task[None]] = set()
        self.commands: set[asyncio.Task[None]] = set()

    def arm(self, domains: list[str], timeout: float, owner: str) -> str | None:
        """Arm every one of DOMAINS for OWNER, or none (the error)."""
        taken = [d for d in domains if d in self.armed and self.armed[d].owner != owner]
        if taken:
            return f"{', '.join(taken)} armed by another operation"
        thawing = [d for d in domains if d in self.in_flight]
        if thawing:
            return (f"{', '.join(thawing)} is being thawed after an earlier deadline; "
                    "a freeze now could be undone by that thaw")
        loop = asyncio.get_running_loop()
        for name in domains:
            self._drop(name)
            self.armed[name] = _Armed(owner, loop.call_later(timeout, self._expire, name))
            if self.pins is not None:
                self.pins.pin(name)
        return None

    def disarm(self, domains: list[str], owner: str | None, *, thawed: bool = False
               ) -> list[str]:
        """OWNER None: every one (the guard's own shutdown).  Returns those
        disarmed."""
        dropped = []
        for name in domains:
            armed = self.armed.get(name)
            if armed is not None and owner in (None, armed.owner):
                self._drop(name)
                dropped.append(name)
                if thawed:
                    self.owed.discard(name)  # paid by its owner
                elif owner is not None and name in self.owed:
                    log.warning("freeze guard: %s let go unthawed; thawing it for the "
                                "earlier deadline", name)
                    self._thaw_later(name)
        return dropped

    async def unpin(self, domains: list[str]) -> None:
        """Let go of the connections held to DOMAINS' guest agents (once
        nobody armed them any more)."""
        if self.pins is not None:
            for name in domains:
                if name not in self.armed:
                    await self.pins.unpin(name)

    def command(self, doc: dict[str, Any]) -> None:
        """Run a guest-agent command for the agent, on the held connection;
        the reply goes out when it is done (others are served meanwhile)."""
        task = asyncio.get_running_loop().create_task(self._command(doc))
        self.commands.add(task)
        task.add_done_callback(self.commands.discard)

    async def _command(self, doc: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"id": doc.get("id"), "ok": True}
        try:
            reply["result"] = await self.hv.agent.command(
                str(doc["domain"]), str(doc["command"]), doc.get("arguments"),
                float(doc["timeout"]))
            if doc["command"] == "guest-fsfreeze-thaw":
                self.owed.discard(str(doc["domain"]))  # thawed by its owner
        except GuestAgentError as err:
            reply.update(ok=False, agent_error=err.code, error=err.message)
        except GasnapError as err:
            reply.update(ok=False, error=err.message)
        _reply(reply)

    def _drop(self, name: str) -> None:
        armed = self.armed.pop(name, None)
        if armed is not None:
            armed.timer.cancel()

    def _expire(self, name: str) -> None:
        self.armed.pop(name, None)
        log.warning("freeze guard: %s still frozen at its deadline; thawing", name)
        self._thaw_later(name)

    def _thaw_later(self, name: str) -> None:
        self.owed.discard(name)
        task = asyncio.get_running_loop().create_task(self._thaw_and_unpin(name))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def thaw(self, name: str) -> None:
        """Until the thaw succeeds: guest-agent errors and libvirtd restarts
        are waited out; only a domain that no longer runs ends it."""
        from .virt import DomainNotRunning  # noqa: PLC0415 - only in the guard process

        pause = 0.2
        while True:
            if name in self.armed:
                # A later owner armed it between two tries: its freeze, its
                # thaw and its deadline now; this thaw must not land in them.
                # Owed until that owner thaws (see disarm).
                log.warning("freeze guard: %s armed again; its new owner thaws it", name)
                self.owed.add(name)
                return
            try:
                self.in_flight.add(name)
                try:
                    count = await self.hv.agent.fsthaw(name, THAW_TIMEOUT)
                finally:
                    self.in_flight.discard(name)
                log.warning("freeze guard: thawed %s (%d filesystems)", name, count)
                return
            except NotFound as err:
                log.warning("freeze guard: %s no longer runs: %s", name, err.message)
                return
            except GasnapError as err:
                # Paused is not stopped (QEMU pauses a guest whose disk
                # filled up): a freeze it got before will land once it runs.
                if isinstance(err, (AgentAbsent, DomainNotRunning)) and \
                        not await self._runs(name):
                    log.warning("freeze guard: %s no longer runs", name)
                    return
                log.error("freeze guard: cannot thaw %s yet (%s); retrying in %.1fs",
                          name, err.message, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, THAW_PAUSE_MAX)

    async def _thaw_and_unpin(self, name: str) -> None:
        await self.thaw(name)
        await self.unpin([name])

    async def _runs(self, name: str) -> bool:
        """Whether NAME still runs, as far as the backend can tell now (an
        agent's socket gone with its QEMU says nothing by itself)."""
        try:
            dom = await self.hv.get_domain(name)
        except NotFound:
            return False
        except GasnapError:
            return True  # cannot tell: keep trying
        return dom.state in (DomainState.RUNNING, DomainState.PAUSED, DomainState.BLOCKED)

    async def thaw_all(self) -> None:
        for task in list(self.commands):
            task.cancel()
        names = self.disarm(list(self.armed), None)
        await asyncio.gather(*(self._thaw_and_unpin(n) for n in names), *self.pending)


def _reply(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def _backend(uri: str | None, qmp_run_dir: str | None) -> _Guard:
    # Imported here: only the guard process needs either.
    if qmp_run_dir is not None:
        from .qmp.backend import QmpHypervisor  # noqa: PLC0415

        qmp = QmpHypervisor(Path(qmp_run_dir))
        return _Guard(qmp, qmp.qga)
    from .virt import LibvirtHypervisor  # noqa: PLC0415

    return _Guard(LibvirtHypervisor(uri or "qemu:///system"))


async def _serve(guard: _Guard) -> None:
    loop = asyncio.get_running_loop()
    await guard.hv.connect()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    _reply({"ready": True, "pid": os.getpid()})
    stopper = loop.create_task(stop.wait())
    try:
        while True:
            reading = loop.create_task(reader.readline())
            await asyncio.wait({reading, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stopper.done():
                reading.cancel()
                log.warning("freeze guard: signalled; thawing %s", sorted(guard.armed) or "none")
                break
            line = reading.result()
            if not line:
                if guard.armed:
                    log.warning("freeze guard: agent gone; thawing %s", sorted(guard.armed))
                break
            doc = json.loads(line)
            error = None
            if doc["op"] == "arm":
                error = guard.arm(list(doc["domains"]), float(doc["timeout"]),
                                  str(doc["owner"]))
            elif doc["op"] == "disarm":
                await guard.unpin(guard.disarm(list(doc["domains"]), str(doc["owner"]),
                                               thawed=bool(doc.get("thawed"))))
            elif doc["op"] == "agent":
                guard.command(doc)  # replies by itself
                continue
            elif doc["op"] == "exit":
                break
            _reply({"id": doc.get("id"), "ok": error is None, "error": error})
    finally:
        await guard.thaw_all()
        await guard.hv.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="gasnap-freezeguard")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--uri")
    where.add_argument("--qmp-run-dir")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING,  # it speaks only when it thaws
                        format="%(asctime)s %(levelname)s gasnap.freezeguard: %(message)s")
    # The agent's terminal going away must not take the guard with it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    asyncio.run(_serve(_backend(args.uri, args.qmp_run_dir)))


if __name__ == "__main__":
    main()
