"""Checking a point-in-time image the way the contract states consistency:
``e2fsck -fn`` exits 0 with no journal recovery pending."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import images, qemuimg


@dataclass(frozen=True)
class FsckResult:
    exitcode: int
    output: str

    @property
    def needs_journal_recovery(self) -> bool:
        text = self.output.lower()
        return "journal recovery" in text or "recovering journal" in text

    @property
    def clean(self) -> bool:
        return self.exitcode == 0 and not self.needs_journal_recovery


async def fsck_snapshot(snapshot: dict[str, Any]) -> FsckResult:
    """fsck_image on a snapshot record's image, whose format its overlay
    (``file``, written by gasnap) records."""
    header = await asyncio.to_thread(images.read_qcow2_header, snapshot["file"])
    return await fsck_image(snapshot["image"], header.backing_format or "")


async def fsck_image(image: str, fmt: str) -> FsckResult:
    """e2fsck -fn on a raw copy of IMAGE of format FMT (read through its
    backing chain)."""
    async with raw_copy(image, fmt) as raw:
        return await fsck_raw(raw)


@contextlib.asynccontextmanager
async def raw_copy(image: str, fmt: str) -> AsyncIterator[Path]:
    """A raw copy of IMAGE of format FMT, read through its backing chain,
    for as long as the block runs."""
    with tempfile.TemporaryDirectory(prefix="gasnap-fsck-") as tmp:
        raw = Path(tmp) / "image.raw"
        await qemuimg.run("convert", "-U", "-f", fmt, "-O", "raw", image, str(raw))
        yield raw


async def fsck_raw(raw: Path) -> FsckResult:
    proc = await asyncio.create_subprocess_exec(
        "e2fsck", "-fn", str(raw),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return FsckResult(proc.returncode or 0, out.decode(errors="replace"))
