"""Space on a small filesystem (a tmpfs holding a lab guest's disk): a
create, a memory snapshot and a merge that would not fit are refused up
front with nothing changed; a guest that fills its overlay is paused by
QEMU and reported; a merge the filesystem cuts short fails without marking
anything done; and each works again once space is freed."""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    PREFIX,
    Agent,
    chain_of,
    delete_snapshot,
    hv_call,
    running_agent,
    snap,
    tmpfs,
    wait_task,
    wait_until,
)
from gasnap.client import ApiError
from gasnap.hypervisor import Domain, DomainState
from gasnap.lab.guests import Lab
from gasnap.lab.workload import sh
from gasnap.virt import LibvirtHypervisor

MIB = 1 << 20
SMALL = Path("/var/lib/gasnap/lab-small")


@pytest.fixture(scope="module")
def small_fs() -> Iterator[Path]:
    with tmpfs(SMALL, "200m") as path:
        yield path


@pytest.fixture(scope="module")
async def small(hv: LibvirtHypervisor, small_fs: Path) -> AsyncIterator[Domain]:
    lab = Lab(hv, lab_dir=small_fs)
    dom = await lab.up(f"{PREFIX}small", disks=1, size_mib=64)
    yield dom
    await lab.down(dom.name)


def free_mib(path: Path) -> float:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / MIB


def fill(path: Path, leave_mib: float) -> Path:
    """A host file that leaves LEAVE_MIB free on PATH's filesystem."""
    filler = path / "filler"
    size = int((free_mib(path) - leave_mib) * MIB)
    with filler.open("wb") as out:
        out.truncate(0)
        os.posix_fallocate(out.fileno(), 0, max(size, 1))
    return filler


def base(tmp_path: Path, name: str) -> Path:
    (tmp_path / name).mkdir()
    return tmp_path / name


def config(min_free_mib: int, extra: str = "") -> str:
    return f"[agent]\nspare_overlays = false\n{extra}\n[limits]\nmin_free_mib = {min_free_mib}\n"


def refused(agent: Agent, method: str, path: str, body: Any) -> str:
    with pytest.raises(ApiError) as err:
        agent.client.request(method, path, body)
    assert (err.value.details["status"], err.value.code) == (507, "insufficient_space"), err.value
    return str(err.value)


def files(path: Path) -> set[str]:
    return {str(p) for p in path.rglob("*") if p.is_file() and p.name != "console.log"}


async def test_a_merge_the_filesystem_cuts_short_fails_and_is_retried(
    tmp_path: Path, hv: LibvirtHypervisor, small: Domain, small_fs: Path
) -> None:
    """First in the module: the commit must allocate new clusters in the
    image below, which a later test's commits would have allocated already."""
    name = small.name
    slow = config(1, "merge_bandwidth = 1")
    with running_agent(tmp_path, config=slow) as agent:
        made = snap(agent, small, "cut-by-space")
        await sh(hv, name, "dd if=/dev/urandom of=/data/thirty bs=1M count=30 2>/dev/null; sync")
        chain = await chain_of(hv, name, "vda")
        task = agent.client.request(
            "DELETE", f"/v1/snapshots/{made['id']}?strategy=commit")["task"]
        filler = fill(small_fs, 2)  # the check passed; now the filesystem fills
        try:
            # Waited for in a thread: a loop blocked for the whole merge would
            # miss libvirt's keepalives, and libvirtd would drop the connection.
            done = await asyncio.to_thread(wait_task, agent, task["id"], 300)
            assert done["state"] == "failed", done
            assert done["error"]["code"] == "insufficient_space", done
            record = agent.client.get(f"/v1/snapshots/{made['id']}")
            assert record["status"] == "error_deleting"
            assert await chain_of(hv, name, "vda") == chain
        finally:
            filler.unlink()
    # The retry, by the same agent restarted without the limit that kept the
    # merge going while the filesystem filled (at 1 MiB/s it takes 30 s).
    with running_agent(tmp_path, config=config(1)) as agent:
        retried = await asyncio.to_thread(delete_snapshot, agent, made["id"], "commit")
        assert retried["state"] == "succeeded", retried
        assert "thirty" in await sh(hv, name, "ls /data")
        await sh(hv, name, "rm /data/thirty; sync")


async def test_what_would_not_fit_is_refused_up_front(
    tmp_path: Path, hv: LibvirtHypervisor, small: Domain, small_fs: Path
) -> None:
    name = small.name
    before, chain = files(small_fs), await chain_of(hv, name, "vda")
    # The reserve alone: every MiB free must stay free, so not even an overlay fits.
    strict = config(math.ceil(free_mib(small_fs)))
    with running_agent(base(tmp_path, "strict"), config=strict) as agent:
        message = refused(agent, "POST", "/v1/snapshots", {"domains": [name]})
        assert "min_free_mib" in message
        assert agent.client.get(f"/v1/snapshots?domain={name}")["snapshots"] == []
    assert (files(small_fs), await chain_of(hv, name, "vda")) == (before, chain)

    with running_agent(base(tmp_path, "loose"), config=config(1)) as agent:
        # 256 MiB of RAM do not fit in what the tmpfs has left: nor does its
        # memory file, counted with the overlays (#17).
        refused(agent, "POST", "/v1/snapshots", {"domains": [name], "memory": True})
        assert (files(small_fs), await chain_of(hv, name, "vda")) == (before, chain)
        made = snap(agent, small, "fits")
        await sh(hv, name, "dd if=/dev/urandom of=/data/forty bs=1M count=40 2>/dev/null; sync")
        # The merge moves what the guest wrote: leave less than that free.
        filler = fill(small_fs, 20)
        try:
            chain = await chain_of(hv, name, "vda")
            # A commit moves the 40 MiB into the image below (a pull would
            # move the image's few MiB up instead, and fit).
            refused(agent, "DELETE", f"/v1/snapshots/{made['id']}?strategy=commit", None)
            assert await chain_of(hv, name, "vda") == chain
            assert agent.client.get(f"/v1/snapshots/{made['id']}")["status"] == "available"
        finally:
            filler.unlink()
        assert delete_snapshot(agent, made["id"], "commit")["state"] == "succeeded"
        await sh(hv, name, "rm /data/forty; sync")


async def test_a_guest_that_fills_its_overlay_is_reported_and_recovers(
    tmp_path: Path, hv: LibvirtHypervisor, small: Domain, small_fs: Path
) -> None:
    name = small.name
    with running_agent(tmp_path, config=config(1)) as agent:
        made = snap(agent, small, "before-full")
        await sh(hv, name, "rm -f /data/thirty /data/forty; sync")  # room in the guest
        filler = fill(small_fs, 16)
        try:
            await sh(hv, name, "(dd if=/dev/urandom of=/data/big bs=1M count=32; sync; "
                               "echo done > /data/big.done) >/dev/null 2>&1 &")

            async def paused() -> bool:
                return (await hv.get_domain(name)).state is DomainState.PAUSED

            await wait_until(paused, timeout=120)
            metrics = agent.client.raw("GET", "/metrics")[1].decode()
            line = next(x for x in metrics.splitlines()
                        if x.startswith("gasnap_domain_io_errors_total{")
                        and f'domain="{name}"' in x and 'reason="enospc"' in x)
            assert float(line.split()[-1]) >= 1
        finally:
            filler.unlink()
        await hv_call(hv, name, "resume")

        async def written() -> bool:
            return "done" in await sh(hv, name, "cat /data/big.done 2>/dev/null || true")

        await wait_until(written, timeout=120)
        assert delete_snapshot(agent, made["id"])["state"] == "succeeded"
        await sh(hv, name, "rm -f /data/big /data/big.done; sync")
