"""Every action on the volume its record names (REVIEW-2 R4, identity).

Nova frees a target when it detaches a volume and hands it to the next one.
A snapshot of the volume that left must never act on the one that came:
not by a delete (R4 removed the whole detached volume, base and all), not
by a revert (R4 put the old volume's image under the new disk).  Stopped
domains defined for the test: every step is an offline switch on real
libvirt, and no guest needs to boot.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from conftest import PREFIX, Agent, running_agent, wait_task
from gasnap import domxml
from gasnap.client import ApiError


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], check=True,
                          capture_output=True, text=True).stdout


def image(path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return path


def disk_xml(path: Path, target: str, serial: str | None) -> str:
    serial_elem = f"<serial>{serial}</serial>" if serial else ""
    return (f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{path}'/><target dev='{target}' bus='virtio'/>{serial_elem}</disk>")


def define(name: str, directory: Path, disks: list[tuple[Path, str, str | None]]) -> None:
    xml = directory / f"{name}.xml"
    xml.write_text(f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
      <os><type arch='x86_64'>hvm</type></os><devices>
      {''.join(disk_xml(*d) for d in disks)}</devices></domain>""")
    virsh("define", str(xml))


def chains(name: str) -> dict[str, list[str]]:
    return {s.target: [layer.path for layer in s.chain]
            for s in domxml.disks(virsh("dumpxml", "--inactive", name))}


def replace_disk(name: str, directory: Path, target: str, path: Path,
                 serial: str | None) -> None:
    """What Nova does on a detach then an attach: the target is reused."""
    virsh("detach-disk", name, target, "--config")
    (directory / "attach.xml").write_text(disk_xml(path, target, serial))
    virsh("attach-device", name, str(directory / "attach.xml"), "--config")


def snapshot(agent: Agent, name: str, target: str) -> dict[str, Any]:
    task = agent.client.request("POST", "/v1/snapshots", {
        "domains": [name], "disks": {name: [target]}, "quiesce": "off"})["task"]
    done = wait_task(agent, task["id"])
    assert done["state"] == "succeeded", done
    (snap,) = done["result"]["snapshots"]
    return dict(snap)


def refused(agent: Agent, method: str, path: str, body: Any = None) -> ApiError:
    with pytest.raises(ApiError) as info:
        agent.client.request(method, path, body)
    return info.value


@pytest.mark.parametrize("serial", ["serial", "no-serial"])
async def test_a_snapshot_of_a_volume_that_left_never_acts_on_the_one_that_came(
    tmp_path: Path, names: list[str], serial: str
) -> None:
    name = f"{PREFIX}ident-{uuid.uuid4().hex[:6]}"
    names.append(name)
    images = tmp_path / "images"
    images.mkdir()
    vol_a = str(uuid.uuid4()) if serial == "serial" else None
    vol_c = str(uuid.uuid4()) if serial == "serial" else None
    root = image(images / f"volume-{uuid.uuid4()}")
    volume_a = image(images / "volume-a")
    define(name, images, [(root, "vda", str(uuid.uuid4())), (volume_a, "vdb", vol_a)])
    (tmp_path / "agent").mkdir()
    with running_agent(tmp_path / "agent") as agent:
        first = snapshot(agent, name, "vdb")
        second = snapshot(agent, name, "vdb")
        assert second["volume_id"] == (vol_a or f"{name}/vdb")
        # The disk is still the one the records were taken of: a delete works.
        done = wait_task(agent, agent.client.request(
            "DELETE", f"/v1/snapshots/{first['id']}")["task"]["id"])
        assert done["state"] == "succeeded", done

        volume_c = image(images / "volume-c")
        replace_disk(name, images, "vdb", volume_c, vol_c)
        files = sorted(p.name for p in images.iterdir())
        layout = chains(name)

        err = refused(agent, "DELETE", f"/v1/snapshots/{second['id']}")
        assert (err.details["status"], err.code) == (409, "volume_detached"), err
        err = refused(agent, "POST", f"/v1/snapshots/{second['id']}/revert",
                      {"scope": "volume"})
        assert (err.details["status"], err.code) == (409, "volume_detached"), err

        # Nothing changed: volume A's files, the new disk, the record.
        assert sorted(p.name for p in images.iterdir()) == files
        assert chains(name) == layout == {**layout, "vdb": [str(volume_c)]}
        assert agent.client.get(f"/v1/snapshots/{second['id']}")["status"] == "available"
        # The new volume has no snapshot of the old one's, whatever its id.
        listed = agent.client.get(f"/v1/snapshots?domain={name}")["snapshots"]
        assert [s["id"] for s in listed] == [second["id"]]


async def test_a_volume_moved_to_another_domain_is_merged_where_it_is_now(
    tmp_path: Path, names: list[str]
) -> None:
    """Cinder detaches a volume from one instance, attaches it to another,
    then asks (through Nova) to delete a snapshot taken on the first.  The
    volume is found by its serial where it is now: the merge runs on the
    second domain's disk, and the first domain is not touched (outside
    review: such a delete was refused for ever)."""
    first, second = (f"{PREFIX}mv-{uuid.uuid4().hex[:6]}" for _ in range(2))
    names += [first, second]
    images = tmp_path / "images"
    images.mkdir()
    vol = str(uuid.uuid4())
    root_a, root_b = (image(images / f"volume-{uuid.uuid4()}") for _ in range(2))
    define(first, images, [(root_a, "vda", str(uuid.uuid4())),
                           (image(images / f"volume-{vol}"), "vdb", vol)])
    define(second, images, [(root_b, "vda", str(uuid.uuid4()))])
    (tmp_path / "agent").mkdir()
    with running_agent(tmp_path / "agent") as agent:
        older = snapshot(agent, first, "vdb")
        snapshot(agent, first, "vdb")
        moved = chains(first)["vdb"]
        virsh("detach-disk", first, "vdb", "--config")
        (images / "attach.xml").write_text(disk_xml(Path(moved[0]), "vdc", vol))
        virsh("attach-device", second, str(images / "attach.xml"), "--config")
        left = chains(first)
        done = wait_task(agent, agent.client.request(
            "DELETE", f"/v1/snapshots/{older['id']}")["task"]["id"])
        assert done["state"] == "succeeded", done
        assert chains(second)["vdc"] == [p for p in moved if p != older["file"]]
        assert chains(first) == left
        assert not Path(older["file"]).exists()


async def test_a_revert_that_failed_at_its_switch_never_happens_later(
    tmp_path: Path, names: list[str]
) -> None:
    """REVIEW-2 item 4 (state, ownership): the domain is started by someone
    else between the revert's stop and its switch.  The revert fails, and
    stays failed: at the domain's next shut-off the sweep must not switch
    its definition to the old snapshot (its next boot would roll it back)."""
    name = f"{PREFIX}late-{uuid.uuid4().hex[:6]}"
    names.append(name)
    images = tmp_path / "images"
    images.mkdir()
    define(name, images, [(image(images / "volume-r"), "vda", str(uuid.uuid4()))])
    (tmp_path / "agent").mkdir()
    hold = tmp_path / "hold"
    hold.mkdir()
    with running_agent(tmp_path / "agent", config="[agent]\nsweep_interval = 1\n",
                       env={"GASNAP_TEST_HOLD": str(hold)}) as agent:
        target = snapshot(agent, name, "vda")
        snapshot(agent, name, "vda")
        (hold / "hold").write_text("revert:overlays")
        task = agent.client.request("POST", f"/v1/snapshots/{target['id']}/revert",
                                    {"scope": "volume"})["task"]
        await wait_for_file(hold / "held")
        layout = chains(name)  # the before-revert snapshot's overlay on top
        virsh("start", name)  # someone else, between the stop and the switch
        try:
            (hold / "hold").unlink()
            done = wait_task(agent, task["id"])
            assert done["state"] == "failed", done
            assert chains(name) == layout
        finally:
            virsh("destroy", name)
        await asyncio.sleep(3)  # three sweeps with the domain off again
        assert chains(name) == layout, "the failed revert was applied later"
        # Nothing is left over: every file is in the chain or a record's.
        records = agent.client.get(f"/v1/snapshots?domain={name}")["snapshots"]
        named = {p for r in records for p in (r["file"], r["image"])} | set(layout["vda"])
        assert {str(p) for p in images.iterdir() if p.name.startswith("volume-")} == named
        assert {r["status"] for r in records} == {"available"}


async def wait_for_file(path: Path, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not path.exists():
        assert asyncio.get_running_loop().time() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.05)


def overlay(path: Path, backing: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                    backing.name, str(path)], check=True, cwd=path.parent)
    return path


async def test_manage_never_adopts_a_layer_over_an_image_others_read(
    tmp_path: Path, names: list[str]
) -> None:
    """REVIEW-2 item 1: deleting an adopted snapshot commits into its image or
    pulls it up and unlinks it.  A golden base other disks read, or a base
    not named for the volume (disks elsewhere may read it), is never adopted;
    a layer over the volume's own image is."""
    name = f"{PREFIX}golden-{uuid.uuid4().hex[:6]}"
    names.append(name)
    images = tmp_path / "images"
    images.mkdir()
    serial = str(uuid.uuid4())
    base = image(images / "golden.qcow2")
    own = overlay(images / f"volume-{serial}", base)
    other = overlay(images / "vm2.qcow2", base)  # another VM's disk on the same base
    top = overlay(images / f"volume-{serial}.by-hand", own)
    define(name, images, [(top, "vda", serial)])
    (tmp_path / "agent").mkdir()
    with running_agent(tmp_path / "agent") as agent:
        listed = agent.client.get(f"/v1/volumes/{serial}/manageable")
        safe = {x["reference"]["file"]: (x["safe_to_manage"], x["reason_not_safe"])
                for x in listed}
        assert safe[top.name] == (True, None)
        assert safe[own.name][0] is False and "vm2.qcow2" in safe[own.name][1], safe
        err = refused(agent, "POST", "/v1/snapshots/manage",
                      {"volume_id": serial, "ref": {"file": own.name}})
        assert (err.details["status"], err.code) == (400, "invalid_reference"), err
        other.unlink()  # no other reader: still a base named for nobody
        listed = agent.client.get(f"/v1/volumes/{serial}/manageable")
        reason = {x["reference"]["file"]: x["reason_not_safe"] for x in listed}[own.name]
        assert "golden image" in reason, listed
        adopted = agent.client.request("POST", "/v1/snapshots/manage",
                                       {"volume_id": serial, "ref": {"file": top.name}})
        assert (adopted["file"], adopted["image"]) == (str(top), str(own))
    assert chains(name)["vda"][0] == str(top)
    assert {p.name for p in images.iterdir() if p.suffix != ".xml"} == {
        top.name, own.name, base.name}
