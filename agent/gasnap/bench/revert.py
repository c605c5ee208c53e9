"""P7: revert, gasnap against the same steps done by hand, in one run.

The by-hand baseline is what an operator's script on libvirt 9.0 does (it
cannot revert external snapshots itself): a quiesced virsh snapshot to keep
the state, a shutdown through the guest agent, a fresh overlay with
qemu-img, the definition rewritten, a start.  Both wait for the guest agent
to answer again before the next run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from .. import domxml
from ..hypervisor import DomainState
from ..images import read_qcow2_header
from ..lab.guests import Lab
from ..virt import LibvirtHypervisor
from .cases import order, snapshot
from .rig import URI, Agent, Settled, guests, settle, settled_figure, timed, timed_task
from .stats import Comparison, Figure


async def revert(hv: LibvirtHypervisor, agent: Agent, runs: int, scratch: Path
                 ) -> list[Comparison | Figure]:
    """A forced revert of a running one-disk guest (keep the state left,
    shut down, switch, start) and the switch alone on a stopped guest, each
    against virsh and qemu-img doing the same steps in the same run."""
    forced = Comparison("P7", "forced revert of a running 1-disk guest, wall time", "s",
                        "gasnap snapshot revert --force",
                        "by hand: virsh snapshot --quiesce, shutdown, qemu-img, define, start",
                        "<= 1.2x")
    offline = Comparison("P7", "revert of a stopped guest (the switch alone), wall time", "s",
                         "gasnap snapshot revert --no-start",
                         "by hand: qemu-img create, virsh define", "<= 3x",
                         note="gasnap also keeps the state left as a before-revert snapshot")
    phases: dict[str, list[float]] = {}
    settles: list[Settled] = []
    async with guests(hv, ["gb-revert"]) as (name,):
        lab = Lab(hv)
        for i in range(runs):
            for which in order(i):
                snap = await snapshot(agent, name)
                settles.append(await settle())  # the last run's boot
                if which == "a":
                    task, seconds = await timed_task(agent.cli(
                        "snapshot", "revert", snap["id"], "--force", "--json"))
                    forced.a.append(seconds)
                    for phase, spent in task["result"]["phases"].items():
                        phases.setdefault(phase, []).append(spent)
                else:
                    forced.b.append(await _revert_by_hand(hv, name, snap, scratch,
                                                          running=True))
                await lab.wait_for_agent(name, 300)
        await hv.destroy(name)
        for i in range(runs):
            for which in order(i):
                snap = await snapshot(agent, name)
                settles.append(await settle())
                if which == "a":
                    _, seconds = await timed_task(agent.cli(
                        "snapshot", "revert", snap["id"], "--no-start", "--json"))
                    offline.a.append(seconds)
                else:
                    offline.b.append(await _revert_by_hand(hv, name, snap, scratch,
                                                           running=False))
    return [forced, offline, *(
        Figure("P7", f"forced revert, phase {phase}", "s", spent, None,
               note="from the task's result") for phase, spent in phases.items()),
        settled_figure("P7", settles)]


async def _revert_by_hand(hv: LibvirtHypervisor, name: str, snap: dict[str, str],
                          scratch: Path, *, running: bool) -> float:
    """What an operator's script does: keep the state (a quiesced virsh
    snapshot), shut down and wait, a fresh overlay on the image, define,
    start.  The formats are named as gasnap names them."""
    image, overlay = snap["image"], f"{snap['image']}.by-hand-{uuid.uuid4()}"
    fmt = str((await asyncio.to_thread(read_qcow2_header, snap["file"])).backing_format)
    started = time.monotonic()
    if running:
        await timed(["virsh", "-q", "-c", URI, "snapshot-create-as", name, "--disk-only",
                     "--no-metadata", "--atomic", "--quiesce"])
        await timed(["virsh", "-q", "-c", URI, "shutdown", name, "--mode", "agent"])
        await _shut_off(hv, name)
    await timed(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b",
                 Path(image).name, overlay])
    xml = await hv.domain_xml(name, inactive=True)
    defined = scratch / "revert.xml"
    defined.write_text(domxml.with_disk_sources(xml, {"vda": overlay}))
    await timed(["virsh", "-q", "-c", URI, "define", str(defined)])
    if running:
        await timed(["virsh", "-q", "-c", URI, "start", name])
        await Lab(hv).wait_for_agent(name, 300)  # as gasnap's task waits for it
    return time.monotonic() - started


async def _shut_off(hv: LibvirtHypervisor, name: str, seconds: float = 300) -> None:
    for _ in range(int(seconds / 0.5)):
        if (await hv.get_domain(name)).state is DomainState.SHUTOFF:
            return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"{name} did not power off within {seconds:.0f} s")
