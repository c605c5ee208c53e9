"""The qemu-img boundary: every call runs as a subprocess off the event loop."""

from __future__ import annotations

import asyncio
import json
import logging
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
    """Run ``qemu-img ARGS`` and return its stdout; raise QemuImgError on failure."""
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
        proc.kill()
        await proc.wait()
        raise QemuImgError(f"qemu-img {args[0]} timed out after {timeout}s") from exc
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip() or f"exit code {proc.returncode}"
        raise QemuImgError(f"qemu-img {args[0]} failed: {message}")
    return out.decode()


async def version() -> str:
    return (await run("--version")).splitlines()[0]


async def info_chain(path: str) -> list[ImageInfo]:
    """``qemu-img info --backing-chain`` of PATH, top image first.

    ``-U`` (force-share) because the image is usually open by a running QEMU.
    """
    out = await run("info", "-U", "--backing-chain", "--output=json", path)
    docs = json.loads(out)
    if isinstance(docs, dict):
        docs = [docs]
    return [ImageInfo.from_json(doc) for doc in docs]


async def info(path: str) -> ImageInfo:
    out = await run("info", "-U", "--output=json", path)
    return ImageInfo.from_json(json.loads(out))


async def create_overlay(path: str, backing: str, backing_format: str, size: int) -> None:
    """A qcow2 overlay at PATH on top of BACKING, with a *relative* backing
    pointer (BACKING's basename: both live in one directory).

    ``-u``: the backing image is open read-write by a running QEMU and its
    size is known, so qemu-img must not try to open it.
    """
    if "/" in backing:
        raise QemuImgError(f"backing pointer must be relative, not {backing!r}")
    await run("create", "-q", "-f", "qcow2", "-u", "-F", backing_format, "-b", backing,
              path, str(size))


async def commit(top: str) -> None:
    """Offline: write TOP's data into its backing file."""
    await run("commit", "-q", top)


async def rebase(image: str, backing: str | None, backing_format: str | None, *,
                 safe: bool) -> None:
    """Offline: point IMAGE at BACKING (a relative name; None: no backing).

    ``safe`` copies what differs into IMAGE first (a pull); unsafe only
    rewrites the pointer, for when the contents are already equal (after a
    commit).
    """
    if backing is not None and "/" in backing:
        raise QemuImgError(f"backing pointer must be relative, not {backing!r}")
    args = ["rebase", "-q"]
    if not safe:
        args.append("-u")
    if backing is None:
        args += ["-b", ""]
    else:
        args += ["-F", backing_format or "qcow2", "-b", backing]
    await run(*args, image)


# --- qcow2 headers, read directly ---------------------------------------------------
# A header read costs microseconds where ``qemu-img info`` costs a process; the
# create path needs only the virtual size and the backing pointer.

QCOW2_MAGIC = b"QFI\xfb"
_BACKING_FORMAT_EXT = 0xE2792ACA
_MAX_HEADER = 64 << 10


@dataclass(frozen=True)
class Qcow2Header:
    version: int
    virtual_size: int
    backing_file: str | None
    backing_format: str | None


def read_qcow2_header(path: str) -> Qcow2Header:
    """The qcow2 header of PATH (raises QemuImgError if PATH is not qcow2)."""
    with open(path, "rb") as f:
        head = f.read(_MAX_HEADER)
    if len(head) < 72 or head[:4] != QCOW2_MAGIC:
        raise QemuImgError(f"{path} is not a qcow2 image")
    version = int.from_bytes(head[4:8], "big")
    backing_offset = int.from_bytes(head[8:16], "big")
    backing_size = int.from_bytes(head[16:20], "big")
    virtual_size = int.from_bytes(head[24:32], "big")
    backing = None
    if backing_offset:
        end = backing_offset + backing_size
        if end > len(head):
            raise QemuImgError(f"{path}: backing file name lies outside the header")
        backing = head[backing_offset:end].decode("utf-8", errors="replace")
    header_length = int.from_bytes(head[100:104], "big") if version >= 3 else 72
    return Qcow2Header(version, virtual_size, backing,
                       _backing_format(head, header_length, backing_offset or len(head)))


def _backing_format(head: bytes, offset: int, limit: int) -> str | None:
    """The backing-format header extension, if any (extensions end with type 0)."""
    while offset + 8 <= min(limit, len(head)):
        kind = int.from_bytes(head[offset:offset + 4], "big")
        length = int.from_bytes(head[offset + 4:offset + 8], "big")
        if kind == 0:
            return None
        if kind == _BACKING_FORMAT_EXT:
            return head[offset + 8:offset + 8 + length].decode("ascii", errors="replace")
        offset += 8 + (length + 7) // 8 * 8
    return None
