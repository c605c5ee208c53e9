"""P8: memory snapshots, gasnap against virsh in the same run.

The guest's pause comes from libvirt's own account of the finished job
(``downtime``) for both sides; gasnap reports it in the task's result.  A
revert with memory is set against ``virsh restore`` of a ``virsh save``
image of the same guest: the restore alone, what any memory revert costs at
least.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from ..lab.baseline import last_downtime_ms
from ..lab.guests import Lab
from ..virt import LibvirtHypervisor
from .cases import order
from .rig import URI, Agent, Settled, guests, settle, settled_figure, timed, timed_task
from .stats import Comparison, Figure


async def memory(hv: LibvirtHypervisor, agent: Agent, runs: int, scratch: Path
                 ) -> list[Comparison | Figure]:
    pause = Comparison("P8", "guest pause of a memory snapshot (256 MiB guest)", "ms",
                       "gasnap --memory (live, frozen around it)",
                       "virsh snapshot-create-as --memspec, not live", "<= 1x")
    live = Comparison("P8", "the same pause against virsh's live mode", "ms",
                      "gasnap --memory", "virsh snapshot-create-as --memspec --live", "<= 1.5x",
                      note="gasnap adds the freeze and thaw around the same live save")
    wall = Comparison("P8", "wall time of a memory snapshot", "s", "gasnap --memory",
                      "virsh snapshot-create-as --memspec --live", "<= 2x")
    restore = Comparison("P8", "revert with memory vs virsh restore of a virsh save", "s",
                         "gasnap snapshot revert --force", "virsh restore", "<= 3x",
                         note="gasnap also keeps the state left (with memory) first")
    settles: list[Settled] = []
    async with guests(hv, ["gb-memory"]) as (name,):
        for i in range(runs):
            for which in order(i):
                settles.append(await settle())
                if which == "a":
                    task, seconds = await timed_task(agent.cli(
                        "snapshot", "create", name, "--memory", "--json"))
                    wall.a.append(seconds)
                    pause.a.append(task["result"]["pause_ms"][name])
                    live.a.append(task["result"]["pause_ms"][name])
                    snap = task["result"]["snapshots"][0]
                else:
                    seconds, downtime = await _virsh_memory(hv, name, scratch, live_mode=True)
                    wall.b.append(seconds)
                    live.b.append(downtime)
                    pause.b.append((await _virsh_memory(hv, name, scratch,
                                                        live_mode=False))[1])
            settles.append(await settle())
            _, seconds = await timed_task(agent.cli("snapshot", "revert", snap["id"],
                                                   "--force", "--json"))
            restore.a.append(seconds)
            restore.b.append(await _save_and_restore(name, scratch))
            await Lab(hv).wait_for_agent(name, 120)
    return [pause, live, wall, restore, settled_figure("P8", settles)]


async def _virsh_memory(hv: LibvirtHypervisor, name: str, scratch: Path, *,
                        live_mode: bool) -> tuple[float, float]:
    """virsh's memory snapshot onto its own overlay; (seconds, pause in ms)."""
    dom = await hv.get_domain(name)
    vol = dom.volumes[0]
    tag = uuid.uuid4()
    overlay = f"{vol.active_file}.virsh-{tag}"
    argv = ["virsh", "-q", "-c", URI, "snapshot-create-as", name, "--no-metadata", "--atomic",
            "--memspec", f"file={scratch / f'mem-{tag}'},snapshot=external",
            "--diskspec", f"{vol.target},snapshot=external,file={overlay}"]
    seconds = await timed([*argv, "--live"] if live_mode else argv)
    downtime = await last_downtime_ms(hv.connection, name)
    (scratch / f"mem-{tag}").unlink(missing_ok=True)
    return seconds, downtime


async def _save_and_restore(name: str, scratch: Path) -> float:
    image = scratch / f"save-{uuid.uuid4()}"
    await timed(["virsh", "-q", "-c", URI, "save", name, str(image)])
    seconds = await timed(["virsh", "-q", "-c", URI, "restore", str(image)])
    image.unlink(missing_ok=True)
    return seconds
