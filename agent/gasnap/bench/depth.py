"""P10: what a deep chain costs a guest's reads (why ``max_chain_depth``).

A guest writes a file of random data into its disk's base image; gasnap
then stacks empty snapshots onto it until the chain holds 16, then 64
files.  At each depth the guest reads the file back (its page cache dropped
not used, the read timed inside the guest), and ``qemu-img bench`` reads the
same chain from the host in the same run, so a slowdown can be told apart:
QEMU's block layer walking the chain (both slow down) or the guest's path.
"""

from __future__ import annotations

from ..lab.workload import sh
from ..virt import LibvirtHypervisor
from .rig import Agent, guests, settle, settled_figure, timed, timed_task
from .stats import Comparison, Figure

DEPTHS = (16, 64)
FILE_MIB = 128
DISK_MIB = 256
# Reads of one cluster (64 KiB) each, past the guest's page cache: every
# request walks the chain.  The lab's busybox dd prints no timing: the
# guest's uptime (10 ms steps) before and after.
_TIMED_READ = ("read t0 _ < /proc/uptime; "
               "dd if=/data/big of=/dev/null bs=64k iflag=direct 2>/dev/null; "
               'read t1 _ < /proc/uptime; echo "$t0 $t1"')


async def depth(hv: LibvirtHypervisor, agent: Agent, runs: int) -> list[Comparison | Figure]:
    guest = {d: Comparison("P10", f"guest read of {FILE_MIB} MiB in 64 KiB O_DIRECT reads, "
                                  f"chain of {d} vs 1 file",
                           "s", f"depth {d}", "depth 1", "<= 1.5x" if d <= 16 else "<= 2x",
                           note="the data lies in the base image; the layers above are "
                                "empty snapshots")
             for d in DEPTHS}
    host = {d: Comparison("P10", f"qemu-img bench read of the disk, chain of {d} vs 1 file",
                          "s", f"depth {d}", "depth 1", "<= 1.5x" if d <= 16 else "<= 2x",
                          note=f"{DISK_MIB} MiB in 1 MiB reads, the host's page cache warm")
            for d in DEPTHS}
    async with guests(hv, ["gb-depth"], size_mib=DISK_MIB) as (name,):
        await sh(hv, name, f"dd if=/dev/urandom of=/data/big bs=1M count={FILE_MIB} "
                           "conv=fsync 2>/dev/null", timeout=600)
        settles = [await settle()]
        baseline_guest = await _guest_reads(hv, name, runs)
        baseline_host = await _host_reads(hv, name, runs)
        made = 1
        for d in DEPTHS:
            while made < d:
                await timed_task(agent.cli("snapshot", "create", name, "--quiesce", "off",
                                           "--json"))
                made += 1
            guest[d].b, host[d].b = baseline_guest, baseline_host
            settles.append(await settle())
            guest[d].a = await _guest_reads(hv, name, runs)
            host[d].a = await _host_reads(hv, name, runs)
    return [*(c for d in DEPTHS for c in (guest[d], host[d])), settled_figure("P10", settles)]


async def _guest_reads(hv: LibvirtHypervisor, name: str, runs: int) -> list[float]:
    """Seconds the guest's dd took to read the file (one untimed read first)."""
    seconds = []
    for i in range(runs + 1):
        started, ended = (float(t) for t in (await sh(hv, name, _TIMED_READ,
                                                       timeout=600)).split())
        if i:
            seconds.append(ended - started)
    return seconds


async def _host_reads(hv: LibvirtHypervisor, name: str, runs: int) -> list[float]:
    vol = (await hv.get_domain(name)).volumes[0]
    argv = ["qemu-img", "bench", "-U", "-f", vol.format, "-c", str(DISK_MIB), "-s", "1M",
            "-S", "1M", vol.active_file]
    await timed(argv)  # the page cache warmed the same for every depth
    return [await timed(argv) for _ in range(runs)]
