"""The bench's parts: lab guests named ``gb-*``, a real agent process, timed
commands, freeze windows read from the guests' own fsfreeze-hook logs, and
the wait for a settled host before anything is timed."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..client import ApiClient
from ..hypervisor import Hypervisor
from ..lab.guests import Lab
from ..lab.workload import freeze_log
from ..virt import LibvirtHypervisor
from .stats import Figure

URI = "qemu:///system"
PREFIX = "gb-"
# The installed entry point, as operators run it (``python -m`` would add runpy).
_SCRIPT = Path(sys.executable).with_name("gasnap")
GASNAP = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gasnap.cli.main"]


def run(argv: list[str], env: dict[str, str] | None = None) -> float:
    """Run ARGV to completion; its wall time in seconds (monotonic)."""
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})})
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])}... exited {proc.returncode}: "
                           f"{proc.stderr.strip()[-500:]}")
    return elapsed


async def timed_task(argv: list[str]) -> tuple[dict[str, Any], float]:
    """Run a CLI command that prints a finished task (--json); the task and
    the wall time.  A task that failed stops the benchmark."""
    started = time.monotonic()
    out = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True,
                                  check=True)
    task: dict[str, Any] = json.loads(out.stdout)
    if task["state"] != "succeeded":
        raise RuntimeError(f"{' '.join(argv[3:6])} failed: {task}")
    return task, time.monotonic() - started


async def timed(argv: list[str]) -> float:
    return await asyncio.to_thread(run, argv)


class Agent:
    """``gasnap serve`` as a process on a private socket and state dir."""

    def __init__(self, base: Path, config: str | None = None) -> None:
        self.base = base
        self.config = config  # the agent's TOML, if not the defaults
        self.api = f"unix:{base / 'api.sock'}"
        self.state_dir = base / "state"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Agent:
        self.base.mkdir(parents=True, exist_ok=True)
        log = (self.base / "agent.log").open("ab")
        argv = [*GASNAP, "serve", "--listen", self.api, "--state-dir", str(self.state_dir),
                "--libvirt-uri", URI]
        if self.config is not None:
            (self.base / "agent.toml").write_text(self.config)
            argv += ["--config", str(self.base / "agent.toml")]
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        client = ApiClient(self.api)
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(Exception):
                if client.get("/v1/health")["recovery"] == "done":
                    return self
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"the agent did not start (see {self.base}/agent.log)")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def rss_mib(self) -> float:
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines()
                   if line.startswith("VmRSS:"))
        return kib / 1024

    def cli(self, *args: str) -> list[str]:
        return [*GASNAP, "--api", self.api, *args]


@contextlib.asynccontextmanager
async def guests(hv: LibvirtHypervisor, names: list[str], *, disks: int = 1,
                 size_mib: int = 32) -> AsyncIterator[list[str]]:
    """Lab guests NAMES (booted together), removed afterwards."""
    lab = Lab(hv)
    try:
        await asyncio.gather(*(lab.up(n, disks=disks, size_mib=size_mib) for n in names))
        yield names
    finally:
        for name in names:
            with contextlib.suppress(Exception):
                await lab.down(name)


async def reap(hv: LibvirtHypervisor) -> None:
    """Bench guests left by an interrupted run."""
    lab = Lab(hv)
    for name in await lab.names():
        if name.startswith(PREFIX):
            await lab.down(name)


async def log_length(hv: Hypervisor, domain: str) -> int:
    return len(await freeze_log(hv, domain))


async def window_ms(hv: Hypervisor, domain: str, since: int) -> float:
    """The freeze window of the one quiesced snapshot taken after entry SINCE
    of the guest's hook log: thaw minus freeze, guest-monotonic, in ms.  qemu-ga
    runs the thaw hook even when nothing was frozen: only a freeze followed by
    a thaw counts."""
    entries = (await freeze_log(hv, domain))[since:]
    for (event, ns), (nxt, ns2) in itertools.pairwise(entries):
        if event == "freeze" and nxt == "thaw":
            return (ns2 - ns) / 1e6
    raise RuntimeError(f"{domain}: no freeze/thaw pair in its hook log after entry {since}")


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="gasnap-bench-", dir="/var/tmp"))


# --- a settled host -----------------------------------------------------------------

# Freshly booted TCG guests keep a core busy for a while (the "idle"
# guests at 38 %): nothing is timed until the host's CPUs have been below
# SETTLED_BELOW for SETTLED_FOR seconds, waiting at most SETTLE_WAIT.
SETTLED_BELOW = 25.0  # percent of all cores
SETTLED_FOR = 3.0
SETTLE_WAIT = 180.0


@dataclass(frozen=True)
class Settled:
    busy: float  # percent of all cores over the last SETTLED_FOR seconds
    waited: float  # seconds
    settled: bool  # False: SETTLE_WAIT passed first


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_busy(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Percent of all cores' time that was busy between BEFORE and AFTER."""
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total else 0.0


async def settle(below: float = SETTLED_BELOW, bound: float = SETTLE_WAIT) -> Settled:
    """Until the host's CPUs have been quiet for SETTLED_FOR seconds, or BOUND passed."""
    started = time.monotonic()
    while True:
        before = cpu_times()
        await asyncio.sleep(SETTLED_FOR)
        busy = cpu_busy(before, cpu_times())
        waited = time.monotonic() - started
        if busy < below or waited >= bound:
            return Settled(busy, waited, busy < below)


def settled_figure(case: str, settles: list[Settled], *, where: str = "",
                   below: float = SETTLED_BELOW) -> Figure:
    """What the host was doing when CASE's timing began (each wait's last
    SETTLED_FOR seconds), as a reference row."""
    waits = [s.waited for s in settles]
    missed = sum(not s.settled for s in settles)
    note = (f"waited {min(waits):.0f}-{max(waits):.0f} s for {SETTLED_FOR:g} s below "
            f"{below:g} %")
    if missed:
        note += f"; NOT SETTLED in {missed} of {len(settles)} waits ({SETTLE_WAIT:g} s each)"
    what = "host CPU busy when timing began" + (f" ({where})" if where else "")
    return Figure(case, what, "%", [s.busy for s in settles], None, note=note)
