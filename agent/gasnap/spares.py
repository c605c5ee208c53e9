"""Spare overlays: the next snapshot's overlay, made before it is asked for.

Making an overlay costs a ``qemu-img`` process per volume; a
request that finds a spare ready only renames it.  Whenever gasnap changes a
running domain's active file (a snapshot's overlay becomes active, or an
active commit makes the layer below active again), a spare on top of the new
active file is made in the background, next to it:
``.<volume base name>.gasnap-spare`` (``images.spare_path``).

A spare is trusted only after its header is read back at the moment of use:
it must be a plain qcow2 (no unknown feature, no external data file), point
(relatively) at the volume's active file of the request being served, with
that file's format and virtual size.  Anything
else (the chain changed under it, the disk was resized, a half-written file
after a crash) is removed and the overlay is made the ordinary way, so a
stale spare costs time, never correctness.  A spare holds no data and is not
in any chain: deleting one by hand is always safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from . import images, metrics, qemuimg
from .errors import GasnapError

log = logging.getLogger(__name__)

class Spares:
    """One spare per volume at most; ``enabled=False`` makes every call a no-op."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._making: dict[str, asyncio.Task[None]] = {}

    async def take(self, spare: str, image: str, fmt: str, size: int, overlay: str) -> bool:
        """Move a valid spare to OVERLAY (an overlay of IMAGE); False if there
        was none, and the caller makes the overlay itself."""
        if not self.enabled:
            return False
        try:
            header = await asyncio.to_thread(images.read_qcow2_header, spare)
            images.check_plain(spare, header)
        except FileNotFoundError:
            return False
        except (OSError, GasnapError) as err:
            log.warning("spare %s unreadable, removing it: %s", spare, err)
            await self._discard(spare)
            return False
        if (header.backing_file, header.backing_format, header.virtual_size) != (
                Path(image).name, fmt, size):
            log.info("spare %s no longer matches %s, removing it", spare, image)
            await self._discard(spare)
            return False
        try:
            # link + unlink, not rename: never replace a file at OVERLAY.
            await asyncio.to_thread(os.link, spare, overlay)
        except OSError as err:
            log.warning("cannot use spare %s as %s: %s", spare, overlay, err)
            return False
        await self._discard(spare)
        log.debug("spare %s taken as %s", spare, overlay)
        return True

    async def forget(self, spare: str, backing: str) -> bool:
        """Remove SPARE if it points at BACKING, a file leaving the chain: no
        file next to the disks should point at one that is gone.  Done even
        when spares are off (one may be left from before).  True if removed."""
        making = self._making.get(spare)
        if making is not None:  # one still being written would land afterwards
            await asyncio.wait([making])
        try:
            header = await asyncio.to_thread(images.read_qcow2_header, spare)
        except (OSError, GasnapError):
            return False  # none, or not ours to judge: the next take() checks it
        if header.backing_file != Path(backing).name:
            return False
        log.debug("spare %s pointed at %s, which leaves the chain", spare, backing)
        await self._discard(spare)
        return True

    def prepare(self, spare: str, image: str, fmt: str, size: int) -> None:
        """Start making SPARE on top of IMAGE in the background."""
        if not self.enabled or spare in self._making:
            return
        task = asyncio.get_running_loop().create_task(self._make(spare, image, fmt, size))
        self._making[spare] = task
        metrics.SPARES_PENDING.inc()

        def done(_task: asyncio.Task[None]) -> None:
            self._making.pop(spare, None)
            metrics.SPARES_PENDING.dec()

        task.add_done_callback(done)

    async def settled(self) -> None:
        """Wait for the spares being made (tests and shutdown)."""
        await asyncio.gather(*list(self._making.values()), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._making.values()):
            task.cancel()
        await self.settled()

    async def _make(self, spare: str, image: str, fmt: str, size: int) -> None:
        # Written under a temporary name and renamed: a spare under its own
        # name is always whole.
        tmp = f"{spare}.tmp"
        try:
            await qemuimg.create_overlay(tmp, Path(image).name, fmt, size)
            await images.adopt_owner(tmp, image)
            await asyncio.to_thread(os.replace, tmp, spare)
            log.debug("spare %s ready on %s", spare, image)
        except (OSError, GasnapError) as err:
            log.warning("cannot make spare %s: %s", spare, err)
            log.debug("spare %s", spare, exc_info=True)
        finally:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.unlink, tmp)

    @staticmethod
    async def _discard(spare: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, spare)
