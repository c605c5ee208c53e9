"""The freeze guard: no guest stays frozen past ``freeze_timeout``, even if the
agent is killed with SIGKILL while guests are frozen.

Linux qemu-ga never thaws by itself, so the guard cannot live in the agent's
process.  The agent starts one guard process, in its own session so that a
signal to the agent does not reach it, and talks to it over a pipe:

* ``arm`` DOMAINS TIMEOUT before freezing: the guard starts a deadline per
  domain on its own monotonic clock;
* ``disarm`` DOMAINS once the agent has thawed them.

The guard thaws an armed domain when its deadline passes, and thaws every
armed domain at once when the pipe closes (the agent died, however) or when
it receives SIGTERM (systemd stopping the service).  It uses its own libvirt
connection and the same guest-agent code as the agent.

Run as ``python -m gasnap.freezeguard --uri URI``; protocol: one JSON object
per line each way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from .errors import GasnapError, Unavailable
from .guestagent import GuestAgentError

log = logging.getLogger(__name__)

THAW_TIMEOUT = 5.0
THAW_RETRY_FOR = 30.0  # a dead agent's freeze may still hold qemu-ga for a moment
START_TIMEOUT = 30.0


class FreezeGuardError(Unavailable):
    code = "freeze_guard_unavailable"


# --- the agent's side -------------------------------------------------------


class FreezeGuard:
    """Handle on the guard process, owned by the agent."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            await self._ensure()

    async def _ensure(self) -> asyncio.subprocess.Process:
        if self._proc is not None and self._proc.returncode is None:
            return self._proc
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gasnap.freezeguard", "--uri", self.uri,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        self._proc = proc
        try:
            reply = await self._read(proc, START_TIMEOUT)
        except FreezeGuardError:
            proc.kill()
            await proc.wait()
            raise
        if reply.get("ready") is not True:
            raise FreezeGuardError(f"freeze guard did not start: {reply}")
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

    async def _call(self, doc: dict[str, Any]) -> None:
        async with self._lock:
            proc = await self._ensure()
            assert proc.stdin is not None
            try:
                proc.stdin.write(json.dumps(doc).encode() + b"\n")
                await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError) as err:
                raise FreezeGuardError("freeze guard is gone") from err
            reply = await self._read(proc, 10)
            if not reply.get("ok"):
                raise FreezeGuardError(f"freeze guard refused {doc['op']}: {reply}")

    async def arm(self, domains: list[str], timeout: float) -> None:
        await self._call({"op": "arm", "domains": domains, "timeout": timeout})

    async def disarm(self, domains: list[str]) -> None:
        await self._call({"op": "disarm", "domains": domains})

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        assert proc.stdin is not None
        try:
            proc.stdin.write(b'{"op": "exit"}\n')
            await proc.stdin.drain()
            proc.stdin.close()
            await asyncio.wait_for(proc.wait(), 10)
        except (OSError, TimeoutError):
            log.warning("freeze guard did not exit; killing it")
            proc.kill()
            await proc.wait()


# --- the guard process -------------------------------------------------------


class _Guard:
    def __init__(self, uri: str) -> None:
        from .virt import LibvirtHypervisor  # noqa: PLC0415 - only in the guard process

        self.hv = LibvirtHypervisor(uri)
        self.armed: dict[str, asyncio.TimerHandle] = {}
        self.pending: set[asyncio.Task[None]] = set()

    def arm(self, domains: list[str], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        for name in domains:
            self._cancel(name)
            self.armed[name] = loop.call_later(timeout, self._expire, name)

    def disarm(self, domains: list[str]) -> None:
        for name in domains:
            self._cancel(name)
            self.armed.pop(name, None)

    def _cancel(self, name: str) -> None:
        handle = self.armed.get(name)
        if handle is not None:
            handle.cancel()

    def _expire(self, name: str) -> None:
        self.armed.pop(name, None)
        log.warning("freeze guard: %s still frozen at its deadline; thawing", name)
        task = asyncio.get_running_loop().create_task(self.thaw(name))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def thaw(self, name: str) -> None:
        deadline = time.monotonic() + THAW_RETRY_FOR
        while True:
            try:
                count = await self.hv.agent.fsthaw(name, THAW_TIMEOUT)
                log.warning("freeze guard: thawed %s (%d filesystems)", name, count)
                return
            except GuestAgentError as err:
                if time.monotonic() >= deadline:
                    log.error("freeze guard: cannot thaw %s: %s", name, err)
                    return
            except GasnapError as err:
                log.error("freeze guard: cannot thaw %s: %s", name, err)
                return
            await asyncio.sleep(0.2)

    async def thaw_all(self) -> None:
        names = list(self.armed)
        self.disarm(names)
        await asyncio.gather(*(self.thaw(n) for n in names), *self.pending)


def _reply(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


async def _serve(uri: str) -> None:
    loop = asyncio.get_running_loop()
    guard = _Guard(uri)
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
            if doc["op"] == "arm":
                guard.arm(list(doc["domains"]), float(doc["timeout"]))
            elif doc["op"] == "disarm":
                guard.disarm(list(doc["domains"]))
            elif doc["op"] == "exit":
                break
            _reply({"ok": True})
    finally:
        await guard.thaw_all()
        await guard.hv.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="gasnap-freezeguard")
    parser.add_argument("--uri", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING,  # it speaks only when it thaws
                        format="%(asctime)s %(levelname)s gasnap.freezeguard: %(message)s")
    # The agent's terminal going away must not take the guard with it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    asyncio.run(_serve(args.uri))


if __name__ == "__main__":
    main()
