"""Manage and unmanage: adopt a layer of a volume's live chain as a snapshot
(Cinder's manage_existing_snapshot), or forget a record and leave its files.

A layer made by virsh, by hand or by another tool is the overlay of a
snapshot whose point-in-time image is the layer below it: adopting layer L
records ``file`` = L and ``image`` = L's backing file, with ``origin:
managed`` and ``consistency: unknown`` (nobody knows how the layer was
taken).  Every format comes from the live XML's chain (never probed), and
only layers of that chain, inside the volume's directory, are adopted.
Nothing here changes a file or a chain; unmanage changes only records.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .. import images
from ..errors import BadRequest, Conflict
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
from . import Context, tree
from .createplan import VolumeNotFound, check_description, check_name, check_unique_id


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

    @property
    def reason_not_safe(self) -> str | None:
        if self.snapshot_id is not None:
            return "already managed"
        if self.backing is None:
            return "the base of the chain: no point-in-time image below it"
        return None

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
    found = []
    for upper, lower in zip(vol.chain, [*vol.chain[1:], None], strict=True):
        size = await images.virtual_size(lower.path, lower.format) if lower else \
            await images.virtual_size(upper.path, upper.format)
        found.append(Layer(upper.path, lower.path if lower else None,
                           lower.format if lower else None, size, by_file.get(upper.path)))
    return dom, vol, found


async def manage(ctx: Context, volume_id: str, ref: str, name: str,
                 description: str) -> SnapshotMeta:
    """Adopt layer REF (a file name in the volume's directory) of VOLUME_ID."""
    check_name(name)
    check_description(description)
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
