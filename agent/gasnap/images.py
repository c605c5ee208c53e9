"""Image files and what gasnap may believe about them.

A disk's bytes belong to its guest: a ``raw`` disk whose first bytes look
like a qcow2 header (anything a guest can write) must stay raw, or the
guest could name a host file as its backing file and read it at the next
boot (OSSA-2014-033, CVE-2024-32498).  So no format here is ever probed:

* the top layer's format comes from the domain XML;
* a qcow2 layer's backing format comes from its own header's
  backing-format extension (written by gasnap, libvirt or Cinder with the
  format named); a qcow2 layer that has a backing file but no recorded
  format is refused, since reading further would mean guessing;
* a raw layer has no backing file, whatever its bytes say;
* every backing file and external data file must lie inside the volume's
  directory.

qcow2 headers are read directly (microseconds, where ``qemu-img info``
costs a process), and only where the format is already known to be qcow2:
then the header was written by the host, never by the guest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import BadRequest, Conflict
from .hypervisor import Layer

QCOW2_MAGIC = b"QFI\xfb"
FORMATS = ("qcow2", "raw")  # what gasnap snapshots, merges and chains through
MAX_CHAIN = 1024  # deeper than any chain gasnap makes: a loop or a hostile header

_EXT_END = 0
_EXT_BACKING_FORMAT = 0xE2792ACA
_EXT_DATA_FILE = 0x44415441
_MAX_HEADER = 64 << 10
# Incompatible feature bits qemu defines: dirty, corrupt, external data file,
# compression type, extended L2.  Any other bit means a qcow2 this code does
# not understand, and is refused.
_KNOWN_INCOMPATIBLE = 0b11111
_INCOMPAT_CORRUPT = 1 << 1
_INCOMPAT_DATA_FILE = 1 << 2


class UnsafeImage(BadRequest):
    """An image whose header would make gasnap guess, or leave the volume."""

    code = "unsafe_image"




@dataclass(frozen=True)
class Qcow2Header:
    version: int
    virtual_size: int
    backing_file: str | None
    backing_format: str | None
    data_file: str | None
    incompatible: int  # incompatible feature bits


# --- headers ----------------------------------------------------------------------


def read_qcow2_header(path: str) -> Qcow2Header:
    """The qcow2 header of PATH (UnsafeImage if PATH is not a qcow2 image).
    Blocking: call from a thread."""
    with open(path, "rb") as f:
        head = f.read(_MAX_HEADER)
    if len(head) < 72 or head[:4] != QCOW2_MAGIC:
        raise UnsafeImage(f"{path} is not a qcow2 image")
    version = int.from_bytes(head[4:8], "big")
    backing_offset = int.from_bytes(head[8:16], "big")
    backing_size = int.from_bytes(head[16:20], "big")
    virtual_size = int.from_bytes(head[24:32], "big")
    incompatible = int.from_bytes(head[72:80], "big") if version >= 3 else 0
    backing = None
    if backing_offset:
        end = backing_offset + backing_size
        if end > len(head):
            raise UnsafeImage(f"{path}: backing file name lies outside the header")
        backing = head[backing_offset:end].decode("utf-8", errors="replace")
    header_length = int.from_bytes(head[100:104], "big") if version >= 3 else 72
    extensions = _extensions(head, header_length, backing_offset or len(head))
    return Qcow2Header(
        version, virtual_size, backing,
        _text(extensions.get(_EXT_BACKING_FORMAT)), _text(extensions.get(_EXT_DATA_FILE)),
        incompatible,
    )


def _text(raw: bytes | None) -> str | None:
    return raw.decode("utf-8", errors="replace") if raw is not None else None


def _extensions(head: bytes, offset: int, limit: int) -> dict[int, bytes]:
    """The header extensions by type (the list ends with type 0)."""
    found: dict[int, bytes] = {}
    while offset + 8 <= min(limit, len(head)):
        kind = int.from_bytes(head[offset:offset + 4], "big")
        length = int.from_bytes(head[offset + 4:offset + 8], "big")
        if kind == _EXT_END:
            break
        found.setdefault(kind, head[offset + 8:offset + 8 + length])
        offset += 8 + (length + 7) // 8 * 8
    return found


def check_plain(path: str, header: Qcow2Header) -> None:
    """HEADER is one gasnap can stack on or reuse: no feature it does not
    know, not marked corrupt, no external data file (an overlay gasnap makes
    has none; one that has one is not what it claims to be)."""
    if header.incompatible & ~_KNOWN_INCOMPATIBLE:
        raise UnsafeImage(f"{path} uses qcow2 features gasnap does not know "
                          f"({header.incompatible:#x})")
    if header.incompatible & _INCOMPAT_CORRUPT:
        raise UnsafeImage(f"{path} is marked corrupt")
    if header.data_file is not None or header.incompatible & _INCOMPAT_DATA_FILE:
        raise UnsafeImage(f"{path} keeps its data in an external file")


# --- paths ------------------------------------------------------------------------


def resolve_inside(directory: str, name: str, what: str) -> str:
    """NAME (relative to DIRECTORY, or absolute) spelled as DIRECTORY spells
    it, refused unless the file it names really lies directly inside
    DIRECTORY (checked on real paths: no ``..``, no symlink out, no absolute
    path elsewhere).

    The spelling matters as much as the check: libvirt, QEMU and gasnap's
    records name a layer reached through a relative pointer by its
    overlay's directory as configured, and an image directory behind a
    symlink (``/var/lib/libvirt/images`` often is) must not make the same
    file look like two."""
    candidate = name if os.path.isabs(name) else os.path.join(directory, name)
    base = os.path.basename(candidate)
    spelled = os.path.join(directory, base)
    real = os.path.realpath(candidate)
    # The respelled name must be the very file the pointer reaches: an
    # absolute pointer elsewhere that is a symlink into DIRECTORY would
    # otherwise name a file beside the one QEMU reads.
    if (base in ("", ".", "..") or Path(real).parent != Path(os.path.realpath(directory))
            or os.path.realpath(spelled) != real):
        raise UnsafeImage(f"{what} {name!r} lies outside {directory}")
    return spelled


def same_file(a: str, b: str) -> bool:
    """A and B name one file, however each is spelled.  Blocking (it
    resolves symlinks on the disk): call from a thread."""
    return os.path.realpath(a) == os.path.realpath(b)


def plain(path: str) -> bool:
    """PATH is absolute and normalised (no ``..``, no ``.``, no doubled
    ``/``): the only spelling gasnap derives names, checks and unlinks from."""
    return os.path.isabs(path) and os.path.normpath(path) == path


def unplain(chain: Iterable[Layer]) -> str | None:
    """Why the file names of CHAIN (as libvirt's XML or QEMU's block graph
    report them) cannot be acted on, or None: each must be absolute and
    normalised (no ``..``, no ``.``, no doubled ``/``), because overlay
    names, directory checks and every unlink are derived from them."""
    for layer in chain:
        if not plain(layer.path):
            return f"the layer {layer.path!r} is not named by a plain absolute path"
    return None


def chain_problem(chain: tuple[Layer, ...]) -> str | None:
    """Why CHAIN's file names (as libvirt or QEMU report them) cannot be
    acted on, or None: each plain (``unplain``), and a layer in the active
    file's directory spelled as the active file spells it (an absolute
    pointer in another spelling of that directory would make one file two
    names, and the relative pointers written from them wrong).  Blocking
    (it resolves symlinks): call from a thread."""
    problem = unplain(chain)
    if problem is not None or not chain:
        return problem
    directory = os.path.dirname(chain[0].path)
    home = os.path.realpath(directory)
    for layer in chain[1:]:
        if (os.path.dirname(layer.path) != directory
                and os.path.realpath(os.path.dirname(layer.path)) == home):
            return (f"the layer {layer.path!r} names the active file's directory "
                    f"{directory} another way")
    return None


async def real_path(path: str) -> str:
    """PATH with every symlink resolved (off the loop: it touches the disk)."""
    return await asyncio.to_thread(os.path.realpath, path)


def relative_pointer(image: str, backing: str) -> str:
    """The backing pointer to write into IMAGE for BACKING: relative to
    IMAGE's directory, so a moved mount keeps the chain whole."""
    return os.path.relpath(backing, os.path.dirname(image))


# --- names ------------------------------------------------------------------------

_SNAPSHOT_SUFFIX = re.compile(r"(\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})+$")
SPARE_SUFFIX = ".gasnap-spare"
NAME_MAX = 255
# The longest volume id a name keeps whole: room for "volume-", "." and a
# snapshot id (and a spare's suffixes) within NAME_MAX.
_MAX_ID = 160


def volume_name(volume_id: str) -> str:
    """``volume-<volume_id>``, Cinder's name for a volume's files, with the
    characters of the id outside ``[A-Za-z0-9._-]`` written as ``_`` (a
    fallback id like ``web1/vda``); an id too long for a file name is
    shortened, a digest of it keeping such ids apart."""
    spelled = re.sub(r"[^A-Za-z0-9._-]", "_", volume_id).replace("..", "__")
    if len(spelled) > _MAX_ID:
        digest = hashlib.sha256(volume_id.encode()).hexdigest()[:16]
        spelled = f"{spelled[:_MAX_ID - 17]}-{digest}"
    return f"volume-{spelled}"


def named_for(path: str, volume_id: str) -> bool:
    """Whether PATH's name is one made for VOLUME_ID's files: the volume's
    own (``volume-<id>``) or a snapshot's overlay of it (``volume-<id>.*``),
    as gasnap and Cinder name them."""
    name, own = os.path.basename(path), volume_name(volume_id)
    return name == own or name.startswith(own + ".")


def overlay_path(active_file: str, volume_id: str, snapshot_id: str) -> str:
    """Cinder's naming: ``volume-<volume_id>.<snapshot_id>`` next to the
    active file, whatever the active file is called (a layer virsh or a
    person named, say): names never grow with the chain (NAME_MAX is 255)."""
    return str(Path(active_file).with_name(f"{volume_name(volume_id)}.{snapshot_id}"))


def spare_path(active_file: str) -> str:
    """The spare overlay of the volume whose active file is ACTIVE_FILE
    (``gasnap.spares``): hidden, one per volume (its base name: the active
    file's without snapshot suffixes), next to its files; a name too long
    for the filesystem is shortened to a digest."""
    name = Path(active_file).name
    base = _SNAPSHOT_SUFFIX.sub("", name) or name
    spare = f".{base}{SPARE_SUFFIX}"
    if len(spare.encode()) > NAME_MAX:
        spare = f".{hashlib.sha256(base.encode()).hexdigest()[:32]}{SPARE_SUFFIX}"
    return str(Path(active_file).with_name(spare))


# --- memory files ---------------------------------------------------------------

MEMORY_MAGIC = b"LibvirtQemudSave"
MEMORY_CHECK_SUFFIX = ".check"


class MemoryUnusable(Conflict):
    code = "memory_unusable"


def seal_memory(path: str) -> int:
    """Write PATH's size next to it (``.check``), so that a file cut short
    later is known before a restore is tried.  Blocking: call from a thread."""
    size = os.stat(path).st_size
    Path(path + MEMORY_CHECK_SUFFIX).write_text(json.dumps({"size": size}))
    return size


def check_memory(path: str) -> int:
    """PATH is a libvirt save image whole as it was written; its size.
    Blocking: call from a thread."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(MEMORY_MAGIC))
        size = os.stat(path).st_size
        sealed = json.loads(Path(path + MEMORY_CHECK_SUFFIX).read_text())["size"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MemoryUnusable(f"memory file {path} cannot be used: {err}") from err
    if magic != MEMORY_MAGIC:
        raise MemoryUnusable(f"{path} is not a libvirt memory image")
    if size != sealed:
        raise MemoryUnusable(f"{path} has {size} bytes, {sealed} were written")
    return size


_MEMORY_NAME = re.compile(r"gasnap-memory-([0-9a-f-]{36})\.([0-9a-f-]{36})")


def memory_name_ok(path: str, directories: Iterable[str], group_id: str | None,
                   domain_uuid: str | None) -> bool:
    """PATH (a record's ``memory_file``) is what gasnap names one:
    ``gasnap-memory-<GROUP_ID>.<DOMAIN_UUID>``, directly in one of
    DIRECTORIES (where that domain's images are; its first disk's image when
    made).  A record is data from a service a fleet shares: no path in it is
    read, restored or unlinked without this."""
    found = _MEMORY_NAME.fullmatch(os.path.basename(path))
    return (found is not None and found.group(1) == group_id
            and found.group(2) == domain_uuid and plain(path)
            and os.path.dirname(path) in set(directories))


def drop_memory(path: str) -> None:
    """Remove a memory file and its check.  Blocking: call from a thread."""
    Path(path).unlink(missing_ok=True)
    Path(path + MEMORY_CHECK_SUFFIX).unlink(missing_ok=True)


# --- chains -----------------------------------------------------------------------


def chain(path: str, fmt: str, directory: str | None = None) -> tuple[Layer, ...]:
    """The chain from PATH (format FMT, named by the caller) down, active
    first, every format taken from the layer above; UnsafeImage where it
    would have to be guessed or would leave DIRECTORY (default: PATH's).
    Blocking: call from a thread."""
    directory = directory or os.path.dirname(path)
    layers = [Layer(path, fmt)]
    seen = {os.path.realpath(path)}
    while fmt == "qcow2":
        header = read_qcow2_header(path)
        if header.data_file is not None:
            resolve_inside(directory, header.data_file, f"the data file of {path}")
        if header.backing_file is None:
            break
        if header.backing_format is None:
            raise UnsafeImage(f"{path} names no format for its backing file "
                              f"{header.backing_file!r}; gasnap does not guess one")
        if header.backing_format not in FORMATS:
            raise UnsafeImage(f"{path} backs onto a {header.backing_format} image")
        path = resolve_inside(directory, header.backing_file, f"the backing file of {path}")
        fmt = header.backing_format
        if os.path.realpath(path) in seen or len(layers) >= MAX_CHAIN:
            raise UnsafeImage(f"the chain below {layers[0].path} loops or is too deep")
        seen.add(os.path.realpath(path))
        layers.append(Layer(path, fmt))
    if fmt not in FORMATS:
        raise UnsafeImage(f"{path} is {fmt or 'of unknown format'}")
    return tuple(layers)


async def read_chain(path: str, fmt: str, directory: str | None = None) -> tuple[Layer, ...]:
    return await asyncio.to_thread(chain, path, fmt, directory)


# --- sizes and owners -------------------------------------------------------------


async def virtual_size(path: str, fmt: str) -> int:
    """FMT named by the caller: a qcow2 header's size, or a raw file's length."""
    if fmt == "qcow2":
        return (await asyncio.to_thread(read_qcow2_header, path)).virtual_size
    return (await asyncio.to_thread(os.stat, path)).st_size


async def allocated(path: str) -> int:
    """Bytes the file occupies on the host (what a merge of it moves)."""
    return (await asyncio.to_thread(os.stat, path)).st_blocks * 512


async def chain_data(path: str, fmt: str) -> int:
    """Bytes the chain from PATH down occupies: at most what a full copy of
    it writes (formats as ``chain`` names them, inside PATH's directory)."""
    return sum([await allocated(layer.path) for layer in await read_chain(path, fmt)])


async def adopt_owner(path: str, like: str) -> None:
    """Give PATH the owner and mode of LIKE, so the hypervisor opens it as it
    opens the rest of the chain."""
    st = await asyncio.to_thread(os.stat, like)
    await asyncio.to_thread(os.chown, path, st.st_uid, st.st_gid)
    await asyncio.to_thread(os.chmod, path, st.st_mode & 0o7777)
