"""Shared fixtures: one libvirt connection, session-scoped lab guests, a running agent.

Lab guests are real TCG domains booted from the lab image; they are created
once per session and reused.  Every lab guest of the tests is named ``gt-*``,
and leftovers of an earlier, interrupted run are reaped before the first one
boots.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gasnap.client import ApiClient
from gasnap.hypervisor import Domain
from gasnap.lab.guests import Lab
from gasnap.virt import LibvirtHypervisor

URI = "qemu:///system"
PREFIX = "gt-"
GASNAP = [sys.executable, "-m", "gasnap.cli.main"]


def gasnap(*args: str, check: bool = True, timeout: float = 300
           ) -> subprocess.CompletedProcess[str]:
    """Run the real ``gasnap`` command line."""
    proc = subprocess.run([*GASNAP, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"gasnap {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


@pytest.fixture(scope="session")
async def hv() -> AsyncIterator[LibvirtHypervisor]:
    hypervisor = LibvirtHypervisor(URI)
    await hypervisor.connect()
    yield hypervisor
    await hypervisor.close()


@pytest.fixture(scope="session")
async def lab(hv: LibvirtHypervisor) -> AsyncIterator[Lab]:
    the_lab = Lab(hv)
    for name in await the_lab.names():
        if name.startswith(PREFIX):
            await the_lab.down(name)
    yield the_lab


@pytest.fixture(scope="session")
async def guest(lab: Lab) -> AsyncIterator[Domain]:
    """The shared lab guest: two data disks, guest agent connected."""
    dom = await lab.up(f"{PREFIX}main", disks=2, size_mib=64)
    yield dom
    await lab.down(dom.name)


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gasnap serve exited {proc.returncode}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as sock:
                try:
                    sock.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(0.05)
    raise AssertionError("gasnap serve did not listen in time")


class Agent:
    def __init__(self, api: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.api = api
        self.proc = proc
        self.log = log
        self.client = ApiClient(api)


@pytest.fixture(scope="session")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """``gasnap serve`` as a real process on a private unix socket and state dir."""
    base = tmp_path_factory.mktemp("agent")
    sock = base / "api.sock"
    log = base / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*GASNAP, "serve", "--listen", f"unix:{sock}", "--state-dir", str(base / "state"),
             "--libvirt-uri", URI],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        _wait_for_socket(sock, proc)
        yield Agent(f"unix:{sock}", proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that use a lab fixture are marked ``lab`` (select with -m)."""
    lab_fixtures = {"guest", "lab", "hv", "agent"}
    for item in items:
        if lab_fixtures & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.lab)


async def wait_until(predicate: object, timeout: float = 30, interval: float = 0.2) -> None:
    """Poll an async predicate until it is true (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():  # type: ignore[operator]
            return
        if time.monotonic() >= deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)
