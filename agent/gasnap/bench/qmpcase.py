"""P1 and P2 on the qmp backend (#21): a create on a bare QEMU guest, whose
overlay's block node is added before the freeze, so that only one QMP
``transaction`` runs inside the window.

Measured interleaved in one run, each round in a rotating order:

* gasnap's create on a bare QEMU guest (qmp backend): P1 end to end through
  the CLI, P2 from the guest's own fsfreeze-hook log;
* libvirt's QUIESCE onto a pre-made overlay, on a libvirt guest of the same
  kind (one disk, the same image, TCG): the baseline of P2;
* the floor of the bare guest's window: a freeze and a thaw over its qga
  socket with nothing between, on one connection held throughout (as the
  freeze guard holds it for gasnap), and on a connection per command (what
  a client that lets go pays: qemu-ga sleeps 100 ms once its host side
  has gone).

The snapshot is merged back (gasnap's active commit) after each round, so
every round starts from the same chain.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from .. import qemuimg
from ..client import ApiClient
from ..guestagent import THAW_TIMEOUT
from ..hypervisor import Volume
from ..images import virtual_size
from ..lab.bare import BareLab
from ..lab.baseline import bare_switch
from ..qmp.backend import QmpHypervisor
from ..virt import LibvirtHypervisor
from .cases import merge_back
from .rig import URI, Agent, guests, log_length, settle, settled_figure, timed, window_ms
from .stats import Comparison, Figure

NAME = "gb-qmp"


async def create_on_qmp(hv: LibvirtHypervisor, runs: int, base: Path
                        ) -> list[Comparison | Figure]:
    p1 = Figure("P1", "end-to-end create of a quiesced snapshot, qmp backend "
                "(bare QEMU)", "s", [], None, note="gasnap snapshot create, as on libvirt")
    p2 = Comparison("P2", "freeze window inside the guest, qmp backend (bare QEMU)", "ms",
                    "gasnap on bare QEMU", "libvirt QUIESCE", "<= 0.75x",
                    note="the overlays' nodes are added before the freeze: only one QMP "
                    "transaction runs in the window")
    floor: list[float] = []
    floor_reconnecting: list[float] = []
    lab = BareLab(run_dir=base / "qmp-run", lab_dir=base / "qmp-lab")
    qmp = QmpHypervisor(lab.run_dir)
    agent = Agent(base / "qmp-agent", config=f'[agent]\nhypervisor = "qmp"\n'
                  f'[qmp]\nrun_dir = "{lab.run_dir}"\n')
    try:
        await lab.up(NAME, disks=1, size_mib=32)
        async with guests(hv, ["gb-qmp-baseline"]) as (baseline,):
            await asyncio.to_thread(agent.start)
            client = ApiClient(agent.api)
            vol = (await hv.get_domain(baseline)).volumes[0]
            settles = [await settle()]
            for i in range(runs):
                steps = ["gasnap", "quiesce", "floor", "reconnecting"]
                for which in steps[i % 4:] + steps[:i % 4]:
                    if which == "gasnap":
                        since = await log_length(qmp, NAME)
                        p1.samples.append(await timed(agent.cli(
                            "snapshot", "create", NAME, "--quiesce", "required")))
                        p2.a.append(await window_ms(qmp, NAME, since))
                        await merge_back(qmp, client, NAME, "vda")
                    elif which in ("floor", "reconnecting"):
                        since = await log_length(qmp, NAME)
                        if which == "floor":
                            qmp.qga.pin(NAME)
                        await qmp.agent.fsfreeze(NAME, 10)
                        await qmp.agent.fsthaw(NAME, THAW_TIMEOUT)
                        await qmp.qga.unpin(NAME)
                        (floor if which == "floor" else floor_reconnecting).append(
                            await window_ms(qmp, NAME, since))
                    else:
                        p2.b.append(await _libvirt_quiesce(hv, baseline, vol, i))
    finally:
        agent.stop()
        await qmp.close()
        if lab.pid_of(NAME) is not None:
            await lab.down(NAME)
    return [p1, p2,
            Figure("P2", "window of a freeze and a thaw with nothing between, bare QEMU "
                   "(2 calls on one held NAME.qga connection)", "ms", floor, None,
                   note="the floor of any window on the bare guest: the goal is this "
                   "plus under 3 ms"),
            Figure("P2", "the same, one NAME.qga connection per call", "ms",
                   floor_reconnecting, None,
                   note="qemu-ga sleeps 100 ms once a client has left: why the guard "
                   "holds the connection from freeze to thaw"),
            settled_figure("P1", settles, where="bare QEMU")]


async def _libvirt_quiesce(hv: LibvirtHypervisor, name: str, vol: Volume, i: int) -> float:
    """libvirt's QUIESCE onto a pre-made overlay, then committed back."""
    active, target, fmt = vol.active_file, vol.target, vol.format
    overlay = Path(active).with_name(f"volume-bench-qmp-{i}.qcow2")
    await qemuimg.create_overlay(str(overlay), Path(active).name, fmt,
                                 await virtual_size(active, fmt))
    since = await log_length(hv, name)
    await asyncio.to_thread(bare_switch, URI, name, {target: str(overlay)}, [], mode="quiesce")
    window = await window_ms(hv, name, since)
    await timed(["virsh", "-q", "-c", URI, "blockcommit", name, target,
                 "--active", "--shallow", "--pivot", "--wait"])
    overlay.unlink()
    return window
