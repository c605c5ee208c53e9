"""Spare overlays on real guests: made after a snapshot, used by the next one,
and never trusted when the chain, the size or the file itself changed."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import (
    Agent,
    chain_of,
    create_snapshots,
    delete_snapshot,
    running_agent,
    wait_until,
)
from gasnap.hypervisor import Domain
from gasnap.images import UnsafeImage, read_qcow2_header, spare_path
from gasnap.virt import LibvirtHypervisor


def spare_of(active: str) -> Path:
    return Path(spare_path(active))


def backing_of(path: str) -> str:
    """The backing pointer as qemu-img reads it (relative: a bare name)."""
    doc = json.loads(subprocess.run(["qemu-img", "info", "-U", "-f", "qcow2", "--output=json",
                                      path],
                                    check=True, capture_output=True, text=True).stdout)
    return str(doc["backing-filename"])


async def spare_ready(active: str) -> Path:
    spare = spare_of(active)

    async def ready() -> bool:
        return spare.exists()

    await wait_until(ready, timeout=30, interval=0.05)
    return spare


def snapshot(agent: Agent, guest: Domain) -> dict[str, str]:
    task = create_snapshots(agent, {"domains": [guest.name], "disks": {guest.name: ["vda"]},
                                    "quiesce": "required"})
    assert task["state"] == "succeeded", task
    snap: dict[str, str] = task["result"]["snapshots"][0]
    return snap


async def test_the_next_snapshot_takes_the_spare(
    agent: Agent, hv: LibvirtHypervisor, guest: Domain
) -> None:
    first = snapshot(agent, guest)
    spare = await spare_ready(first["file"])
    header = read_qcow2_header(str(spare))
    assert (header.backing_file, header.backing_format) == (Path(first["file"]).name, "qcow2")
    made, active = spare.stat(), Path(first["file"]).stat()
    assert (made.st_uid, made.st_gid, made.st_mode) == (
        active.st_uid, active.st_gid, active.st_mode)

    with spare.open("rb"):  # held open: its inode cannot be reused by a new file
        second = snapshot(agent, guest)
    assert Path(second["file"]).stat().st_ino == made.st_ino  # renamed, not made anew
    assert second["image"] == first["file"]
    assert (await chain_of(hv, guest.name, "vda"))[:2] == [second["file"], first["file"]]
    assert backing_of(second["file"]) == Path(first["file"]).name
    await spare_ready(second["file"])  # and the one after it is on its way


async def test_a_spare_left_behind_by_a_chain_change_is_not_used(
    agent: Agent, hv: LibvirtHypervisor, guest: Domain
) -> None:
    first = snapshot(agent, guest)
    stale = (await spare_ready(first["file"])).open("rb")  # its inode stays taken
    by_hand = first["file"] + ".by-hand"
    subprocess.run(["virsh", "-q", "-c", "qemu:///system", "snapshot-create-as", guest.name,
                    "--disk-only", "--no-metadata", "--atomic", "--diskspec",
                    f"vda,snapshot=external,file={by_hand}", *[
                        f"--diskspec={v.target},snapshot=no" for v in guest.volumes[1:]]],
                   check=True, capture_output=True)
    with stale:
        later = snapshot(agent, guest)
        assert Path(later["file"]).stat().st_ino != os.fstat(stale.fileno()).st_ino
    assert later["image"] == by_hand
    assert (await chain_of(hv, guest.name, "vda"))[:3] == [later["file"], by_hand,
                                                          first["file"]]
    assert backing_of(later["file"]) == Path(by_hand).name


@pytest.mark.parametrize("strategy", ["commit", "pull"])
async def test_after_a_merge_the_spare_is_on_the_active_layer(
    agent: Agent, hv: LibvirtHypervisor, guest: Domain, strategy: str
) -> None:
    older = snapshot(agent, guest)
    newest = snapshot(agent, guest)
    spare = await spare_ready(newest["file"])
    # newest's overlay is active.  commit: active commit + pivot removes that
    # overlay (the spare's backing file), so the spare goes and a new one is
    # made on older's overlay, active again; pull: older's overlay is removed,
    # the active layer and so the spare stay as they were.
    with spare.open("rb") as held:  # its inode cannot be reused meanwhile
        task = delete_snapshot(agent, newest["id"], strategy)
        assert task["state"] == "succeeded", task
        active = older["file"] if strategy == "commit" else newest["file"]
        removed = newest["file"] if strategy == "commit" else older["file"]
        assert not Path(removed).exists()
        assert (await chain_of(hv, guest.name, "vda"))[0] == active

        async def on_active() -> bool:
            try:
                return read_qcow2_header(str(spare)).backing_file == Path(active).name
            except (OSError, UnsafeImage):
                return False

        await wait_until(on_active, timeout=30, interval=0.05)
        assert (spare.stat().st_ino == os.fstat(held.fileno()).st_ino) is (strategy == "pull")
    with spare.open("rb") as current:
        later = snapshot(agent, guest)
        assert Path(later["file"]).stat().st_ino == os.fstat(current.fileno()).st_ino  # taken
    assert backing_of(later["file"]) == Path(active).name
    assert (await chain_of(hv, guest.name, "vda"))[:2] == [later["file"], active]
    await spare_ready(later["file"])


@pytest.mark.parametrize("damage", ["garbage", "other size"])
async def test_a_damaged_spare_is_replaced(
    agent: Agent, hv: LibvirtHypervisor, guest: Domain, damage: str
) -> None:
    first = snapshot(agent, guest)
    spare = await spare_ready(first["file"])
    spare.unlink()
    if damage == "garbage":
        spare.write_bytes(b"QFI\xfb" + b"\0" * 10)  # a header cut short by a crash
    else:  # as if the disk had been resized since
        size = read_qcow2_header(first["file"]).virtual_size + (1 << 20)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "qcow2",
                        "-b", Path(first["file"]).name, str(spare), str(size)], check=True)
    with spare.open("rb") as held:
        later = snapshot(agent, guest)
        assert Path(later["file"]).stat().st_ino != os.fstat(held.fileno()).st_ino
    assert (await chain_of(hv, guest.name, "vda"))[:2] == [later["file"], first["file"]]
    header = read_qcow2_header(later["file"])
    assert header.virtual_size == read_qcow2_header(first["file"]).virtual_size


async def test_no_spares_when_turned_off(
    tmp_path: Path, hv: LibvirtHypervisor, guest: Domain
) -> None:
    spare = spare_of((await chain_of(hv, guest.name, "vda"))[0])

    def state() -> tuple[int, int] | None:
        return (spare.stat().st_ino, spare.stat().st_mtime_ns) if spare.exists() else None

    # The session agent's spare, if its last snapshot of vda (an earlier
    # test's) is still having one made in the background: let it land first.
    async def landed() -> bool:
        return spare.exists()

    with contextlib.suppress(AssertionError):
        await wait_until(landed, timeout=5, interval=0.05)
    before = state()
    with running_agent(tmp_path, config="[agent]\nspare_overlays = false\n") as off:
        first = snapshot(off, guest)
        second = snapshot(off, guest)
    assert second["image"] == first["file"]
    assert state() == before  # neither taken nor made


def test_qcow2_headers_read_directly_agree_with_qemu_img(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "3G"], check=True)
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    "base.qcow2", str(top)], check=True, cwd=tmp_path)
    assert read_qcow2_header(str(base)).backing_file is None
    header = read_qcow2_header(str(top))
    assert (header.virtual_size, header.backing_file, header.backing_format) == (
        3 << 30, "base.qcow2", "qcow2")
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 4096)
    with pytest.raises(UnsafeImage):
        read_qcow2_header(str(raw))
