"""Lab guests as users see them: ``gasnap lab up|list|down``, real boots."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path

from conftest import PREFIX, gasnap
from gasnap.hypervisor import Domain
from gasnap.lab.guests import Lab, lab_home
from gasnap.lab.workload import sh, start_load, stop_load
from gasnap.virt import LibvirtHypervisor

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args],
                          capture_output=True, text=True, check=False)


async def test_up_list_down_through_the_cli(lab: Lab) -> None:
    name = f"{PREFIX}cli"
    record = json.loads(gasnap("lab", "up", name, "--disks", "2", "--size", "32", "--json").stdout)
    try:
        assert record["name"] == name
        assert record["state"] == "running"
        assert record["guest_agent"] == "connected"
        assert [v["target"] for v in record["volumes"]] == ["vda", "vdb"]
        for vol in record["volumes"]:
            assert UUID_RE.match(vol["volume_id"])
            assert Path(vol["active_file"]).name == f"volume-{vol['volume_id']}"
            assert Path(vol["active_file"]).is_file()
            assert vol["chain"] == [vol["active_file"]]
        listed = json.loads(gasnap("lab", "list", "--json").stdout)
        assert name in [d["name"] for d in listed]
        # Persistent: it survives a power-off and boots again.
        assert virsh("dominfo", name).stdout.count("Persistent:     yes") == 1
    finally:
        gasnap("lab", "down", name)
    assert virsh("dominfo", name).returncode != 0
    assert not (lab_home() / name).exists()
    assert name not in [d["name"] for d in json.loads(gasnap("lab", "list", "--json").stdout)]


async def test_down_refuses_a_domain_that_is_not_a_lab_guest(lab: Lab, tmp_path: Path) -> None:
    name = f"{PREFIX}foreign-{uuid.uuid4().hex[:6]}"
    xml = tmp_path / "d.xml"
    xml.write_text(f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
                   "<os><type arch='x86_64'>hvm</type></os></domain>")
    assert virsh("define", str(xml)).returncode == 0
    try:
        proc = gasnap("lab", "down", name, check=False)
        assert proc.returncode != 0
        assert "not a lab guest" in proc.stderr
        assert virsh("dominfo", name).returncode == 0
        assert name not in await lab.names()
    finally:
        virsh("undefine", name)


async def test_down_of_an_unknown_guest_is_an_error(lab: Lab) -> None:
    proc = gasnap("lab", "down", f"{PREFIX}never-existed", check=False)
    assert proc.returncode == 1
    assert "no lab guest" in proc.stderr


async def test_bad_lab_input_is_refused_before_anything_is_made() -> None:
    for args in (["up", "bad name"], ["up", f"{PREFIX}x", "--disks", "0"],
                 ["up", f"{PREFIX}x", "--size", "1"]):
        proc = gasnap("lab", *args, check=False)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("gasnap: ")
        assert not (lab_home() / f"{PREFIX}x").exists()


async def test_data_disks_are_mounted_ext4_in_order(hv: LibvirtHypervisor, guest: Domain) -> None:
    mounts = await sh(hv, guest.name, "grep ' /data' /proc/mounts")
    assert [line.split()[:3] for line in mounts.splitlines()] == [
        ["/dev/vda", "/data", "ext4"], ["/dev/vdb", "/data1", "ext4"]
    ]


async def test_write_workload_writes_with_fsync_to_every_disk(
    hv: LibvirtHypervisor, guest: Domain
) -> None:
    await start_load(hv, guest.name)
    try:
        first = await sh(hv, guest.name, "wc -l < /data/load/counter; wc -l < /data1/load/counter")
        await sh(hv, guest.name, "sleep 2")
        second = await sh(hv, guest.name, "wc -l < /data/load/counter; wc -l < /data1/load/counter")
        assert all(int(b) > int(a) for a, b in zip(first.split(), second.split(), strict=True))
    finally:
        await stop_load(hv, guest.name)
    assert (await sh(hv, guest.name, "gasnap-load status")).strip() == "stopped"
