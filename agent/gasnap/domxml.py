"""Reading disks and backing chains out of libvirt domain XML.

Pure functions over XML text, so they can be tested without libvirt.  The
live XML of a running domain carries the whole chain in nested
``<backingStore>`` elements; an inactive definition usually does not, which
``DiskSpec.chain_complete`` reports so the caller can probe the images.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from .errors import GasnapError
from .hypervisor import Layer

AGENT_CHANNEL = "org.qemu.guest_agent.0"


class DomainXMLError(GasnapError):
    code = "domain_xml"


@dataclass(frozen=True)
class DiskSpec:
    target: str
    serial: str | None
    source_type: str
    chain: tuple[Layer, ...]
    # False when the XML does not say where the chain ends (inactive XML):
    # the layers below the first one must then be read from the images.
    chain_complete: bool
    shareable: bool = False
    readonly: bool = False


@dataclass(frozen=True)
class AgentChannel:
    present: bool
    connected: bool


def _parse(xml: str) -> ET.Element:
    try:
        return ET.fromstring(xml)  # noqa: S314 - produced by libvirtd
    except ET.ParseError as err:
        raise DomainXMLError(f"unparsable domain XML: {err}") from err


def _source_path(elem: ET.Element, source_type: str) -> str:
    src = elem.find("source")
    if src is None:
        return ""
    attr = {"file": "file", "block": "dev", "dir": "dir", "volume": "volume"}.get(source_type)
    if attr is None:
        return src.get("name", "")
    return src.get(attr, "")


def _format(elem: ET.Element, tag: str) -> str:
    fmt = elem.find(tag)
    return fmt.get("type", "") if fmt is not None else ""


def _chain(disk: ET.Element, source_type: str) -> tuple[tuple[Layer, ...], bool]:
    layers = [Layer(_source_path(disk, source_type), _format(disk, "driver"))]
    node = disk.find("backingStore")
    while node is not None:
        if node.find("source") is None:
            # An empty <backingStore/> is libvirt's explicit end of chain.
            return tuple(layers), True
        layers.append(Layer(_source_path(node, node.get("type", "file")), _format(node, "format")))
        node = node.find("backingStore")
    return tuple(layers), False


def disks(xml: str) -> list[DiskSpec]:
    """Every ``device='disk'`` disk of the domain, in XML order."""
    root = _parse(xml)
    result: list[DiskSpec] = []
    for disk in root.findall("./devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue
        target = disk.find("target")
        if target is None or not target.get("dev"):
            continue
        source_type = disk.get("type", "file")
        serial_elem = disk.find("serial")
        serial = serial_elem.text.strip() if serial_elem is not None and serial_elem.text else None
        chain, complete = _chain(disk, source_type)
        result.append(DiskSpec(str(target.get("dev")), serial, source_type, chain, complete,
                               shareable=disk.find("shareable") is not None,
                               readonly=disk.find("readonly") is not None))
    return result


def name(xml: str) -> str:
    elem = _parse(xml).find("name")
    if elem is None or not elem.text:
        raise DomainXMLError("domain XML without a name")
    return elem.text


_UNITS = {"b": 1, "bytes": 1, "kb": 10**3, "k": 1 << 10, "kib": 1 << 10, "mb": 10**6,
          "m": 1 << 20, "mib": 1 << 20, "gb": 10**9, "g": 1 << 30, "gib": 1 << 30,
          "tb": 10**12, "t": 1 << 40, "tib": 1 << 40}


def memory(xml: str) -> int:
    """The domain's RAM in bytes (``currentMemory``, else ``memory``), 0 if unknown."""
    root = _parse(xml)
    elem = root.find("currentMemory")
    if elem is None:
        elem = root.find("memory")
    if elem is None or not (elem.text or "").strip().isdigit():
        return 0
    return int((elem.text or "").strip()) * _UNITS.get(elem.get("unit", "KiB").lower(), 1024)


def agent_channel(xml: str) -> AgentChannel:
    root = _parse(xml)
    for chan in root.findall("./devices/channel"):
        target = chan.find("target")
        if target is not None and target.get("name") == AGENT_CHANNEL:
            return AgentChannel(present=True, connected=target.get("state") == "connected")
    return AgentChannel(present=False, connected=False)


def volume_id(domain_name: str, spec: DiskSpec) -> str:
    """The Nova/Cinder convention: the serial when there is one."""
    return spec.serial or f"{domain_name}/{spec.target}"


def snapshot_xml(overlays: dict[str, str], targets: list[str],
                 memory: str | None = None) -> str:
    """A snapshot definition: TARGETS in OVERLAYS switch to their
    (pre-created, qcow2) overlay; every other disk is left alone.  MEMORY:
    the RAM and device state are saved to that file in the same instant."""
    root = ET.Element("domainsnapshot")
    if memory is not None:
        ET.SubElement(root, "memory", snapshot="external", file=memory)
    disks_elem = ET.SubElement(root, "disks")
    for target in targets:
        if target in overlays:
            disk = ET.SubElement(disks_elem, "disk", name=target, snapshot="external",
                                 type="file")
            ET.SubElement(disk, "driver", type="qcow2")
            ET.SubElement(disk, "source", file=overlays[target])
        else:
            ET.SubElement(disks_elem, "disk", name=target, snapshot="no")
    return ET.tostring(root, encoding="unicode")


def with_disk_sources(xml: str, overlays: dict[str, str], fmt: str = "qcow2") -> str:
    """Inactive domain XML with the disks in OVERLAYS pointing at their qcow2
    overlay (the offline switch); the chain below is read from the headers."""
    root = _parse(xml)
    found = set()
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in overlays:
            continue
        found.add(dev)
        source = disk.find("source")
        driver = disk.find("driver")
        if source is None or driver is None:
            raise DomainXMLError(f"disk {dev} has no source or driver element")
        source.set("file", overlays[dev])
        driver.set("type", fmt)
        for backing in disk.findall("backingStore"):
            disk.remove(backing)
    missing = set(overlays) - found
    if missing:
        raise DomainXMLError(f"no disk {', '.join(sorted(missing))} in the domain XML")
    return ET.tostring(root, encoding="unicode")


def mirror_ready(xml: str, target: str) -> bool:
    """Whether TARGET's block job says ``<mirror ready='yes'>`` (ready to pivot)."""
    for disk in _parse(xml).findall("./devices/disk"):
        tgt = disk.find("target")
        if tgt is not None and tgt.get("dev") == target:
            mirror = disk.find("mirror")
            return mirror is not None and mirror.get("ready") == "yes"
    return False


# --- hot-plugged disks (clones) ---------------------------------------------------


def disk_xml(path: str, target: str, serial: str, *, readonly: bool) -> str:
    """A qcow2 file disk on the virtio bus at TARGET with SERIAL (the chain
    below is read from the file's header, which names every format)."""
    disk = ET.Element("disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2")
    ET.SubElement(disk, "source", file=path)
    ET.SubElement(disk, "target", dev=target, bus="virtio")
    ET.SubElement(disk, "serial").text = serial
    if readonly:
        ET.SubElement(disk, "readonly")
    return ET.tostring(disk, encoding="unicode")


def targets(xml: str) -> dict[str, str | None]:
    """Every disk's target (CD-ROMs and floppies too), with its serial."""
    found: dict[str, str | None] = {}
    for disk in _parse(xml).findall("./devices/disk"):
        target = disk.find("target")
        if target is not None and target.get("dev"):
            serial = disk.find("serial")
            found[str(target.get("dev"))] = (serial.text or "").strip() if serial is not None \
                else None
    return found


def disk_with_serial(xml: str, serial: str) -> str | None:
    """The ``<disk>`` element whose serial is SERIAL, as XML, or None."""
    for disk in _parse(xml).findall("./devices/disk"):
        found = disk.find("serial")
        if found is not None and (found.text or "").strip() == serial:
            return ET.tostring(disk, encoding="unicode")
    return None
