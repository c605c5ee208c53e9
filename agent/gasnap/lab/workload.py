"""Running things inside lab guests through qemu-ga: commands, files, load.

Used by tests, the demo and the benchmarks; not by the agent's workflows.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass

from ..guestagent import AgentCommandFailed
from ..hypervisor import Hypervisor

EXEC_TIMEOUT = 60.0
FREEZE_LOG = "/var/log/gasnap-fsfreeze.log"


@dataclass(frozen=True)
class ExecResult:
    exitcode: int
    stdout: str
    stderr: str


async def guest_exec(hv: Hypervisor, domain: str, argv: list[str],
                     timeout: float = EXEC_TIMEOUT) -> ExecResult:
    """Run ARGV in the guest and wait for it (guest-exec + guest-exec-status)."""
    started = await hv.agent.command(
        domain, "guest-exec",
        {"path": argv[0], "arg": argv[1:], "capture-output": True}, 10,
    )
    pid = started["pid"]
    deadline = time.monotonic() + timeout
    while True:
        status = await hv.agent.command(domain, "guest-exec-status", {"pid": pid}, 10)
        if status.get("exited"):
            return ExecResult(
                int(status.get("exitcode", -1)),
                base64.b64decode(status.get("out-data", "")).decode(errors="replace"),
                base64.b64decode(status.get("err-data", "")).decode(errors="replace"),
            )
        if time.monotonic() >= deadline:
            raise AgentCommandFailed(f"{domain}: {argv[0]} still running after {timeout}s")
        await asyncio.sleep(0.1)


async def sh(hv: Hypervisor, domain: str, script: str, timeout: float = EXEC_TIMEOUT) -> str:
    """Run a shell snippet in the guest; its stdout, or an error when it fails."""
    result = await guest_exec(hv, domain, ["/bin/sh", "-c", script], timeout)
    if result.exitcode != 0:
        raise AgentCommandFailed(
            f"{domain}: {script!r} exited {result.exitcode}: {result.stderr.strip()}"
        )
    return result.stdout


async def read_file(hv: Hypervisor, domain: str, path: str) -> bytes:
    handle = await hv.agent.command(domain, "guest-file-open", {"path": path, "mode": "r"}, 10)
    chunks: list[bytes] = []
    try:
        while True:
            part = await hv.agent.command(
                domain, "guest-file-read", {"handle": handle, "count": 65536}, 10
            )
            chunks.append(base64.b64decode(part.get("buf-b64", "")))
            if part.get("eof") or not part.get("count"):
                break
    finally:
        await hv.agent.command(domain, "guest-file-close", {"handle": handle}, 10)
    return b"".join(chunks)


async def start_load(hv: Hypervisor, domain: str) -> None:
    """Start the fsync'd write workload on every data disk of the guest."""
    await sh(hv, domain, "gasnap-load start")


async def stop_load(hv: Hypervisor, domain: str) -> None:
    await sh(hv, domain, "gasnap-load stop")


async def freeze_log(hv: Hypervisor, domain: str) -> list[tuple[str, int]]:
    """The guest's fsfreeze hook log: (``freeze``|``thaw``, monotonic ns) lines."""
    text = (await read_file(hv, domain, FREEZE_LOG)).decode()
    entries = []
    for line in text.splitlines():
        event, _, ns = line.partition(" ")
        if event in ("freeze", "thaw") and ns.isdigit():
            entries.append((event, int(ns)))
    return entries
