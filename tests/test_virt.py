"""The libvirt and guest-agent boundaries against a real lab guest."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from conftest import URI
from gasnap import images
from gasnap.guestagent import FreezeState
from gasnap.hypervisor import AgentState, Domain, DomainState
from gasnap.lab.workload import freeze_log
from gasnap.virt import DomainChanged, DomainNotFound, LibvirtHypervisor


def external_overlay(domain: str, target: str, overlay: Path, others: list[str]) -> None:
    """An overlay made by hand with virsh, the way an operator might."""
    subprocess.run(
        ["virsh", "-q", "-c", "qemu:///system", "snapshot-create-as", domain,
         "--disk-only", "--no-metadata", "--atomic",
         "--diskspec", f"{target},snapshot=external,file={overlay}",
         *[f"--diskspec={other},snapshot=no" for other in others]],
        check=True, capture_output=True,
    )


async def test_domain_record(hv: LibvirtHypervisor, guest: Domain) -> None:
    dom = await hv.get_domain(guest.name)
    assert dom.state is DomainState.RUNNING
    assert dom.guest_agent is AgentState.CONNECTED
    assert [v.target for v in dom.volumes] == ["vda", "vdb"]
    assert all(v.volume_id == v.serial for v in dom.volumes)
    assert guest.name in [d.name for d in await hv.list_domains()]


async def test_chain_from_the_live_xml_matches_qemu_img(
    hv: LibvirtHypervisor, guest: Domain
) -> None:
    vda = (await hv.get_domain(guest.name)).volume("vda")  # now, not at boot
    assert vda is not None
    overlay = Path(vda.active_file).with_name(Path(vda.active_file).name + ".by-hand")
    external_overlay(guest.name, "vda", overlay, others=["vdb"])
    dom = await hv.get_domain(guest.name)
    for vol in dom.volumes:
        # qemu-img with the top format named, and gasnap's own header walk
        out = subprocess.run(["qemu-img", "info", "-U", "-f", vol.format, "--backing-chain",
                              "--output=json", vol.active_file], check=True,
                             capture_output=True, text=True).stdout
        probed = json.loads(out)
        assert [layer.path for layer in vol.chain] == [i["filename"] for i in probed]
        assert [layer.format for layer in vol.chain] == [i["format"] for i in probed]
        assert await images.read_chain(vol.active_file, vol.format) == vol.chain
    new_vda = dom.volume("vda")
    assert new_vda is not None
    assert [layer.path for layer in new_vda.chain] == [str(overlay), *(x.path for x in vda.chain)]


async def test_unknown_domain(hv: LibvirtHypervisor) -> None:
    with pytest.raises(DomainNotFound):
        await hv.get_domain("gt-no-such-domain")


async def test_agent_round_trip(hv: LibvirtHypervisor, guest: Domain) -> None:
    agent, name = hv.agent, guest.name
    await agent.ping(name)
    assert await agent.fsfreeze_status(name, 5) is FreezeState.THAWED
    before = len(await freeze_log(hv, name))
    try:
        assert await agent.fsfreeze(name, 10) == 2
        assert await agent.fsfreeze_status(name, 5) is FreezeState.FROZEN
    finally:
        thawed = await agent.fsthaw(name, 10)
    assert thawed == 2
    assert await agent.fsfreeze_status(name, 5) is FreezeState.THAWED
    log = (await freeze_log(hv, name))[before:]
    assert [event for event, _ in log] == ["freeze", "thaw"]
    assert log[1][1] > log[0][1]
    # Thawing a thawed guest is harmless (qemu-ga still runs the thaw hook).
    assert await agent.fsthaw(name, 10) == 0
    mounts = {fs["mountpoint"] for fs in await agent.fsinfo(name, 5)}
    assert {"/data", "/data1"} <= mounts


async def test_reading_disks_pings_no_guest_agent(
    hv: LibvirtHypervisor, guest: Domain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REVIEW item 16: reading a domain's disks (plans, delete's chain polls,
    Nova's volume lookup across every domain) sends nothing to qemu-ga; only
    a caller that asks for the agent's state pings it."""
    sent: list[str] = []
    real = hv.agent_channel.agent_command

    async def counting(domain: str, command: str, arguments: Any, timeout: float) -> Any:
        sent.append(command)
        return await real(domain, command, arguments, timeout)

    monkeypatch.setattr(hv.agent_channel, "agent_command", counting)
    dom = await hv.get_domain(guest.name)
    await hv.list_domains()
    assert sent == []
    assert dom.guest_agent is AgentState.CONNECTED  # as the channel says
    probed = await hv.get_domain(guest.name, probe_agent=True)
    assert (probed.guest_agent, sent) == (AgentState.CONNECTED, ["guest-ping"])


async def test_agent_command_passes_arguments(hv: LibvirtHypervisor, guest: Domain) -> None:
    reply = await hv.agent.command(guest.name, "guest-sync", {"id": 4242}, 5)
    assert reply == 4242
    info = await hv.agent.command(guest.name, "guest-info", None, 5)
    enabled = {c["name"] for c in info["supported_commands"] if c["enabled"]}
    assert {"guest-exec", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"} <= enabled
    assert json.dumps(info)  # plain JSON types


# --- held domains: resolved once, by UUID --------------------------------------

_SHELL = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os></domain>"""


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every lookup by name this process makes through libvirt-python."""
    seen: list[str] = []
    real = libvirt.virConnect.lookupByName

    def counting(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
        seen.append(name)
        return real(conn, name)

    monkeypatch.setattr(libvirt.virConnect, "lookupByName", counting)
    return seen


async def test_calls_on_a_held_domain_need_no_lookup_by_name(
    hv: LibvirtHypervisor, guest: Domain, lookups: list[str]
) -> None:
    """The freeze window's calls (agent commands, the switch) use the handle
    the hold found: no round trip to libvirtd to resolve the name again."""
    async with hv.hold({guest.name: guest.uuid}):
        async with hv.hold({guest.name: guest.uuid}):  # holds nest (a group and a delete)
            await hv.agent.ping(guest.name)
        await hv.agent.ping(guest.name)
        assert guest.uuid in await hv.domain_xml(guest.name)
    assert lookups == []
    await hv.agent.ping(guest.name)  # released: by name again
    assert lookups == [guest.name]


@pytest.fixture
def shells() -> Iterator[libvirt.virConnect]:
    """A connection for defining inactive domains named gt-held*, undefined after."""
    conn = libvirt.open(URI)
    try:
        yield conn
    finally:
        for dom in conn.listAllDomains(0):
            if dom.name().startswith("gt-held"):
                dom.undefine()
        conn.close()


async def test_a_hold_follows_the_planned_domain_not_its_name(
    hv: LibvirtHypervisor, shells: libvirt.virConnect
) -> None:
    planned = shells.defineXML(_SHELL.format(name="gt-held"))
    planned_uuid = planned.UUIDString()
    with pytest.raises(DomainNotFound):
        async with hv.hold({"gt-held": str(uuid.uuid4())}):
            pass
    async with hv.hold({"gt-held": planned_uuid}):
        planned.rename("gt-held-renamed", 0)
        newcomer = shells.defineXML(_SHELL.format(name="gt-held"))
        # Inside the hold the name means the planned domain, not the newcomer.
        assert planned_uuid in await hv.domain_xml("gt-held")
    assert newcomer.UUIDString() in await hv.domain_xml("gt-held")
    with pytest.raises(DomainChanged, match="gt-held-renamed"):
        async with hv.hold({"gt-held": planned_uuid}):
            pass
