"""Domains that change under gasnap between two steps, and chains it cannot
read without guessing (REVIEW items 4, 8, 11).  Stopped domains defined for
the test: their snapshots are offline switches, no guest needs to boot."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import PREFIX, Agent, running_agent, wait_task
from gasnap import domxml
from gasnap.client import ApiError
from gasnap.images import volume_name


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], check=True,
                          capture_output=True, text=True).stdout


def define(name: str, disk: Path) -> None:
    xml = disk.parent / f"{name}.xml"
    xml.write_text(f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
      <os><type arch='x86_64'>hvm</type></os><devices>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='{disk}'/><target dev='vda' bus='virtio'/>
        <serial>{uuid.uuid4()}</serial></disk></devices></domain>""")
    virsh("define", str(xml))


def disk_of(name: str) -> str:
    (spec,) = domxml.disks(virsh("dumpxml", "--inactive", name))
    return spec.chain[0].path


def image(path: Path, *args: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *args, str(path), "16M"],
                   check=True, cwd=path.parent)
    return path


@pytest.mark.parametrize("change", ["renamed-and-replaced", "undefined"])
async def test_a_stopped_domain_changed_before_its_switch_is_never_acted_on(
    tmp_path: Path, names: list[str], change: str
) -> None:
    name = f"{PREFIX}chg-{uuid.uuid4().hex[:6]}"
    names += [name, f"{name}-old"]
    first = image(tmp_path / "volume-a")
    define(name, first)
    agent = Agent(tmp_path, env={"GASNAP_TEST_FAULT": "create:overlays:stop"})
    try:
        agent.wait_ready()
        task = agent.client.request("POST", "/v1/snapshots",
                                    {"domains": [name], "quiesce": "off"})["task"]
        deadline = time.monotonic() + 30
        while "stopping the agent at create:overlays" not in agent.output():
            assert time.monotonic() < deadline, "the create never made its overlays"
            await asyncio.sleep(0.05)
        # The overlay is named from the volume id: the disk's serial.
        (spec,) = domxml.disks(virsh("dumpxml", "--inactive", name))
        (overlay,) = [p for p in tmp_path.iterdir()
                      if p.name.startswith(volume_name(str(spec.serial)) + ".")]
        newcomer = image(tmp_path / "volume-b")
        if change == "undefined":
            virsh("undefine", name)
        else:
            virsh("domrename", name, f"{name}-old")
            define(name, newcomer)  # same name, another domain
        os.kill(agent.proc.pid, signal.SIGCONT)
        done = wait_task(agent, task["id"])
        expected = "domain_not_found" if change == "undefined" else "domain_changed"
        assert (done["state"], done["error"]["code"]) == ("failed", expected), done
        (record,) = agent.client.get("/v1/snapshots")["snapshots"]
        assert record["status"] == "error"
        assert not overlay.exists()  # in no chain of any domain: removed
        if change != "undefined":
            assert disk_of(f"{name}-old") == str(first)  # the planned domain: untouched
            assert disk_of(name) == str(newcomer)  # the newcomer: untouched
            assert [p.name for p in tmp_path.iterdir() if p.name.startswith("volume-b")] \
                == ["volume-b"]
    finally:
        if agent.proc.poll() is None:
            os.kill(agent.proc.pid, signal.SIGCONT)
        agent.stop()


async def test_a_chain_that_cannot_be_read_without_guessing_is_left_alone(
    tmp_path: Path, names: list[str]
) -> None:
    """A stopped domain whose overlay names no format for its backing file:
    listed with its known layer only, and refused, not probed (item 11)."""
    name = f"{PREFIX}unread-{uuid.uuid4().hex[:6]}"
    names.append(name)
    image(tmp_path / "base")
    top = image(tmp_path / "top", "-F", "qcow2", "-b", "base")
    data = top.read_bytes()  # drop the backing-format extension, as old tools wrote
    at = data.index(bytes.fromhex("e2792aca"))
    top.write_bytes(data[:at] + bytes.fromhex("0badf00d") + data[at + 4:])
    define(name, top)
    before = sorted(p.name for p in tmp_path.iterdir())
    (tmp_path / "agent").mkdir()
    with running_agent(tmp_path / "agent") as agent:
        (dom,) = [d for d in agent.client.get("/v1/domains")["domains"] if d["name"] == name]
        assert dom["volumes"][0]["chain"] == [str(top)]
        with pytest.raises(ApiError) as info:
            agent.client.request("POST", "/v1/snapshots", {"domains": [name], "quiesce": "off"})
        assert (info.value.details["status"], info.value.code) == (400, "unsupported_disk")
        assert "names no format" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "agent") == before
    assert disk_of(name) == str(top)


async def test_a_disk_of_two_domains_is_refused(tmp_path: Path, names: list[str]) -> None:
    """One file attached to two domains without <shareable/> (a multi-attached
    volume): switching one domain would leave the other writing into the
    snapshot's image.  Refused, nothing changed (REVIEW item 12)."""
    first, second = f"{PREFIX}twin-{uuid.uuid4().hex[:6]}", f"{PREFIX}twin-{uuid.uuid4().hex[:6]}"
    names += [first, second]
    disk = image(tmp_path / "volume-shared")
    define(first, disk)
    define(second, disk)
    (tmp_path / "agent").mkdir()
    with running_agent(tmp_path / "agent") as agent:
        with pytest.raises(ApiError) as info:
            agent.client.request("POST", "/v1/snapshots", {"domains": [first], "quiesce": "off"})
        assert (info.value.details["status"], info.value.code) == (400, "unsupported_disk")
        assert "another domain" in str(info.value)
        assert agent.client.get("/v1/snapshots")["snapshots"] == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("volume-")) == [
        "volume-shared"]
    assert disk_of(first) == disk_of(second) == str(disk)
