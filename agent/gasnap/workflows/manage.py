"""Manage and unmanage: adopt a layer of a volume's live chain as a snapshot
(Cinder's manage_existing_snapshot), or forget a record and leave its files.

A layer made by virsh, by hand or by another tool is the overlay of a
snapshot whose point-in-time image is the layer below it: adopting layer L
records ``file`` = L and ``image`` = L's backing file, with ``origin:
managed`` and ``consistency: unknown`` (nobody knows how the layer was
taken).  Every format comes from the live XML's chain (never probed), and
only layers of that chain whose layer and image lie inside the volume's
directory, and whose image nothing else this host can see reads, are
adopted (see ``_shared``).
Nothing here changes a file or a chain; unmanage changes only records.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .. import images
from ..errors import BadRequest, Conflict, GasnapError
from ..hypervisor import Domain, Volume
from ..metadata import (
    HOLDING,
    Consistency,
    Finalization,
    NewSnapshot,
    Origin,
    SnapshotMeta,
    Status,
    WrongStatus,
)
from . import Context, identity, tree
from .createplan import (
    VolumeNotFound,
    check_caller_description,
    check_name,
    check_unique_id,
)


class InvalidReference(BadRequest):
    code = "invalid_reference"


class AlreadyManaged(Conflict):
    code = "already_managed"


@dataclass(frozen=True)
class Layer:
    """One layer of a volume's live chain, as Cinder lists manageable snapshots."""

    path: str
    backing: str | None
    backing_format: str | None
    size: int
    snapshot_id: str | None  # the record that has it as its overlay, if one does
    shared: str | None = None  # why its image may not be this volume's alone

    @property
    def reason_not_safe(self) -> str | None:
        if self.snapshot_id is not None:
            return "already managed"
        if self.backing is None:
            return "the base of the chain: no point-in-time image below it"
        return self.shared

    def to_dict(self) -> dict[str, Any]:
        return {"reference": {"file": os.path.basename(self.path)}, "size": self.size,
                "safe_to_manage": self.reason_not_safe is None,
                "reason_not_safe": self.reason_not_safe, "snapshot_id": self.snapshot_id,
                "backing": os.path.basename(self.backing) if self.backing else None}


async def find_volume(ctx: Context, volume_id: str) -> tuple[Domain, Volume]:
    for dom in await ctx.hv.list_domains():
        vol = dom.volume(volume_id)
        if vol is not None and vol.volume_id == volume_id:
            return dom, vol
    raise VolumeNotFound(f"no domain has volume {volume_id}", volume_id=volume_id)


async def layers(ctx: Context, volume_id: str) -> tuple[Domain, Volume, list[Layer]]:
    """Every layer of VOLUME_ID's live chain, active first."""
    dom, vol = await find_volume(ctx, volume_id)
    if vol.chain_error is not None:
        raise Conflict(f"{dom.name}/{vol.target}: its chain cannot be read safely: "
                       f"{vol.chain_error}", code="chain_mismatch")
    metas = await ctx.metadata.list_snapshots(volume_id=volume_id)
    by_file = {m.file: m.id for m in metas if m.status in HOLDING}
    others = await _other_readers(ctx, dom, vol)
    found = []
    for upper, lower in zip(vol.chain, [*vol.chain[1:], None], strict=True):
        size = await images.virtual_size(lower.path, lower.format) if lower else \
            await images.virtual_size(upper.path, upper.format)
        shared = (await _shared(vol, upper.path, lower.path, lower is vol.chain[-1], others)
                  if lower else None)
        found.append(Layer(upper.path, lower.path if lower else None,
                           lower.format if lower else None, size, by_file.get(upper.path),
                           shared))
    return dom, vol, found


# --- whose image ------------------------------------------------------------------
#
# Deleting an adopted snapshot merges its layer into its image (commit) or
# pulls the image up and unlinks it: the image must be this volume's alone.
# A golden base, another disk's layer, a linked clone's source would be
# written into or removed.  What this host can see is checked; a base shared
# with disks elsewhere is known only by its name.


async def _other_readers(ctx: Context, dom: Domain, vol: Volume) -> dict[str, str]:
    """Real path -> who reads it, of every file another disk of any domain
    uses, and every qcow2 in the volume's directory that backs onto a file
    there (an overlay of another VM, or a clone, made outside gasnap)."""
    readers = await identity.other_disks(ctx, dom, vol)
    own = {await images.real_path(layer.path) for layer in vol.chain}
    directory = os.path.dirname(vol.active_file)
    for child, backing in await asyncio.to_thread(_backings_in, directory):
        if child not in own:
            readers.setdefault(backing, f"{os.path.basename(child)} (backs onto it)")
    return readers


def _backings_in(directory: str) -> list[tuple[str, str]]:
    """(file, its backing file), both real paths, for every qcow2 directly in
    DIRECTORY that names one.  Blocking: call from a thread."""
    found: list[tuple[str, str]] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return found
    for entry in entries:
        if entry.name.endswith(images.SPARE_SUFFIX):
            continue  # gasnap's own spare overlay: made again on the next create
        try:
            if not entry.is_file():
                continue
            header = images.read_qcow2_header(entry.path)
        except (OSError, GasnapError):
            continue  # not a qcow2 (a raw disk, a memory file): backs onto nothing
        if header.backing_file:
            backing = os.path.join(directory, header.backing_file)
            found.append((os.path.realpath(entry.path), os.path.realpath(backing)))
    return found


async def _shared(vol: Volume, layer: str, image: str, bottom: bool,
                  readers: dict[str, str]) -> str | None:
    """Why IMAGE (LAYER's backing) may not be this volume's alone; None if
    it is, as far as this host can tell."""
    directory = await images.real_path(os.path.dirname(vol.active_file))
    for path in (layer, image):
        if os.path.dirname(await images.real_path(path)) != directory:
            return f"{os.path.basename(path)} lies outside the volume's directory"
    reader = readers.get(await images.real_path(image))
    if reader is not None:
        return f"its image {os.path.basename(image)} is also read by {reader}"
    if bottom and not os.path.basename(image).startswith(images.volume_name(vol.volume_id)):
        return (f"its image {os.path.basename(image)} is a base not named for this volume: "
                "it may be a golden image that disks elsewhere read")
    return None


async def manage(ctx: Context, volume_id: str, ref: str, name: str,
                 description: str) -> SnapshotMeta:
    """Adopt layer REF (a file name in the volume's directory) of VOLUME_ID."""
    check_name(name)
    check_caller_description(description)
    if not ref or os.path.basename(ref) != ref or ref in (".", ".."):
        raise InvalidReference(f"ref.file must be a file name in the volume's directory, "
                               f"not {ref!r}")
    dom, vol, found = await layers(ctx, volume_id)
    check_unique_id(ctx, dom.name, vol)
    path = os.path.join(os.path.dirname(vol.active_file), ref)
    layer = next((x for x in found if x.path == path), None)
    if layer is None:
        raise InvalidReference(f"{ref} is not a layer of the live chain of "
                               f"{dom.name}/{vol.target}")
    if layer.snapshot_id is not None:
        raise AlreadyManaged(f"{ref} is snapshot {layer.snapshot_id} already",
                             snapshot_id=layer.snapshot_id)
    if layer.backing is None or layer.backing_format is None:
        raise InvalidReference(f"{ref} is the base of the chain: no point-in-time image "
                               "lies below it")
    if layer.shared is not None:
        raise InvalidReference(f"{ref} cannot be adopted: {layer.shared}", reason=layer.shared)
    metas = await ctx.metadata.list_snapshots(volume_id=volume_id)
    below = [x.path for x in vol.chain[[x.path for x in vol.chain].index(layer.backing):]]
    parent = tree.nearest(below, metas)
    snapshot_id = str(uuid.uuid4())
    await ctx.metadata.create_snapshot_metadata(NewSnapshot(
        snapshot_id=snapshot_id, volume_id=volume_id, name=name, description=description,
        size=layer.size, created_at=datetime.now(UTC).isoformat(timespec="microseconds"),
        domain=dom.name, target=vol.target, parent=parent.id if parent else None,
        origin=Origin.MANAGED, domain_state=dom.state.value))
    return await ctx.metadata.finalize_snapshot_metadata(snapshot_id, Finalization(
        Status.AVAILABLE, layer.path, layer.backing, Consistency.UNKNOWN))


async def unmanage(ctx: Context, snapshot_id: str) -> None:
    """Forget SNAPSHOT_ID's record (available or error); files stay as they are."""
    meta = await ctx.metadata.get_snapshot(snapshot_id)
    if meta.status is Status.AVAILABLE:
        # The store's transition: a snapshot a linked clone names is refused here.
        await ctx.metadata.update_snapshot_status(snapshot_id, Status.DELETING, "unmanage")
    elif meta.status is not Status.ERROR:
        raise WrongStatus(f"snapshot {snapshot_id} is {meta.status.value}; only an available "
                          "or error snapshot is unmanaged", current=meta.status.value)
    await ctx.metadata.snapshot_delete_metadata(snapshot_id)
