"""Nova's ``os-assisted-volume-snapshots`` calls, translated into gasnap's.

Cinder's remotefs drivers (NFS, GlusterFS, ...) ask Nova to snapshot an
attached volume: they name the overlay (``new_file``) and, to delete, say
which file merges into which (``delete_info``).  gasnap answers these calls
itself with the same shapes, and checks every file named against the live
chain before anything is touched.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import images
from .cinder import CinderReporter
from .errors import BadRequest
from .hypervisor import Domain, Volume
from .metadata import NOVA_DESCRIPTION, SnapshotMeta, SnapshotNotFound, Status
from .quiesce import Quiesce
from .service import SnapshotService
from .tasks import Task
from .workflows.createplan import (
    CreateRequest,
    Preset,
    UnsupportedDisk,
    VolumeNotFound,
)
from .workflows.deleteplan import Strategy

DESCRIPTION = NOVA_DESCRIPTION
# How long a call waits for a busy volume: half of Cinder's own wait for the
# create (600 s) and the delete (7200 s) to be reported, so that the work
# itself ends, and is reported, while Cinder still listens.
CREATE_WAIT = 300.0
DELETE_WAIT = 3600.0
_SNAPSHOT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


class InvalidNovaRequest(BadRequest):
    code = "invalid_request"


class PathOutsideVolume(BadRequest):
    code = "path_outside_volume"


class FileMismatch(BadRequest):
    """A named file exists but is not what the call says it is."""

    code = "file_mismatch"


# --- parsing ----------------------------------------------------------------------


@dataclass(frozen=True)
class NovaCreate:
    volume_id: str
    snapshot_id: str
    new_file: str
    reply_id: str


@dataclass(frozen=True)
class NovaDelete:
    volume_id: str
    file_to_merge: str | None
    merge_target_file: str | None


def _text(doc: dict[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidNovaRequest(f"{where}.{key} is required and must be a string")
    return value


def _nullable(doc: dict[str, Any], key: str, where: str) -> str | None:
    if key not in doc:
        raise InvalidNovaRequest(f"{where}.{key} is required (null allowed)")
    value = doc[key]
    if value is not None and (not isinstance(value, str) or not value):
        raise InvalidNovaRequest(f"{where}.{key} must be a file name or null")
    return value


def _qcow2_type(doc: dict[str, Any], where: str) -> None:
    if doc.get("type", "qcow2") != "qcow2":
        raise InvalidNovaRequest(f"{where}.type must be qcow2")


def parse_create(body: dict[str, Any]) -> NovaCreate:
    snapshot = body.get("snapshot")
    if not isinstance(snapshot, dict):
        raise InvalidNovaRequest("the body must be {\"snapshot\": {...}}")
    info = snapshot.get("create_info")
    if not isinstance(info, dict):
        raise InvalidNovaRequest("snapshot.create_info must be an object")
    _qcow2_type(info, "create_info")
    snapshot_id = _text(info, "snapshot_id", "create_info")
    if not _SNAPSHOT_ID.fullmatch(snapshot_id):
        raise InvalidNovaRequest("create_info.snapshot_id must be an id (Cinder's: a UUID), "
                                 "letters, digits, '.', '_' and '-'")
    reply_id = info.get("id", snapshot_id)
    if not isinstance(reply_id, str):
        raise InvalidNovaRequest("create_info.id must be a string")
    return NovaCreate(_text(snapshot, "volume_id", "snapshot"), snapshot_id,
                      _text(info, "new_file", "create_info"), reply_id)


def parse_delete(delete_info: str | None) -> NovaDelete:
    if delete_info is None:
        raise InvalidNovaRequest("the delete_info query parameter is required")
    try:
        doc = json.loads(delete_info)
    except ValueError as err:
        raise InvalidNovaRequest("delete_info is not valid JSON") from err
    if not isinstance(doc, dict):
        raise InvalidNovaRequest("delete_info must be a JSON object")
    _qcow2_type(doc, "delete_info")
    return NovaDelete(_text(doc, "volume_id", "delete_info"),
                      _nullable(doc, "file_to_merge", "delete_info"),
                      _nullable(doc, "merge_target_file", "delete_info"))


# --- paths ------------------------------------------------------------------------


def _real(path: str) -> Path:
    return Path(os.path.realpath(path))


def inside(directory: Path, name: str, what: str) -> Path:
    """NAME (a basename, or a path) in DIRECTORY, spelled as DIRECTORY is;
    refused if it would lead anywhere else (``..``, an absolute path
    elsewhere, a symlink out)."""
    try:
        return Path(images.resolve_inside(str(directory), name, what))
    except images.UnsafeImage as err:
        raise PathOutsideVolume(f"{what} {name!r} is not a file in {directory}") from err


async def check_overlay(path: Path, vol: Volume) -> None:
    """A ``new_file`` the caller made: a qcow2 (the call's ``type``) whose
    backing file is VOL's active file with the active file's format
    recorded, its data in itself or in a file of the same directory.  Its
    header is read as qcow2 only because the call says it is one; no format
    is guessed."""
    try:
        header = await asyncio.to_thread(images.read_qcow2_header, str(path))
    except OSError as err:
        raise FileMismatch(f"{path.name} cannot be read: {err.strerror}") from err
    except images.UnsafeImage as err:
        raise FileMismatch(f"{path.name}: {err.message}") from err
    if header.data_file is not None:
        inside(path.parent, header.data_file, f"the data file of {path.name}")
    active = Path(vol.active_file)
    if header.backing_file is None:
        raise FileMismatch(f"{path.name} has no backing file; expected {active.name}")
    found = inside(path.parent, header.backing_file, f"the backing file of {path.name}")
    if _real(str(found)) != _real(str(active)):
        raise FileMismatch(f"{path.name} backs onto {found.name}, not {active.name}")
    if header.backing_format != vol.format:
        raise FileMismatch(f"{path.name} records its backing file as "
                           f"{header.backing_format or 'of no format'}; {active.name} is "
                           f"{vol.format}")


# --- the calls ----------------------------------------------------------------------


async def _find_volume(service: SnapshotService, volume_id: str) -> tuple[Domain, Volume]:
    """The one disk whose serial is VOLUME_ID (no guest agent is pinged);
    one attached to several domains is refused (Cinder's multiattach)."""
    found = [(dom, vol) for dom in await service.domains()
             for vol in dom.volumes if vol.volume_id == volume_id]
    if not found:
        raise VolumeNotFound(f"no domain has a disk with serial {volume_id}")
    if len(found) > 1:
        names = ", ".join(dom.name for dom, _ in found)
        raise UnsupportedDisk(f"volume {volume_id} is attached to several domains ({names})")
    return found[0]


async def create(service: SnapshotService, call: NovaCreate,
                 cinder: CinderReporter | None = None) -> Task:
    """Snapshot the volume onto ``new_file`` (created, or reused when the
    caller made it on top of the active file)."""
    dom, vol = await _find_volume(service, call.volume_id)
    active = Path(vol.active_file)
    overlay = inside(active.parent, call.new_file, "new_file")
    reuse = await _exists(overlay)
    if reuse:
        await check_overlay(overlay, vol)
    await _refuse_existing(service, call.snapshot_id)
    request = CreateRequest(
        domains=[dom.name], disks={dom.name: [vol.target]}, name=call.snapshot_id,
        description=DESCRIPTION, quiesce=Quiesce.PREFERRED,
        presets={vol.volume_id: Preset(call.snapshot_id, str(overlay), reuse)},
        auto_delete=False,  # Cinder keeps these snapshots' records: it deletes them
    )

    async def recheck() -> None:
        # What was true when the call was accepted, asked again now that the
        # volume is held: the same call sent twice while the first waited
        # finds the first's record and overlay (Cinder retries).
        await _refuse_existing(service, call.snapshot_id)
        if await _exists(overlay) != reuse:
            raise FileMismatch(f"{overlay.name} {'vanished' if reuse else 'appeared'} while "
                               "the call waited for the volume")
        if reuse:  # the caller's file must still back onto the active file
            _dom, now = await _find_volume(service, call.volume_id)
            await check_overlay(overlay, now)

    return await _reported(cinder, call.snapshot_id, "create",
                           service.create_queued(request, CREATE_WAIT, recheck))


async def _refuse_existing(service: SnapshotService, snapshot_id: str) -> None:
    try:
        await service.snapshot(snapshot_id)
    except SnapshotNotFound:
        return
    raise InvalidNovaRequest(f"snapshot {snapshot_id} already exists", code="snapshot_exists")


async def _reported(cinder: CinderReporter | None, snapshot_id: str, op: str,
                    accepted: Awaitable[Task]) -> Task:
    """The work ACCEPTED starts, and Cinder hears how it ends: the intent is
    written before the work is accepted, so a restart cannot lose it."""
    if cinder is None:
        return await accepted
    seq = await cinder.intend(snapshot_id, op)
    try:
        task = await accepted
    except BaseException:
        await cinder.forget(seq)  # refused up front: the caller heard it
        raise
    cinder.follow(seq, task)
    return task


async def delete(service: SnapshotService, snapshot_id: str, call: NovaDelete,
                 cinder: CinderReporter | None = None) -> Task:
    """Nova's meaning: no merge target → pull into the active layer down to
    ``file_to_merge``; otherwise commit ``file_to_merge`` into the target.
    A call that names files outside the volume, or that does not fit a
    snapshot already settled, is refused now; one whose volume is busy (the
    snapshot's own create still finalizing, say) is checked again and done
    once the volume is free."""
    _dom, vol = await _find_volume(service, call.volume_id)
    meta = await service.snapshot(snapshot_id)
    if meta.volume_id != call.volume_id:
        raise InvalidNovaRequest(f"snapshot {snapshot_id} belongs to volume {meta.volume_id}")
    directory = Path(vol.active_file).parent
    named = {key: inside(directory, value, key) if value is not None else None
             for key, value in (("file_to_merge", call.file_to_merge),
                                ("merge_target_file", call.merge_target_file))}
    if meta.status is Status.AVAILABLE:
        await asyncio.to_thread(_strategy, meta, vol, named, snapshot_id)

    async def choose() -> Strategy:
        _dom, now = await _find_volume(service, call.volume_id)
        # off the loop: it resolves real paths on the disk
        return await asyncio.to_thread(_strategy, await service.snapshot(snapshot_id), now,
                                       named, snapshot_id)

    return await _reported(cinder, snapshot_id, "delete",
                           service.delete_queued(snapshot_id, choose, DELETE_WAIT))


def _strategy(meta: SnapshotMeta, vol: Volume, named: dict[str, Path | None],
              snapshot_id: str) -> Strategy:
    """How Nova's delete_info merges META out of VOL's live chain, or
    FileMismatch when it would not remove exactly that snapshot."""
    chain = [_real(layer.path) for layer in vol.chain]
    # Compared as real paths: the caller, libvirt and the record may each
    # spell a symlinked image directory their own way.
    named = {key: _real(str(path)) if path is not None else None
             for key, path in named.items()}
    # The live chain names every file and its format; a named file that is
    # not in it is refused before anything is read.
    for path in filter(None, named.values()):
        if path not in chain:
            raise FileMismatch(f"{path.name} is not in the chain of {vol.volume_id}")
    own = _real(meta.file or "/"), _real(meta.backing_file or "/")
    if named["merge_target_file"] is None:
        below = chain[chain.index(own[1]) + 1] if own[1] in chain[:-1] else None
        if own[0] != chain[0] or named["file_to_merge"] != below:
            raise FileMismatch("delete_info asks for a pull that does not remove snapshot "
                               f"{snapshot_id}'s image from the active layer")
        return Strategy.PULL
    if (named["file_to_merge"], named["merge_target_file"]) != own:
        raise FileMismatch(f"delete_info does not merge snapshot {snapshot_id}'s overlay "
                           "into its image")
    return Strategy.COMMIT


async def _exists(path: Path) -> bool:
    return await asyncio.to_thread(path.exists)
