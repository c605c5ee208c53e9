"""The qemu-img boundary: every call runs as a subprocess off the event loop.

Every call names the format of each image it opens (``-f``, and ``-F`` for a
backing file): qemu-img is never left to guess one from bytes a guest may
have written (see ``gasnap.images``).  Backing pointers are relative.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

from .errors import GasnapError, Unavailable

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"


class QemuImgError(GasnapError):
    code = "qemu_img"


class QemuImgMissing(QemuImgError, Unavailable):
    code = "qemu_img_missing"


@dataclass(frozen=True)
class ImageInfo:
    filename: str
    format: str
    virtual_size: int
    actual_size: int
    backing_filename: str | None  # as written in the header (may be relative)
    full_backing_filename: str | None
    backing_format: str | None
    data_file: str | None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ImageInfo:
        specific = doc.get("format-specific", {}).get("data", {})
        return cls(
            filename=doc["filename"],
            format=doc["format"],
            virtual_size=int(doc["virtual-size"]),
            actual_size=int(doc.get("actual-size", 0)),
            backing_filename=doc.get("backing-filename"),
            full_backing_filename=doc.get("full-backing-filename"),
            backing_format=doc.get("backing-filename-format"),
            data_file=specific.get("data-file"),
        )


async def run(*args: str, timeout: float | None = None) -> str:
    """Run ``qemu-img ARGS`` and return its stdout; raise QemuImgError on failure.
    Cancelled or timed out, the process is killed: no qemu-img outlives its call."""
    if shutil.which(QEMU_IMG) is None:
        raise QemuImgMissing("qemu-img is not installed (Debian package qemu-utils)")
    proc = await asyncio.create_subprocess_exec(
        QEMU_IMG,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError as exc:
        await _kill(proc)
        raise QemuImgError(f"qemu-img {args[0]} timed out after {timeout}s") from exc
    except asyncio.CancelledError:
        await asyncio.shield(_kill(proc))
        raise
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip() or f"exit code {proc.returncode}"
        raise QemuImgError(f"qemu-img {args[0]} failed: {message}")
    return out.decode()


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
    await proc.wait()


async def version() -> str:
    return (await run("--version")).splitlines()[0]


async def info(path: str, fmt: str) -> ImageInfo:
    """``qemu-img info`` of PATH opened as FMT.  ``-U`` (force-share): the
    image is usually open by a running QEMU."""
    out = await run("info", "-U", "-f", fmt, "--output=json", path)
    return ImageInfo.from_json(json.loads(out))


async def create_overlay(path: str, backing: str, backing_format: str, size: int) -> None:
    """A qcow2 overlay at PATH on top of BACKING (a pointer relative to
    PATH's directory) of BACKING_FORMAT.

    ``-u``: the backing image is open read-write by a running QEMU and its
    size is known, so qemu-img must not try to open it.
    """
    if os.path.isabs(backing):
        raise QemuImgError(f"backing pointer must be relative, not {backing!r}")
    await run("create", "-q", "-f", "qcow2", "-u", "-F", backing_format, "-b", backing,
              path, str(size))


async def commit(top: str) -> None:
    """Offline: write TOP's data (a qcow2 overlay) into its backing file,
    opened with the format TOP's header names."""
    await run("commit", "-q", "-f", "qcow2", top)


async def rebase(image: str, backing: str | None, backing_format: str | None, *,
                 safe: bool) -> None:
    """Offline: point IMAGE (a qcow2 overlay) at BACKING, a pointer relative
    to IMAGE's directory, of BACKING_FORMAT (None: no backing).

    ``safe`` copies what differs into IMAGE first (a pull); unsafe only
    rewrites the pointer, for when the contents are already equal (after a
    commit).
    """
    args = ["rebase", "-q", "-f", "qcow2"]
    if not safe:
        args.append("-u")
    if backing is None:
        args += ["-b", ""]
    else:
        if os.path.isabs(backing):
            raise QemuImgError(f"backing pointer must be relative, not {backing!r}")
        if backing_format is None:
            raise QemuImgError(f"no format named for the backing file {backing!r}")
        args += ["-F", backing_format, "-b", backing]
    await run(*args, image)


async def convert(source: str, source_format: str, dest: str, *,
                  bandwidth_mib: int = 0) -> None:
    """A full, sparse qcow2 copy of SOURCE (of SOURCE_FORMAT, its backing
    chain read with the formats its headers name) at DEST, flushed to disk
    before it returns (``-t writeback``: convert's default cache mode,
    ``unsafe``, would leave a copy a power cut could take back, under a
    record that says it is whole).  BANDWIDTH_MIB (MiB/s, 0: unlimited) is
    qemu-img's own rate limit.  No ``-p``: callers watch DEST grow."""
    args = ["convert", "-t", "writeback", "-f", source_format, "-O", "qcow2"]
    if bandwidth_mib:
        args += ["-r", f"{bandwidth_mib}M"]
    await run(*args, source, dest)
