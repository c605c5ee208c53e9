"""The bare-QEMU backend's first parts on a real guest (#21): a lab guest as
a plain TCG QEMU process with its QMP and guest-agent sockets, and qemu-ga
spoken to over its own socket with qemu.qmp's client (no libvirt)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import GASNAP
from gasnap.guestagent import AgentAbsent, AgentUnresponsive, FreezeState
from gasnap.hypervisor import AgentState, DomainState
from gasnap.lab.bare import BareLab
from gasnap.lab.guests import NotALabGuest
from gasnap.lab.workload import sh
from gasnap.qmp.backend import QmpHypervisor
from gasnap.qmp.monitor import Monitor, QmpDomainNotFound

NAME = "gt-bare"


@pytest.fixture(scope="module")
async def bare(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[BareLab]:
    base = tmp_path_factory.mktemp("bare")
    lab = BareLab(run_dir=base / "run", lab_dir=base / "lab")
    await lab.up(NAME, disks=2, size_mib=32)
    yield lab
    if lab.pid_of(NAME) is not None:
        await lab.down(NAME)


async def test_a_bare_guest_answers_over_its_own_sockets(bare: BareLab) -> None:
    assert bare.names() == [NAME]
    for suffix in ("qmp", "qga", "pid"):
        assert (bare.run_dir / f"{NAME}.{suffix}").exists()
    agent = bare.agent
    await agent.ping(NAME)
    hv: Any = SimpleNamespace(agent=agent)  # what the workload needs of a hypervisor
    await sh(hv, NAME, "echo before > /data/f && echo second > /data1/f && sync")
    assert await agent.fsfreeze(NAME, 10) == 2  # both data filesystems
    try:
        assert await agent.fsfreeze_status(NAME, 5) is FreezeState.FROZEN
    finally:
        await agent.fsthaw(NAME, 5)
    assert await agent.fsfreeze_status(NAME, 5) is FreezeState.THAWED
    assert (await sh(hv, NAME, "cat /data/f /data1/f")).split() == ["before", "second"]
    # Several callers at once: the socket takes one client, the channel queues them.
    await asyncio.gather(*(agent.ping(NAME) for _ in range(5)))


async def test_agent_errors_are_the_boundarys_own(bare: BareLab, tmp_path: Path) -> None:
    with pytest.raises(AgentAbsent):
        await bare.agent.ping("gt-no-such-guest")
    # A socket that accepts and never answers (a guest whose qemu-ga hangs).
    silent = bare.run_dir / "gt-silent.qga"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(silent))
    server.listen(1)
    try:
        with pytest.raises(AgentUnresponsive):
            await bare.agent.ping("gt-silent", timeout=1.0)
    finally:
        server.close()
        silent.unlink()


async def test_a_process_gasnap_does_not_own_is_never_stopped(bare: BareLab) -> None:
    other = await asyncio.create_subprocess_exec("sleep", "300")
    pidfile = bare.run_dir / "gt-other.pid"
    pidfile.write_text(f"{other.pid}\n")
    (bare.lab_dir / "gt-other").mkdir(parents=True)
    try:
        with pytest.raises(NotALabGuest):
            await bare.down("gt-other")
        assert other.returncode is None
        assert "gt-other" not in bare.names()
    finally:
        other.kill()
        await other.wait()
        pidfile.unlink()


async def test_down_stops_the_guest_and_removes_its_files(bare: BareLab) -> None:
    pid = bare.pid_of(NAME)
    assert pid is not None
    await bare.down(NAME)
    assert bare.pid_of(NAME) is None and bare.names() == []
    assert not list(bare.run_dir.glob(f"{NAME}.*"))
    assert not (bare.lab_dir / NAME).exists()


def test_the_cli_starts_and_stops_a_bare_guest(tmp_path: Path) -> None:
    env = {"GASNAP_QMP_RUN_DIR": str(tmp_path / "run"), "GASNAP_LAB_DIR": str(tmp_path / "lab")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*GASNAP, *args], capture_output=True, text=True, check=False,
                              env={**os.environ, **env}, timeout=300)

    up = cli("lab", "up", "gt-bare-cli", "--backend", "qmp", "--disk-format", "raw", "--json")
    assert up.returncode == 0, up.stderr
    record = json.loads(up.stdout)
    assert record["backend"] == "qmp" and record["qga"] == str(tmp_path / "run/gt-bare-cli.qga")
    assert len(record["disks"]) == 1 and Path(record["qmp"]).exists()
    down = cli("lab", "down", "gt-bare-cli", "--backend", "qmp")
    assert down.returncode == 0, down.stderr
    assert not (tmp_path / "run/gt-bare-cli.pid").exists()
    again = cli("lab", "down", "gt-bare-cli", "--backend", "qmp")
    assert again.returncode != 0 and "no bare lab guest" in again.stderr


async def test_a_domain_is_read_from_qemu_itself(tmp_path_factory: pytest.TempPathFactory
                                                 ) -> None:
    """Disks, serials, formats and chains from query-block and qom-get: a
    raw guest's disks are raw, and a layer QEMU stacks on one is in the chain
    with its format."""
    base = tmp_path_factory.mktemp("bare-read")
    lab = BareLab(run_dir=base / "run", lab_dir=base / "lab")
    await lab.up("gt-bare-read", disks=2, size_mib=32, disk_format="raw")
    try:
        hv = QmpHypervisor(lab.run_dir)
        dom = await hv.get_domain("gt-bare-read")
        assert dom.guest_agent is AgentState.CONNECTED  # the guest opened its port
        assert dom.state is DomainState.RUNNING and dom.memory == 256 << 20
        assert [(v.target, v.format) for v in dom.volumes] == [("vda", "raw"), ("vdb", "raw")]
        assert {v.active_file for v in dom.volumes} == set(lab.record("gt-bare-read")["disks"])
        for vol in dom.volumes:
            assert vol.volume_id == vol.serial == Path(vol.active_file).name.removeprefix(
                "volume-")
        overlay = Path(dom.volumes[0].active_file).with_name("layer.qcow2")
        async with Monitor(lab.run_dir, "gt-bare-read") as qmp:
            await qmp.call("blockdev-snapshot-sync", {
                "node-name": "vda-0", "snapshot-file": str(overlay),
                "snapshot-node-name": "vda-1", "format": "qcow2"})
        vda = (await hv.get_domain("gt-bare-read")).volumes[0]
        assert [(layer.path, layer.format) for layer in vda.chain] == [
            (str(overlay), "qcow2"), (dom.volumes[0].active_file, "raw")]
        with pytest.raises(QmpDomainNotFound):
            await hv.get_domain("gt-no-such")
    finally:
        await lab.down("gt-bare-read")
