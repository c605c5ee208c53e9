"""What gasnap trusts, against real guests: a guest's bytes never decide a
format or a path (REVIEW R1), a disk other domains may write is refused, and
two operations on one domain never thaw each other's freeze (REVIEW R2)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import PREFIX, Agent, Rig, create_snapshots, delete_snapshot, gasnap, wait_task
from gasnap import domxml, images
from gasnap.client import ApiError
from gasnap.hypervisor import Domain
from gasnap.lab.guests import Lab
from gasnap.lab.verify import fsck_snapshot
from gasnap.lab.workload import freeze_log, sh
from gasnap.virt import LibvirtHypervisor

HOST_FILE = "/etc/hostname"


def hostile_header() -> bytes:
    """The first bytes a guest can write to its raw disk: a qcow2 header
    whose backing file is a host file.  It fits in the first KiB, which ext4
    leaves unused, so the guest's filesystem stays whole."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "h.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b",
                        HOST_FILE, str(path), "64M"], check=True)
        return path.read_bytes()[:1024]


@contextlib.contextmanager
def guest_written_header(disk: str) -> Iterator[None]:
    """DISK (raw) starts with the hostile header for the block's duration."""
    path = Path(disk)
    original = path.read_bytes()[:1024]
    with path.open("r+b") as fh:
        fh.write(hostile_header())
    header = images.read_qcow2_header(disk)  # what a prober would see
    assert header.backing_file == HOST_FILE
    try:
        yield
    finally:
        with path.open("r+b") as fh:
            fh.write(original)


def domains_json(agent: Agent) -> dict[str, Any]:
    return {d["name"]: d for d in json.loads(
        gasnap("--api", agent.api, "domain", "list", "--json").stdout)}


def assert_no_host_file(agent: Agent, dom: str, raw_disk: str) -> list[str]:
    """The chain every reader shows ends at the raw disk, never the host file;
    returns it."""
    vol = domains_json(agent)[dom]["volumes"][0]
    assert HOST_FILE not in vol["chain"]
    assert vol["chain"][-1] == raw_disk
    inactive = subprocess.run(["virsh", "dumpxml", "--inactive", dom], capture_output=True,
                              text=True, check=True).stdout
    assert HOST_FILE not in inactive
    chain: list[str] = vol["chain"]
    return chain


@pytest.fixture
async def hostile(lab: Lab) -> AsyncIterator[Domain]:
    """A fresh guest whose one data disk is raw, made with the CLI."""
    name = f"{PREFIX}hostile"
    doc = json.loads(gasnap("lab", "up", name, "--disk-format", "raw", "--size", "32",
                            "--json").stdout)
    dom = await lab.hv.get_domain(doc["name"])
    assert dom.volumes[0].format == "raw"
    yield dom
    await lab.down(name)


async def test_a_raw_disk_whose_bytes_look_like_qcow2_stays_raw(
    agent: Agent, hv: LibvirtHypervisor, lab: Lab, hostile: Domain
) -> None:
    """REVIEW R1, on every path that reads a chain: the offline create, the
    domain list, the offline merge, the live create and the live merge."""
    raw_guest = hostile
    raw_disk = raw_guest.volumes[0].active_file
    before = [raw_disk]
    await hv.destroy(raw_guest.name)
    try:
        with guest_written_header(raw_disk):
            task = json.loads(gasnap("--api", agent.api, "snapshot", "create", raw_guest.name,
                                     "--disk", "vda", "--quiesce", "off", "--json").stdout)
            assert task["state"] == "succeeded", task
            (snap,) = task["result"]["snapshots"]
            header = images.read_qcow2_header(snap["file"])
            assert snap["image"] == raw_disk
            assert (header.backing_file, header.backing_format) == (Path(raw_disk).name, "raw")
            assert assert_no_host_file(agent, raw_guest.name, raw_disk) == [snap["file"],
                                                                             *before]
            # The offline merge (qemu-img with -f/-F from the plan) keeps it raw.
            done = delete_snapshot(agent, snap["id"], "commit")
            assert (done["state"], done["result"]["strategy"]) == ("succeeded",
                                                                    "offline-commit"), done
            assert assert_no_host_file(agent, raw_guest.name, raw_disk) == before
            (disk,) = domxml.disks(await hv.domain_xml(raw_guest.name, inactive=True))
            assert disk.chain[0].format == "raw"
            # Live: libvirt opens it as the XML says, and so does every step.
            await lab.up(raw_guest.name)
            live = create_snapshots(agent, {"domains": [raw_guest.name], "quiesce": "required"})
            assert live["state"] == "succeeded", live
            (snap,) = live["result"]["snapshots"]
            assert snap["consistency"] == "filesystem"
            assert assert_no_host_file(agent, raw_guest.name, raw_disk) == [snap["file"],
                                                                             *before]
            done = delete_snapshot(agent, snap["id"], "commit")
            assert done["state"] == "succeeded", done
            assert assert_no_host_file(agent, raw_guest.name, raw_disk) == before
            # The guest wrote those bytes: they are still its data, untouched.
            first = Path(raw_disk).read_bytes()[:1024]
            assert first == hostile_header()
    finally:
        await lab.up(raw_guest.name)
    assert (await sh(hv, raw_guest.name, "grep -c ' /data ' /proc/mounts")).strip() == "1"


async def test_a_quiesced_snapshot_of_a_raw_disk_is_clean(rig: Rig) -> None:
    agent, hv, raw_guest = rig.agent, rig.hv, rig.raw
    await sh(hv, raw_guest.name, "head -c 1048576 /dev/urandom > /data/raw-marker")
    task = create_snapshots(agent, {"domains": [raw_guest.name], "quiesce": "required"})
    assert task["state"] == "succeeded", task
    (snap,) = task["result"]["snapshots"]
    assert snap["consistency"] == "filesystem"
    result = await fsck_snapshot(snap)
    assert result.clean, result.output
    assert delete_snapshot(agent, snap["id"])["state"] == "succeeded"


# --- disks other domains may write ----------------------------------------------


@pytest.fixture
def odd_disks(tmp_path: Path) -> Iterator[str]:
    """A stopped domain with a shareable and a read-only disk."""
    name = f"{PREFIX}odd-{uuid.uuid4().hex[:6]}"
    for disk, fmt in (("shared", "raw"), ("ro", "qcow2")):
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(tmp_path / disk), "16M"],
                       check=True)
    xml = f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
      <os><type arch='x86_64'>hvm</type></os><devices>
      <disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>
        <source file='{tmp_path / "shared"}'/><target dev='vda' bus='virtio'/><shareable/>
      </disk>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='{tmp_path / "ro"}'/><target dev='vdb' bus='virtio'/><readonly/>
      </disk></devices></domain>"""
    (tmp_path / "dom.xml").write_text(xml)
    subprocess.run(["virsh", "-q", "define", str(tmp_path / "dom.xml")], check=True,
                   capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["virsh", "-q", "undefine", name], check=False, capture_output=True)


def test_shareable_and_read_only_disks_are_refused(agent: Agent, odd_disks: str,
                                                   tmp_path: Path) -> None:
    before = sorted(tmp_path.iterdir())
    for disk, kind in (("vda", "shareable"), ("vdb", "read-only")):
        with pytest.raises(ApiError) as info:
            agent.client.request("POST", "/v1/snapshots", {
                "domains": [odd_disks], "disks": {odd_disks: [disk]}, "quiesce": "off"})
        assert (info.value.details["status"], info.value.code) == (400, "unsupported_disk")
        assert kind in str(info.value)
        proc = gasnap("--api", agent.api, "snapshot", "create", odd_disks, "--disk", disk,
                      "--quiesce", "off", check=False)
        assert proc.returncode != 0 and kind in proc.stderr
    assert sorted(tmp_path.iterdir()) == before
    assert agent.client.get(f"/v1/snapshots?domain={odd_disks}")["snapshots"] == []


def test_a_disk_named_by_a_path_with_dots_is_never_acted_on(agent: Agent,
                                                           tmp_path: Path) -> None:
    """REVIEW-2 item 8: overlay names, directory checks and unlinks come
    from a disk's file name; one that needs interpreting (``..``) is refused
    before anything is made (the bare-QEMU twin is in test_qmp_backend)."""
    name = f"{PREFIX}dots-{uuid.uuid4().hex[:6]}"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "volume-d"),
                    "16M"], check=True)
    odd = f"{tmp_path}/../{tmp_path.name}/volume-d"
    (tmp_path / "dom.xml").write_text(f"""<domain type='qemu'><name>{name}</name>
      <memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os><devices>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='{odd}'/><target dev='vda' bus='virtio'/>
      </disk></devices></domain>""")
    subprocess.run(["virsh", "-q", "define", str(tmp_path / "dom.xml")], check=True,
                   capture_output=True)
    try:
        before = sorted(tmp_path.iterdir())
        with pytest.raises(ApiError) as info:
            agent.client.request("POST", "/v1/snapshots", {"domains": [name],
                                                           "quiesce": "off"})
        assert (info.value.details["status"], info.value.code) == (400, "unsupported_disk")
        assert "plain absolute path" in str(info.value)
        assert sorted(tmp_path.iterdir()) == before
    finally:
        subprocess.run(["virsh", "-q", "undefine", name], check=False, capture_output=True)


# --- one domain, many requests ---------------------------------------------------


@pytest.fixture(scope="module")
async def quad(rig: Rig) -> AsyncIterator[Domain]:
    dom = await rig.up(f"{PREFIX}quad", disks=4, size_mib=32)
    yield dom
    await rig.down(dom.name)


def paired(log: list[tuple[str, int]]) -> bool:
    """freeze, thaw, freeze, thaw, ...: no freeze inside another's window."""
    events = [event for event, _ in log]
    return events == ["freeze", "thaw"] * (len(events) // 2)


async def test_parallel_creates_on_one_domain_each_own_their_freeze(
    rig: Rig, quad: Domain
) -> None:
    """REVIEW R2: Cinder snapshots each volume of an instance on its own.
    Four single-disk creates at once, five rounds: all succeed, every one is
    filesystem-consistent, and the guest's hook saw freezes and thaws in
    pairs (a window queues behind the running one; nothing thaws another's)."""
    agent, hv = rig.agent, rig.hv
    start = len(await freeze_log(hv, quad.name))
    targets = [v.target for v in quad.volumes]
    for _ in range(5):
        tasks = [agent.client.request("POST", "/v1/snapshots", {
            "domains": [quad.name], "disks": {quad.name: [t]}, "quiesce": "required"})["task"]
            for t in targets]
        done = await asyncio.gather(*(asyncio.to_thread(wait_task, agent, t["id"])
                                      for t in tasks))
        for task in done:
            assert task["state"] == "succeeded", task
            (snap,) = task["result"]["snapshots"]
            assert snap["consistency"] == "filesystem"
    log = (await freeze_log(hv, quad.name))[start:]
    assert len(log) == 2 * 5 * len(targets), log
    assert paired(log), log
    for (_, a), (_, b) in itertools.pairwise(log):
        assert a <= b
