"""Defining, rebooting and removing lab domains: what only the lab does.

Workflow code never defines, reboots or removes a domain; these commands sit
here, apart from the hypervisor interface, and take the same one ``call``
path as every other libvirt call.
"""

from __future__ import annotations

import libvirt

from ..virt.connection import Connection


async def define_and_start(conn: Connection, xml: str) -> str:
    def run(c: libvirt.virConnect) -> str:
        dom = c.defineXML(xml)
        try:
            dom.create()
        except libvirt.libvirtError:
            dom.undefine()
            raise
        return str(dom.name())

    return await conn.call(run, what="define domain", retry=False)


async def reboot(conn: Connection, name: str) -> None:
    """A clean reboot through the guest agent (qemu-ga never answers it)."""
    await conn.call(lambda c: c.lookupByName(name).reboot(
        libvirt.VIR_DOMAIN_REBOOT_GUEST_AGENT), what=f"reboot {name}", retry=False)


async def undefine(conn: Connection, name: str) -> None:
    await conn.call(lambda c: c.lookupByName(name).undefine(), what=f"undefine {name}")


async def metadata(conn: Connection, name: str, uri: str) -> str | None:
    """The custom metadata element under URI, or None."""

    def run(c: libvirt.virConnect) -> str | None:
        try:
            return str(c.lookupByName(name).metadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT, uri, 0))
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            raise

    return await conn.call(run, what=f"domain {name} metadata")


async def names(conn: Connection) -> list[str]:
    return await conn.call(lambda c: sorted(d.name() for d in c.listAllDomains(0)),
                           what="list domains")
