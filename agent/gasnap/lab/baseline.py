"""The bare libvirt client the benchmarks measure gasnap against.

gasnap's freeze, switch and thaw without gasnap (libvirt-python in one
thread, nothing else), and libvirt's own QUIESCE: the baselines of P2; the
same for a group of domains, a thread each: P3's.  Kept
in the lab, beside the other direct libvirt commands, so the benchmarks
themselves import no backend.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import libvirt
import libvirt_qemu

from .. import domxml
from ..virt.connection import Connection


def bare_switch(uri: str, name: str, overlays: dict[str, str], others: list[str], *,
                 mode: str) -> None:
    """MODE explicit: freeze, switch, thaw; quiesce: libvirt's one call;
    floor: freeze, thaw."""
    flags = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
             | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
             | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
             | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
    xml = domxml.snapshot_xml(overlays, [*overlays, *others]) if overlays else ""
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByName(name)
        if mode == "quiesce":
            dom.snapshotCreateXML(xml, flags | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE)
            return
        libvirt_qemu.qemuAgentCommand(dom, '{"execute": "guest-fsfreeze-freeze"}', 10, 0)
        try:
            if mode == "explicit":
                dom.snapshotCreateXML(xml, flags)
        finally:
            libvirt_qemu.qemuAgentCommand(dom, '{"execute": "guest-fsfreeze-thaw"}', 10, 0)
    finally:
        conn.close()


async def last_downtime_ms(conn: Connection, name: str) -> float:
    """How long NAME stood still in its last finished job (libvirt's count)."""
    stats = await conn.call(
        lambda c: c.lookupByName(name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED),
        what=f"{name}: job stats")
    return float(stats.get("downtime", 0))


def bare_group_switch(uri: str, overlays: dict[str, dict[str, str]],
                      others: dict[str, list[str]]) -> dict[str, float]:
    """P3's bare baseline: gasnap's group window without gasnap.  One thread
    per domain on one connection; every freeze, then every switch onto the
    pre-made OVERLAYS, then every thaw, each phase starting once the last
    call of the one before has returned.  Seconds per phase (first call to
    last answer)."""
    flags = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
             | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
             | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
             | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
    conn = libvirt.open(uri)
    try:
        doms = {name: conn.lookupByName(name) for name in overlays}
        calls: dict[str, Callable[[str], object]] = {
            "freeze": lambda n: libvirt_qemu.qemuAgentCommand(
                doms[n], '{"execute": "guest-fsfreeze-freeze"}', 10, 0),
            "switch": lambda n: doms[n].snapshotCreateXML(domxml.snapshot_xml(
                overlays[n], [*overlays[n], *others[n]]), flags),
            "thaw": lambda n: libvirt_qemu.qemuAgentCommand(
                doms[n], '{"execute": "guest-fsfreeze-thaw"}', 10, 0),
        }
        phases: dict[str, float] = {}

        def phase(name: str) -> None:
            started = time.monotonic()
            list(pool.map(calls[name], doms))
            phases[name] = time.monotonic() - started

        with ThreadPoolExecutor(len(doms)) as pool:
            phase("freeze")
            try:
                phase("switch")
            finally:
                phase("thaw")
        return phases
    finally:
        conn.close()
