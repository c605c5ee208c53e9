"""Space that does not run out mid-operation: checked before anything changes.

A create needs room for its overlays' metadata and, for a memory snapshot,
each domain's saved RAM; a merge for the data it moves (the allocated bytes
of the layers merged, read from the files); a full clone for a copy of its
image's data.  What each needs must fit in the free space of the filesystem
it goes to with ``[limits] min_free_mib`` left over, or the request is
refused 507 ``insufficient_space`` before anything has changed.  Needs on
one filesystem add up.  These are estimates made up front: a filesystem
that fills anyway (a guest writing, another tool) is reported by the
hypervisor's I/O-error events, and the operation it stops fails without
marking anything done.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import GasnapError, InsufficientStorage

MIB = 1 << 20
CLUSTER = 64 << 10  # qcow2's default cluster size, which gasnap's overlays use
# Beyond the RAM, a memory file holds the device state and libvirt's header.
MEMORY_OVERHEAD = 32 * MIB


class InsufficientSpace(InsufficientStorage):
    code = "insufficient_space"


def _clusters(size: int) -> int:
    return -(-size // CLUSTER) * CLUSTER


def overlay_bytes(virtual_size: int) -> int:
    """A fresh qcow2 overlay: header, refcount table and block, one L2
    cluster, and its L1 table (8 bytes per 512 MiB of virtual size)."""
    return 4 * CLUSTER + _clusters(-(-virtual_size // (CLUSTER * CLUSTER // 8)) * 8)


def memory_bytes(ram: int) -> int:
    """A memory file: the guest's RAM at most, plus its device state."""
    return ram + MEMORY_OVERHEAD


@dataclass(frozen=True)
class _Filesystem:
    directory: str  # the first directory that named it, for the message
    free: int
    need: int


def _filesystems(needs: Mapping[str, int]) -> list[_Filesystem]:
    found: dict[int, _Filesystem] = {}
    for directory, need in needs.items():
        device = os.stat(directory).st_dev
        st = os.statvfs(directory)
        free = st.f_bavail * st.f_frsize
        seen = found.get(device)
        found[device] = (_Filesystem(directory, free, need) if seen is None
                         else _Filesystem(seen.directory, seen.free, seen.need + need))
    return list(found.values())


async def check(needs: Mapping[str, int], min_free: int, what: str) -> None:
    """Refuse WHAT unless NEEDS (bytes per directory) fit, MIN_FREE left."""
    for fs in await asyncio.to_thread(_filesystems, needs):
        if fs.free - fs.need < min_free:
            raise InsufficientSpace(
                f"{what} needs {fs.need / MIB:.1f} MiB in {fs.directory}, which has "
                f"{fs.free / MIB:.1f} MiB free, and {min_free / MIB:.0f} MiB must stay free "
                "([limits] min_free_mib); nothing was changed",
                directory=fs.directory, needed=fs.need, free=fs.free)


async def explain(failure: GasnapError, directory: str, min_free: int) -> GasnapError:
    """FAILURE of work that wrote into DIRECTORY; when that filesystem is now
    below its reserve, the reason the work stopped is most likely that it
    filled up: say so (507), so the operator frees space and tries again."""
    return await explain_any(failure, [directory], min_free)


async def explain_any(failure: GasnapError, directories: Iterable[str], min_free: int
                      ) -> GasnapError:
    """``explain`` for work that wrote into several DIRECTORIES."""
    if isinstance(failure, InsufficientStorage):
        return failure
    try:
        filesystems = await asyncio.to_thread(_filesystems, dict.fromkeys(directories, 0))
    except OSError:
        return failure
    # A reserve of 0 still leaves nothing to write into at the last MiB.
    full = [fs for fs in filesystems if fs.free < max(min_free, MIB)]
    if not full:
        return failure
    return InsufficientSpace(
        f"{failure.message}: the filesystem of {full[0].directory} is full "
        f"({full[0].free / MIB:.1f} MiB free); free some space and try again",
        directory=full[0].directory, free=full[0].free)
