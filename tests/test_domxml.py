"""Parsing disks, chains and the agent channel out of domain XML (no libvirt)."""

from __future__ import annotations

import pytest

from gasnap import domxml
from gasnap.hypervisor import Layer

LIVE = """
<domain type='qemu' id='3'>
  <name>web1</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/vol/volume-aaa.snap2' index='3'/>
      <backingStore type='file' index='2'>
        <format type='qcow2'/>
        <source file='/vol/volume-aaa.snap1'/>
        <backingStore type='file' index='1'>
          <format type='raw'/>
          <source file='/vol/volume-aaa'/>
          <backingStore/>
        </backingStore>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <serial>aaa</serial>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/images/root.img'/>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/img'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>
  </devices>
</domain>
"""

INACTIVE = """
<domain type='qemu'>
  <name>db1</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/vol/volume-bbb.snap1'/>
      <target dev='vda' bus='virtio'/>
      <serial>bbb</serial>
    </disk>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
</domain>
"""


def test_live_chain_is_read_to_its_end() -> None:
    vda = domxml.disks(LIVE)[0]
    assert vda.target == "vda"
    assert vda.serial == "aaa"
    assert vda.chain == (
        Layer("/vol/volume-aaa.snap2", "qcow2"),
        Layer("/vol/volume-aaa.snap1", "qcow2"),
        Layer("/vol/volume-aaa", "raw"),
    )
    assert vda.chain_complete


def test_only_disks_are_volumes_and_ids_follow_the_nova_convention() -> None:
    specs = domxml.disks(LIVE)
    assert [s.target for s in specs] == ["vda", "vdb", "vdc"]
    assert [domxml.volume_id("web1", s) for s in specs] == ["aaa", "web1/vdb", "web1/vdc"]
    assert specs[1].chain == (Layer("/images/root.img", "raw"),)
    assert specs[1].chain_complete
    assert specs[2].source_type == "network"
    assert specs[2].chain[0].path == "pool/img"


def test_inactive_xml_says_the_chain_is_incomplete() -> None:
    (vda,) = domxml.disks(INACTIVE)
    assert vda.chain == (Layer("/vol/volume-bbb.snap1", "qcow2"),)
    assert not vda.chain_complete


def test_agent_channel_state() -> None:
    assert domxml.agent_channel(LIVE) == domxml.AgentChannel(present=True, connected=True)
    assert domxml.agent_channel(INACTIVE) == domxml.AgentChannel(present=True, connected=False)
    bare = "<domain><name>x</name><devices/></domain>"
    assert domxml.agent_channel(bare) == domxml.AgentChannel(present=False, connected=False)


def test_unparsable_xml_is_a_gasnap_error() -> None:
    with pytest.raises(domxml.DomainXMLError):
        domxml.disks("<domain>")
