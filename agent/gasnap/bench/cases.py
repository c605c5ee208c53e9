"""P1-P6 of issue 7.  Every comparison interleaves A (gasnap) and B (its
baseline) in the same run, alternating which goes first."""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import sqlite3
import statistics
import subprocess
import time
import uuid
from pathlib import Path

from .. import qemuimg
from ..client import ApiClient
from ..hypervisor import Hypervisor
from ..images import virtual_size
from ..lab.baseline import bare_group_switch, bare_switch
from ..lab.guests import Lab
from ..lab.workload import sh
from ..metastore import open_sqlite
from ..virt import LibvirtHypervisor
from .rig import (
    URI,
    Agent,
    Settled,
    cpu_busy,
    cpu_times,
    guests,
    log_length,
    settle,
    settled_figure,
    timed,
    timed_task,
    window_ms,
)
from .stats import Comparison, Figure

GIB = 1 << 30


def order(i: int) -> tuple[str, str]:
    return ("a", "b") if i % 2 == 0 else ("b", "a")


# --- P1 and P2: one snapshot, gasnap vs virsh --quiesce --------------------------


async def create_vs_virsh(hv: LibvirtHypervisor, agent: Agent, runs: int
                          ) -> list[Comparison | Figure]:
    """Every snapshot is merged back out of the chain right after it is
    measured (not timed), each side's with its own tool: all runs start from
    the same chain.  Left to grow, a chain slows both sides run after run
    (libvirt's work in the window grows with every layer) and gasnap's spare
    would never match a chain that virsh changed.

    Three more freeze windows per round, for reference, with no gasnap in
    between: a bare client doing gasnap's sequence (freeze, switch to a
    pre-made overlay, thaw: three libvirt calls), libvirt quiescing by itself
    onto the same kind of pre-made overlay (one call), and the floor of any
    window: freeze and thaw with nothing between."""
    p1 = Comparison("P1", "end-to-end create of a quiesced snapshot", "s",
                    "gasnap snapshot create", "virsh snapshot-create-as --disk-only "
                    "--quiesce --atomic --no-metadata", "<= 1.2x")
    p2 = Comparison("P2", "freeze window inside the guest", "ms", "gasnap",
                    "libvirt QUIESCE", "<= 0.95x")
    bare: dict[str, list[float]] = {"explicit": [], "quiesce": [], "floor": []}
    api: list[float] = []
    floor: list[float] = []
    virsh_floor: list[float] = []
    async with guests(hv, ["gb-one"]) as (name,):
        dom = await hv.get_domain(name)
        vol = dom.volumes[0]
        others = [v.target for v in dom.volumes[1:]]
        directory = Path(vol.active_file).parent
        client = ApiClient(agent.api)
        variants = ["a", "b", "explicit", "quiesce", "floor"]
        settles: list[Settled] = []
        for i in range(runs):
            settles.append(await settle())
            for which in variants[i % 5:] + variants[:i % 5]:
                since = await log_length(hv, name)
                if which == "a":
                    p1.a.append(await timed(agent.cli("snapshot", "create", name,
                                                      "--quiesce", "required")))
                    p2.a.append(await window_ms(hv, name, since))
                    await merge_back(hv, client, name, vol.target)
                    continue
                if which == "floor":
                    await asyncio.to_thread(bare_switch, URI, name, {}, others, mode="floor")
                    bare[which].append(await window_ms(hv, name, since))
                    continue
                overlay = directory / f"volume-bench-{which}-{i}.qcow2"
                if which == "b":
                    p1.b.append(await timed([
                        "virsh", "-q", "-c", URI, "snapshot-create-as", name,
                        "--name", f"bench-{i}", "--disk-only", "--quiesce", "--atomic",
                        "--no-metadata", "--diskspec",
                        f"{vol.target},snapshot=external,file={overlay}",
                        *[f"--diskspec={t},snapshot=no" for t in others]]))
                    p2.b.append(await window_ms(hv, name, since))
                else:
                    await qemuimg.create_overlay(str(overlay), Path(vol.active_file).name,
                                                 vol.format, await virtual_size(
                                                     vol.active_file, vol.format))
                    await asyncio.to_thread(bare_switch, URI, name, {vol.target: str(overlay)},
                                            others, mode=which)
                    bare[which].append(await window_ms(hv, name, since))
                await timed(["virsh", "-q", "-c", URI, "blockcommit", name, vol.target,
                             "--active", "--shallow", "--pivot", "--wait"])
                overlay.unlink()
            # Where P1's time goes: the same request from a running client (the
            # agent's share), and the CLI process answering a trivial request.
            api.append(await asyncio.to_thread(_api_create, agent.api, name) * 1000)
            await merge_back(hv, client, name, vol.target)
            floor.append(await timed(agent.cli("task", "list")) * 1000)
            virsh_floor.append(await timed(["virsh", "-q", "-c", URI, "list"]) * 1000)
    return [p1, p2,
            Figure("P2", "window of a bare client: freeze, switch, thaw (3 calls)", "ms",
                   bare["explicit"], None, note="gasnap's sequence without gasnap: "
                   "libvirt-python in one thread, the overlay made beforehand"),
            Figure("P2", "window of libvirt QUIESCE onto a pre-made overlay (1 call)", "ms",
                   bare["quiesce"], None, note="QUIESCE|REUSE_EXT: libvirt freezes, "
                   "switches and thaws by itself"),
            Figure("P2", "window of a freeze and a thaw with nothing between (2 calls)",
                   "ms", bare["floor"], None, note="the floor of any window on this guest: "
                   "the guest agent's two round trips and hooks"),
            Figure("P1", "the same create through the API from a running client", "ms", api,
                   None, note="the agent's share of P1"),
            Figure("P1", "gasnap task list (the CLI process alone)", "ms", floor, None,
                   note="interpreter start, imports, one request"),
            Figure("P1", "virsh list (the virsh process alone)", "ms", virsh_floor, None,
                   note="process start, connect to libvirtd, one call"),
            settled_figure("P1", settles)]


def _api_create(api: str, domain: str) -> float:
    client = ApiClient(api)
    started = time.monotonic()
    task = client.request("POST", "/v1/snapshots", {"domains": [domain],
                                                    "quiesce": "required"})["task"]
    task = client.wait_task(task)
    elapsed = time.monotonic() - started
    if task["state"] != "succeeded":
        raise RuntimeError(f"create through the API failed: {task}")
    return elapsed


async def merge_back(hv: Hypervisor, client: ApiClient, domain: str,
                      target: str) -> None:
    """Delete the snapshot whose overlay is active now (gasnap's own active
    commit + pivot): the chain is as it was before that snapshot."""
    dom = await hv.get_domain(domain, probe_agent=False)
    vol = dom.volume(target)
    assert vol is not None
    listing = await asyncio.to_thread(client.get, f"/v1/snapshots?domain={domain}")
    newest = next(s for s in listing["snapshots"] if s["file"] == vol.active_file)
    task = await asyncio.to_thread(client.request, "DELETE",
                                   f"/v1/snapshots/{newest['id']}?strategy=commit")
    task = await asyncio.to_thread(client.wait_task, task["task"])
    if task["state"] != "succeeded":
        raise RuntimeError(f"merging {newest['id']} back failed: {task}")


# --- P3: a group of guests vs one ---------------------------------------------------


async def group(hv: LibvirtHypervisor, agent: Agent, runs: int, size: int
                ) -> list[Comparison | Figure]:
    """The group's create against one guest's, and its window phase by phase
    against a bare threaded libvirt client doing the same on the same guests
    (``bare_group_switch``), so that what is the host's and what is
    gasnap's shows.  Nothing is timed until the host has settled, before
    every run: TCG guests just booted or thawed keep the CPUs busy for a
    while.  Every snapshot is merged back afterwards (untimed): all runs
    start from the same chains."""
    p3 = Comparison("P3", f"group of {size} guests vs 1 guest, wall time", "s",
                    f"{size} guests, one group", "1 guest", "<= 2x")
    windows: list[float] = []
    bare_windows: list[float] = []
    busy: dict[str, list[float]] = {"a": [], "b": []}
    phases = {p: Comparison("P3", f"the {size}-guest window's {p} phase", "ms", "gasnap",
                            "a bare client, a thread per guest (lab/baseline.py)", "-")
              for p in PHASES}
    slowest: dict[str, list[str]] = {p: [] for p in PHASES}
    settles: list[Settled] = []
    names = [f"gb-g{n}" for n in range(1, size + 1)]
    async with guests(hv, names):
        client = ApiClient(agent.api)
        for i in range(runs):
            for which in [*order(i), "bare"]:
                chosen = names if which in ("a", "bare") else names[:1]
                settles.append(await settle())
                since = await asyncio.gather(*(log_length(hv, n) for n in chosen))
                if which == "bare":
                    for phase, seconds in (await _bare_group(hv, names)).items():
                        phases[phase].b.append(seconds * 1000)
                    bare_windows.append(max(await asyncio.gather(*(
                        window_ms(hv, n, s) for n, s in zip(names, since, strict=True)))))
                    continue
                before = cpu_times()
                task, seconds = await timed_task(agent.cli(
                    "snapshot", "create", *chosen, "--quiesce", "required", "--json"))
                busy[which].append(cpu_busy(before, cpu_times()))
                (p3.a if which == "a" else p3.b).append(seconds)
                if which == "a":
                    window = task["result"]["window"]
                    for phase, figure in phases.items():
                        figure.a.append(window[f"{phase}_ms"])
                        slowest[phase].append(window["slowest"][phase]["domain"])
                    windows.append(max(await asyncio.gather(*(
                        window_ms(hv, n, s) for n, s in zip(names, since, strict=True)))))
                for name in chosen:
                    await merge_back(hv, client, name, "vda")
    for phase, figure in phases.items():
        figure.note = "gasnap's slowest guest: " + ", ".join(
            f"{name} in {count} of {runs}"
            for name, count in collections.Counter(slowest[phase]).most_common(3))
    return [p3,
            Figure("P3", f"freeze window of the {size}-guest group (longest guest)", "ms",
                   windows, 250.0),
            Figure("P3", "the same window, the bare client's (longest guest)", "ms",
                   bare_windows, None, note="freeze, switch, thaw with nothing else"),
            *phases.values(),
            Figure("P3", f"host CPU busy during the {size}-guest create", "%", busy["a"], None,
                   note="all cores, from /proc/stat"),
            Figure("P3", "host CPU busy during the 1-guest create", "%", busy["b"], None,
                   note="all cores, from /proc/stat"),
            settled_figure("P3", settles)]


PHASES = ("freeze", "switch", "thaw")


async def _bare_group(hv: LibvirtHypervisor, names: list[str]) -> dict[str, float]:
    """The bare client's group window onto overlays made beforehand; then
    each overlay merged back (untimed)."""
    overlays, others = {}, {}
    for name in names:
        dom = await hv.get_domain(name, probe_agent=False)
        vol = dom.volumes[0]
        overlay = Path(vol.active_file).parent / "volume-bench-bare.qcow2"
        await qemuimg.create_overlay(str(overlay), Path(vol.active_file).name, vol.format,
                                     await virtual_size(vol.active_file, vol.format))
        overlays[name] = {vol.target: str(overlay)}
        others[name] = [v.target for v in dom.volumes[1:]]
    phases = await asyncio.to_thread(bare_group_switch, URI, overlays, others)
    for name, targets in overlays.items():
        for target, path in targets.items():
            await timed(["virsh", "-q", "-c", URI, "blockcommit", name, target, "--active",
                         "--shallow", "--pivot", "--wait"])
            await timed(["rm", path])
    return phases


# --- P4: merging 1 GiB written by the guest ------------------------------------------


async def merge(hv: LibvirtHypervisor, agent: Agent, runs: int, scratch: Path
                ) -> list[Comparison | Figure]:
    """Each run merges 1 GiB the guest wrote, three ways on the same kind of
    data: gasnap's live delete, the libvirt job it wraps (``virsh
    blockcommit --active --pivot``, alternating which goes first) and offline
    ``qemu-img commit`` of a copy of gasnap's two layers.  gasnap and virsh
    each have a guest of their own, booted together, in the same state.

    Two regimes, reported apart: the first merge into a fresh image, which
    allocates the 1 GiB there (the image file grows), and the runs after it,
    where the guest rewrites the same file in place, so the merge writes
    into clusters the image already has.  Mixed together, as the earlier
    runs did (the guest's filesystem put a rewritten file partly in new
    blocks), they gave the 3.5 s outliers.  Before each timed merge the
    host's dirty pages are written back and the CPUs are let settle."""
    p4 = Comparison("P4", "merge of 1 GiB written by the guest (throughput)", "s",
                    "gasnap live delete (active commit + pivot)",
                    "offline qemu-img commit of the same two layers", ">= 0.8x",
                    higher_is_better=True, note="the image holds the clusters already")
    job = Comparison("P4", "the same merge vs the libvirt job it wraps (throughput)", "s",
                     "gasnap live delete",
                     "virsh blockcommit --active --shallow --pivot --wait, rm", ">= 0.9x",
                     higher_is_better=True)
    dd = Comparison("P4", "the same merge vs dd of 1 GiB to the same filesystem", "s",
                    "gasnap live delete", "dd 1 GiB, fsync", ">= 0.5x",
                    higher_is_better=True, note="reference only: no target in the issue")
    first = Comparison("P4", "the first merge, into an image that allocates the 1 GiB", "s",
                       "gasnap live delete", "virsh blockcommit --active --shallow --pivot, rm",
                       "-", higher_is_better=True, note="once per run")
    offline_first = Figure("P4", "the first merge by offline qemu-img commit of the same "
                           "two layers", "s", [], None, note="once per run")
    settles: list[Settled] = []
    async with guests(hv, ["gb-merge", "gb-merge-v"], size_mib=1536) as (name, other):
        seconds, copy = await _gasnap_merge(hv, agent, name, scratch, settles)
        first.a.append(seconds)
        offline_first.samples.append(await _offline_commit(copy))
        first.b.append(await _virsh_merge(hv, other, settles))
        for i in range(runs):
            for which in order(i):
                if which == "b":
                    job.b.append(await _virsh_merge(hv, other, settles, in_place=True))
                    continue
                seconds, copy = await _gasnap_merge(hv, agent, name, scratch, settles,
                                                    in_place=True)
                p4.a.append(seconds)
                job.a.append(seconds)
                dd.a.append(seconds)
                p4.b.append(await _offline_commit(copy))
                await timed(["sync"])
                dd.b.append(await timed(["dd", "if=/dev/zero", f"of={scratch / 'dd.raw'}",
                                         "bs=1M", "count=1024", "conv=fsync", "status=none"]))
                (scratch / "dd.raw").unlink(missing_ok=True)
    return [p4, job, dd, first, offline_first, settled_figure("P4", settles)]


async def _guest_writes(hv: LibvirtHypervisor, name: str, *, in_place: bool) -> None:
    """1 GiB into /data/fill: a new file, or the same blocks again."""
    conv = "notrunc,fsync" if in_place else "fsync"
    await sh(hv, name, f"dd if=/dev/zero of=/data/fill bs=1M count=1024 conv={conv}"
             " 2>/dev/null", timeout=900)


async def _before_timing(settles: list[Settled]) -> None:
    await timed(["sync"])
    settles.append(await settle())


async def _gasnap_merge(hv: LibvirtHypervisor, agent: Agent, name: str, scratch: Path,
                        settles: list[Settled], *, in_place: bool = False
                        ) -> tuple[float, Path]:
    """Snapshot, 1 GiB written, the two layers copied aside; the delete timed."""
    snap = await snapshot(agent, name)
    await _guest_writes(hv, name, in_place=in_place)
    copy = await _offline_copy(snap["image"], snap["file"], scratch)
    await _before_timing(settles)
    seconds = await timed(agent.cli("snapshot", "delete", snap["id"], "--strategy", "commit"))
    return seconds, copy


async def _virsh_merge(hv: LibvirtHypervisor, name: str, settles: list[Settled], *,
                       in_place: bool = False) -> float:
    """The same with libvirt alone: an external snapshot, 1 GiB written, the
    active commit with its pivot and the merged file's removal timed."""
    vol = (await hv.get_domain(name)).volumes[0]
    overlay = Path(vol.active_file).parent / "volume-bench-virsh.qcow2"
    await timed(["virsh", "-q", "-c", URI, "snapshot-create-as", name, "--disk-only",
                 "--atomic", "--no-metadata", "--diskspec",
                 f"{vol.target},snapshot=external,file={overlay}"])
    await _guest_writes(hv, name, in_place=in_place)
    await _before_timing(settles)
    seconds = await timed(["virsh", "-q", "-c", URI, "blockcommit", name, vol.target,
                           "--active", "--shallow", "--pivot", "--wait"])
    # A delete removes the merged file: 1 GiB takes ext4 about 0.2 s to free.
    return seconds + await timed(["rm", str(overlay)])


async def _offline_copy(image: str, overlay: str, scratch: Path) -> Path:
    """The snapshot's image and the guest's overlay (its 1 GiB) copied, the
    copy of the overlay backed by the copy of the image, for qemu-img.  What
    lies below the image is not copied: a commit writes into the image and
    never reads below it."""
    directory = scratch / "copy"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    base = directory / "image.qcow2"
    await asyncio.to_thread(shutil.copyfile, image, base)
    await qemuimg.run("rebase", "-q", "-u", "-f", "qcow2", "-b", "", str(base))
    copy = directory / "overlay.qcow2"
    await asyncio.to_thread(shutil.copyfile, overlay, copy)
    await qemuimg.run("rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", base.name,
                      str(copy))
    return copy


async def _offline_commit(copy: Path) -> float:
    """qemu-img commit of COPY into its image, timed; the copies then go."""
    try:
        await timed(["sync"])
        return await timed(["qemu-img", "commit", "-q", "-f", "qcow2", str(copy)])
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)


async def snapshot(agent: Agent, name: str) -> dict[str, str]:
    out = await asyncio.to_thread(subprocess.run, agent.cli("snapshot", "create", name,
                                                            "--json"),
                                  capture_output=True, text=True, check=True)
    snapshot: dict[str, str] = json.loads(out.stdout)["result"]["snapshots"][0]
    return snapshot


# --- P5: 1 GiB vs 1 TiB virtual disk ---------------------------------------------------


async def size_independence(hv: LibvirtHypervisor, agent: Agent, runs: int
                            ) -> list[Comparison]:
    p5 = Comparison("P5", "create latency, 1 TiB vs 1 GiB virtual disk (sparse)", "s",
                    "1 TiB disk", "1 GiB disk", "<= 1.1x")
    async with guests(hv, ["gb-size"]) as (name,):
        directory = Path((await hv.get_domain(name)).volumes[0].active_file).parent
        virsh = ["virsh", "-q", "-c", URI]
        # Cold-plugged: the lab's machine type has no PCI hotplug.  The guest
        # leaves the blank disks unmounted, which the freeze does not mind.
        await timed([*virsh, "destroy", name])
        for target, size in (("vdx", "1G"), ("vdy", "1T")):
            serial = str(uuid.uuid4())
            path = directory / f"volume-{serial}"
            await qemuimg.run("create", "-q", "-f", "qcow2", str(path), size)
            await timed([*virsh, "attach-disk", name, str(path), target, "--driver", "qemu",
                         "--subdriver", "qcow2", "--serial", serial, "--targetbus", "virtio",
                         "--config"])
        await timed([*virsh, "start", name])
        await Lab(hv).wait_for_agent(name, 120)
        for i in range(runs):
            for which in order(i):
                target = "vdy" if which == "a" else "vdx"
                seconds = await timed(agent.cli("snapshot", "create", name, "--disk", target,
                                                "--quiesce", "required"))
                (p5.a if which == "a" else p5.b).append(seconds)
    return [p5]


# --- P6: footprint -----------------------------------------------------------------------


async def footprint(agent_base: Path, requests: int) -> list[Figure]:
    idle_agent = await asyncio.to_thread(Agent(agent_base / "idle").start)
    try:
        idle = idle_agent.rss_mib()
    finally:
        idle_agent.stop()
    loaded = Agent(agent_base / "loaded")
    loaded.state_dir.mkdir(parents=True)
    await _seed(loaded.state_dir / "metadata.db", 10_000)
    await asyncio.to_thread(loaded.start)
    try:
        # Pages of 100 (a first one and one deep in the listing, alternating),
        # then the whole 4.7 MB listing for reference.
        middle = str(uuid.UUID(int=5_000))
        pages = [await asyncio.to_thread(_get_ms, loaded.api, "?limit=100" + (
            f"&marker={middle}" if i % 2 else ""), 100) for i in range(requests)]
        rss_paged = loaded.rss_mib()
        full = [await asyncio.to_thread(_get_ms, loaded.api, "", 10_000)
                for _ in range(max(requests // 10, 3))]
        rss_full = loaded.rss_mib()
    finally:
        loaded.stop()
    return [
        Figure("P6", "agent RSS, idle", "MiB", [idle], 60.0, use="max"),
        Figure("P6", "agent RSS with 10,000 snapshot records (after paged GETs)", "MiB",
               [rss_paged], 60.0, use="max"),
        Figure("P6", "GET /v1/snapshots?limit=100 with 10,000 records", "ms", pages, 20.0,
               note=f"p50 {statistics.median(pages):.1f} ms"),
        Figure("P6", "GET /v1/snapshots, all 10,000 records (4.7 MB, unpaged)", "ms", full,
               None, note=f"p50 {statistics.median(full):.1f} ms"),
        Figure("P6", "agent RSS after the unpaged GETs", "MiB", [rss_full], None, use="max"),
    ]


def _get_ms(api: str, query: str, expected: int) -> float:
    client = ApiClient(api)
    started = time.monotonic()
    doc = client.get(f"/v1/snapshots{query}")
    elapsed = (time.monotonic() - started) * 1000
    assert len(doc["snapshots"]) == expected
    return elapsed


async def _seed(path: Path, count: int) -> None:
    """COUNT available records in the embedded store (one transaction: the
    store's own calls fsync each, which would measure the disk, not gasnap)."""
    await (await open_sqlite(path)).close()  # the schema, by the store's migrations
    rows = []
    for n in range(count):
        sid, volume = str(uuid.UUID(int=n + 1)), f"bench/vd{n % 100}"
        rows.append((sid, volume, f"seed-{n}", "", GIB,
                     f"2026-01-01T00:{n // 6000:02d}:{n // 100 % 60:02d}.{n:06d}+00:00",
                     "bench", "vda", "available", f"/bench/{volume}.{sid}",
                     f"/bench/{volume}", "filesystem"))

    def insert() -> None:
        with sqlite3.connect(path) as conn:
            conn.executemany(
                "INSERT INTO snapshots (id, volume_id, name, description, size, created_at,"
                " domain, target, status, file, backing_file, consistency)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)

    await asyncio.to_thread(insert)
