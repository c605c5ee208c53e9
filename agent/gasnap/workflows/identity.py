"""Which disk a record is of: the volume its record names, proven by its files.

A record names a volume (``volume_id``: the disk's serial, else
``DOMAIN/TARGET``), never a target alone: Nova frees a target when it
detaches a volume and reuses it for the next one, so the disk at a
record's target may be another volume altogether.  Before anything acts on
a snapshot, the disk whose volume id the record names is found, and the
record's files are checked to belong to that disk's tree: linked to its
live chain through backing files and the volume's other records.

A disk without a serial is only named by where it is plugged in, so a disk
that replaced it there inherits its volume id; its files are then the only
proof: a record is this disk's only if its lineage meets the live chain at
one of the volume's snapshot points (a record's overlay or image), never
merely at a shared base below.  A serial (Cinder's volume UUID) names the volume itself: there a
record may sit on a branch no file links to the chain any more (a branch
pull of a base without backing leaves two trees), as a revert left it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from .. import images
from ..errors import Conflict, NotFound
from ..hypervisor import Domain, Volume
from ..metadata import HOLDING, SnapshotMeta
from . import Context
from .tree import Tree, TreeMismatch

log = logging.getLogger(__name__)


class VolumeDetached(Conflict):
    """No disk of the record's domain is the volume the record was taken of
    (detached, its target reused by another volume, or replaced)."""

    code = "volume_detached"


def volume_of(meta: SnapshotMeta, dom: Domain) -> Volume:
    """The disk of DOM whose volume id META names; never found by target."""
    for vol in dom.volumes:
        if vol.volume_id == meta.volume_id:
            return vol
    held = dom.volume(meta.target or "")
    now = f" ({meta.target} is volume {held.volume_id} now)" if held is not None else ""
    raise VolumeDetached(
        f"snapshot {meta.id}: domain {dom.name} no longer has volume {meta.volume_id}{now}; "
        "its files are left as they are", volume_id=meta.volume_id, domain=dom.name)


async def domain_of(ctx: Context, meta: SnapshotMeta) -> Domain:
    """The domain that has META's volume now: the record's own; or, for a
    volume named by its serial (Cinder's UUID) that left it, the one domain
    that has a disk of that serial now whose live chain holds the record's
    files (Cinder moved the volume to another instance, and asks through
    Nova to delete a snapshot taken before).  A serial alone proves
    nothing: a copied definition carries its source's serials."""
    try:
        dom = await ctx.hv.get_domain(meta.domain)
        volume_of(meta, dom)
        return dom
    except (VolumeDetached, NotFound):
        files = {p for p in (meta.file, meta.backing_file) if p}
        found = [d for d in await ctx.hv.list_domains()
                 if any(v.serial is not None and v.serial == meta.volume_id
                        and files & {layer.path for layer in v.chain} for v in d.volumes)]
        if len(found) != 1:
            if len(found) > 1:
                raise VolumeDetached(
                    f"snapshot {meta.id}: volume {meta.volume_id} left {meta.domain} and is "
                    f"a disk of several domains now ({', '.join(d.name for d in found)}); "
                    "its files are left as they are", volume_id=meta.volume_id) from None
            raise
    log.info("snapshot %s: volume %s moved from %s to %s", meta.id, meta.volume_id,
             meta.domain, found[0].name)
    return found[0]


async def other_disks(ctx: Context, dom: Domain, vol: Volume) -> dict[str, str]:
    """Real path -> which disk reads it, for every layer of every disk but
    VOL: other domains' (running and defined) and DOM's other disks."""
    readers = dict.fromkeys(await ctx.hv.files_in_use(besides=frozenset({dom.uuid})),
                            "another domain's disk")
    for other in dom.volumes:
        if other.target != vol.target:
            for layer in other.chain:
                readers[await images.real_path(layer.path)] = f"{dom.name}/{other.target}"
    return readers


def check_files(meta: SnapshotMeta, vol: Volume, nodes: Tree,
                metas: Iterable[SnapshotMeta]) -> None:
    """VolumeDetached unless META's files are VOL's (see the module's
    docstring); TreeMismatch if a file of META off the live chain is not
    named for the volume.  Nothing has been changed yet."""
    if vol.serial is None and not reaches_a_snapshot_point(meta, vol, nodes, metas):
        files = [p for p in (meta.file, meta.backing_file) if p]
        raise VolumeDetached(
            f"snapshot {meta.id}: the disk at {vol.target} ({vol.volume_id}) has no serial "
            f"and the files of the snapshot ({', '.join(files)}) do not lead to a snapshot of "
            "its live chain: it is another disk than the one this snapshot was taken of; its "
            "files are left as they are", volume_id=meta.volume_id)
    chain = {layer.path for layer in vol.chain}
    # A shared directory (a Cinder NFS share) holds every volume's files: a
    # record naming another volume's, off this one's chain, would have a
    # delete remove them or a revert run on them.  The live chain is
    # libvirt's word; a file off it is this volume's by its name, or by its
    # lineage meeting the chain at one of the volume's snapshot points (a
    # branch a revert left through a layer adopted under another name).
    foreign = [p for p in (meta.file, meta.backing_file)
               if p and p not in chain and not images.named_for(p, meta.volume_id)]
    if foreign and not reaches_a_snapshot_point(meta, vol, nodes, metas):
        raise TreeMismatch(
            f"snapshot {meta.id}: {', '.join(foreign)} is not in the live chain of volume "
            f"{meta.volume_id} and not named for it ({images.volume_name(meta.volume_id)}"
            "[.*]): another volume's file, or one made by hand; nothing is done with it",
            files=foreign)


def reaches_a_snapshot_point(meta: SnapshotMeta, vol: Volume, nodes: Tree,
                             metas: Iterable[SnapshotMeta]) -> bool:
    """Whether META's lineage (its overlay, its image and everything below)
    meets VOL's live chain at a file that is one of the volume's snapshot
    points: the overlay or image of a holding record.  Meeting the chain
    lower down proves nothing: a golden base that many disks back onto
    would join them all."""
    chain = {layer.path for layer in vol.chain}
    points = chain & {p for m in metas if m.status in HOLDING
                      for p in (m.file, m.backing_file) if p}
    start = meta.file if meta.file in nodes.nodes else meta.backing_file
    return bool(start) and bool(points & {start, *nodes.lineage(str(start))})
