"""Planning clone work: requests, checks and plans; nothing here changes a
disk, a domain or a record.

A clone is a new volume made from a snapshot's image: ``linked`` (a qcow2
backed by the image, made in an instant) or ``full`` (an independent qcow2
copy).  Its file is ``volume-<id>`` next to the source volume's files and
its id is its ``<serial>`` wherever it is attached, so gasnap treats it as a
volume like any other.  The dependency rule (``needed``): while a linked
clone reads a snapshot's image, that image and every file below it stay
exactly as they are.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from .. import images
from ..errors import BadRequest, Conflict
from ..httpkit import get_string, only_keys
from ..hypervisor import DomainState, Feature, require
from ..metadata import CloneMeta, CloneMode, CloneStatus, Status, WrongStatus
from . import Context, space
from .createplan import check_name
from .deleteplan import ChainMismatch

TARGET = re.compile(r"^vd[a-z]{1,2}$")
FREE_TARGETS = [f"vd{c}" for c in "bcdefghijklmnopqrstuvwxyz"]


class CloneAttached(Conflict):
    code = "clone_attached"


class CloneHasSnapshots(Conflict):
    code = "clone_has_snapshots"


class TargetBusy(Conflict):
    code = "target_busy"


# --- requests -----------------------------------------------------------------


@dataclass(frozen=True)
class AttachRequest:
    domain: str
    target: str | None = None
    readonly: bool = False


@dataclass(frozen=True)
class CloneRequest:
    snapshot_id: str
    mode: CloneMode
    name: str = ""
    attach: AttachRequest | None = None


def attach_from_doc(doc: Any) -> AttachRequest:
    if not isinstance(doc, dict):
        raise BadRequest("attach must be an object", code="invalid_request")
    only_keys(doc, {"domain", "target", "readonly"}, "attach")
    domain, target = get_string(doc, "domain"), get_string(doc, "target")
    if not domain:
        raise BadRequest("attach.domain is required", code="invalid_request")
    if target is not None and not TARGET.match(target):
        raise BadRequest(f"target {target!r} is not a virtio disk name (vdb, vdc, ...)",
                         code="invalid_target")
    readonly = doc.get("readonly", False)
    if not isinstance(readonly, bool):
        raise BadRequest("readonly must be true or false", code="invalid_request")
    return AttachRequest(domain, target, readonly)


def request_from_doc(snapshot_id: str, doc: dict[str, Any]) -> CloneRequest:
    only_keys(doc, {"mode", "name", "attach"})
    try:
        mode = CloneMode(doc.get("mode", "linked"))
    except ValueError as err:
        raise BadRequest("mode must be linked or full", code="invalid_request") from err
    name = get_string(doc, "name") or ""
    check_name(name)
    attach = attach_from_doc(doc["attach"]) if doc.get("attach") is not None else None
    return CloneRequest(snapshot_id, mode, name, attach)


# --- plans --------------------------------------------------------------------


@dataclass(frozen=True)
class AttachPlan:
    clone_id: str
    path: str
    domain: str
    uuid: str
    target: str
    readonly: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClonePlan:
    clone_id: str
    snapshot_id: str
    source_volume_id: str
    name: str
    mode: CloneMode
    file: str
    image: str  # the snapshot's image: the linked clone's backing, the full clone's source
    image_format: str
    size: int
    created_at: str
    attach: AttachPlan | None

    @property
    def part(self) -> str:
        """Where the file is made; renamed to ``file`` once whole."""
        return os.path.join(os.path.dirname(self.file), f".{os.path.basename(self.file)}.part")

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["mode"] = self.mode.value
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ClonePlan:
        fields = dict(doc)
        fields["mode"] = CloneMode(doc["mode"])
        fields["attach"] = AttachPlan(**doc["attach"]) if doc.get("attach") else None
        return cls(**fields)


async def _image_format(overlay: str, image: str) -> str:
    """IMAGE's format as its overlay's header records it (written by the host)."""
    def read() -> str:
        header = images.read_qcow2_header(overlay)
        images.check_plain(overlay, header)
        if header.backing_file is None or header.backing_format is None:
            raise ChainMismatch(f"{overlay} records no backing file with a format")
        backing = images.resolve_inside(os.path.dirname(overlay), header.backing_file,
                                        f"the backing of {overlay}")
        if backing != image:
            raise ChainMismatch(f"{overlay} backs onto {backing}, its record says {image}")
        return header.backing_format

    try:
        return await asyncio.to_thread(read)
    except FileNotFoundError as err:
        raise ChainMismatch(f"{overlay} is missing") from err


async def plan_create(ctx: Context, request: CloneRequest) -> ClonePlan:
    if request.attach is not None:
        require(ctx.hv, Feature.HOTPLUG)
    meta = await ctx.metadata.get_snapshot(request.snapshot_id)
    if meta.status is not Status.AVAILABLE or not meta.file or not meta.backing_file:
        raise WrongStatus(f"snapshot {meta.id} is {meta.status.value}; only an available "
                          "snapshot can be cloned", current=meta.status.value)
    image = meta.backing_file
    if not (images.plain(meta.file) and images.plain(image)):
        # a record's paths: read, and written beside, only if plain
        raise images.UnsafeImage(f"snapshot {meta.id}: its record names {meta.file!r} and "
                                 f"{image!r}, not plain absolute paths")
    fmt = await _image_format(meta.file, image)
    # The image's own chain must be readable without guessing, inside its directory.
    await images.read_chain(image, fmt, os.path.dirname(image))  # raises if not
    clone_id = str(uuid.uuid4())
    path = os.path.join(os.path.dirname(image), f"volume-{clone_id}")
    attach = (await plan_attach(ctx, clone_id, path, request.attach)
              if request.attach else None)
    size = await images.virtual_size(image, fmt)
    if request.mode is CloneMode.LINKED:
        need = space.overlay_bytes(size)
    else:
        need = await images.chain_data(image, fmt)
    await space.check({os.path.dirname(path): need}, ctx.min_free, "the clone")
    return ClonePlan(
        clone_id=clone_id, snapshot_id=meta.id, source_volume_id=meta.volume_id,
        name=request.name, mode=request.mode, file=path, image=image, image_format=fmt,
        size=size,
        created_at=datetime.now(UTC).isoformat(timespec="microseconds"), attach=attach,
    )


async def plan_attach(ctx: Context, clone_id: str, path: str,
                      request: AttachRequest) -> AttachPlan:
    require(ctx.hv, Feature.HOTPLUG)
    dom = await ctx.hv.get_domain(request.domain)
    if dom.state not in (DomainState.RUNNING, DomainState.PAUSED, DomainState.SHUTOFF):
        raise Conflict(f"{dom.name} is {dom.state.value}", code="domain_state")
    used = await ctx.hv.disk_targets(dom.name)
    if request.target is not None:
        if request.target in used:
            raise TargetBusy(f"{dom.name} already has a disk at {request.target}",
                             target=request.target)
        target = request.target
    else:
        free = [t for t in FREE_TARGETS if t not in used]
        if not free:
            raise TargetBusy(f"{dom.name} has no free virtio disk target")
        target = free[0]
    return AttachPlan(clone_id, path, dom.name, dom.uuid, target, request.readonly)


# --- checks -------------------------------------------------------------------


def check_own_file(meta: CloneMeta) -> None:
    """A clone record is data from a service a fleet shares: its file is
    attached, rebased or removed only if it is what gasnap names a clone,
    ``volume-<clone id>``, by a plain absolute path, beside the image it
    was made from (REVIEW-2 item 7)."""
    path = meta.file
    if not (images.plain(path) and os.path.basename(path) == images.volume_name(meta.id)
            and (meta.image is None or os.path.dirname(meta.image) == os.path.dirname(path))):
        raise images.UnsafeImage(f"clone {meta.id}: its record names {path!r}, not a file "
                                 "gasnap made for it; nothing is done with it")


def check_available(meta: CloneMeta) -> None:
    if meta.status is not CloneStatus.AVAILABLE:
        raise WrongStatus(f"clone {meta.id} is {meta.status.value}",
                          current=meta.status.value)


async def check_detached(ctx: Context, meta: CloneMeta) -> None:
    """Attached by the record, or in use by any domain whatever the record says."""
    if meta.attached_to is not None:
        raise CloneAttached(f"clone {meta.id} is attached to {meta.attached_to.domain} "
                            f"({meta.attached_to.target}); detach it first",
                            domain=meta.attached_to.domain)
    real = await asyncio.to_thread(os.path.realpath, meta.file)
    if real in await ctx.hv.files_in_use():
        raise CloneAttached(f"clone {meta.id}: a domain uses {meta.file}")


async def check_no_snapshots(ctx: Context, meta: CloneMeta) -> None:
    """A clone's own snapshots keep its files as they are."""
    own = await ctx.metadata.list_snapshots(volume_id=meta.id)
    if own:
        raise CloneHasSnapshots(f"clone {meta.id} has {len(own)} snapshots of its own; "
                                "delete them first", snapshots=[m.id for m in own])
