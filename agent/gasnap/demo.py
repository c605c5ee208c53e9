"""``gasnap demo``: the README's first command.

Until snapshot creation lands (issue 3) the demo boots a lab guest and shows
its domain record: kernel, data disks, chain and a connected guest agent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .lab.guests import Lab
from .lab.workload import sh
from .virt import LibvirtHypervisor

DEMO_GUEST = "gasnap-demo"


async def run_demo(say: Callable[..., None], uri: str = "qemu:///system") -> dict[str, Any]:
    hv = LibvirtHypervisor(uri)
    try:
        lab = Lab(hv)
        say(f"booting lab guest {DEMO_GUEST} (TCG, 2 data disks) ...")
        dom = await lab.up(DEMO_GUEST, disks=2)
        record = dom.to_record()
        say(f"guest agent: {record['guest_agent']}")
        for vol in record["volumes"]:
            say(f"  {vol['target']}  volume {vol['volume_id']}")
            say(f"       active {vol['active_file']}")
        mounts = await sh(hv, DEMO_GUEST, "grep ' /data' /proc/mounts")
        say("mounted in the guest:")
        for line in mounts.splitlines():
            say(f"  {line}")
        say(f"done; remove the guest with: gasnap lab down {DEMO_GUEST}")
        return {"domain": record}
    finally:
        await hv.close()
