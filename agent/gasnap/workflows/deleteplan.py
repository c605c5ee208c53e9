"""Planning a delete: where the snapshot sits in the live chain, and how to merge it.

Nothing here changes a disk or a record.  The record must match the live
chain (its overlay in the chain, its image right below); the method follows
from the layer's position, the domain's state and the strategy (see
``delete``), and the plan carries every file's format as the XML named it.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import images
from ..errors import Conflict, GasnapError
from ..hypervisor import Domain, DomainState, Volume
from ..metadata import (
    HOLDING,
    CloneMeta,
    CloneMode,
    CloneNotFound,
    CloneStatus,
    Origin,
    SnapshotHasClones,
    SnapshotMeta,
    Status,
    WrongStatus,
)
from . import Context, identity, space, tree
from .createplan import UnsupportedDisk

DELETE_FROM = (Status.AVAILABLE, Status.ERROR_DELETING)  # error_deleting: a retry


class Strategy(enum.Enum):
    AUTO = "auto"
    COMMIT = "commit"
    PULL = "pull"


class Method(enum.Enum):
    COMMIT = "commit"  # live, S.file inner
    ACTIVE_COMMIT = "active-commit"  # live, S.file active: commit + pivot
    PULL = "pull"  # live, S.file active
    OFFLINE_COMMIT = "offline-commit"
    OFFLINE_PULL = "offline-pull"
    # S.image backs several files (a branch point), or S is on a branch the
    # domain does not run: S.image's data goes into every file it backs.
    BRANCH_PULL = "branch-pull"
    # S.file is a leaf of a branch nothing runs and no other record names:
    # nothing needs its data, so it goes unmerged (S.image with it when
    # nothing else holds that either).  Merging would leave it behind.
    DROP = "drop"

    @property
    def live(self) -> bool:
        return self in (Method.COMMIT, Method.ACTIVE_COMMIT, Method.PULL)

    @property
    def commits(self) -> bool:
        """Its data goes down into the image (else up into the file above)."""
        return self in (Method.COMMIT, Method.ACTIVE_COMMIT, Method.OFFLINE_COMMIT)


class ChainMismatch(Conflict):
    code = "chain_mismatch"


class StrategyUnsupported(Conflict):
    code = "strategy_unsupported"


class HasDependents(Conflict):
    code = "has_dependents"


class MergeFailed(GasnapError):
    code = "merge_failed"


@dataclass(frozen=True)
class Relink:
    snapshot_id: str
    file: str | None = None
    backing_file: str | None = None


@dataclass(frozen=True)
class DeletePlan:
    snapshot_id: str
    domain: str
    target: str
    volume_id: str
    method: Method
    top: str  # commit: the layer merged down; pull: the active layer
    base: str  # commit: where its data goes; pull: the layer pulled up
    remove: str  # the file that leaves the chain and is deleted
    pull_base: str | None  # pull: the new backing of the active layer
    above: str | None  # offline inner commit: the layer to re-point at base
    base_format: str
    moved_bytes: int
    chain: list[str]  # the chain when planned, active first
    relinks: list[Relink] = field(default_factory=list)
    uuid: str | None = None  # the domain's, when planned: every step acts on it alone
    formats: dict[str, str] = field(default_factory=dict)  # chain file -> its format
    # branch pull: the files S.image backs that are rebased onto pull_base
    # with qemu-img (the active layer, if among them, is pulled instead);
    # whether the active layer pulls (live: a block job) and the chain after
    dependents: list[str] = field(default_factory=list)
    pull_active: bool = False
    job: bool = False
    after: list[str] | None = None
    # the snapshot's memory file (its group's saved RAM), removed with the
    # last record that names it
    memory_file: str | None = None
    group_id: str | None = None
    # where gasnap may have put that memory file: the directories of the
    # domain's live chains when planned (never a record's word for it)
    memory_dirs: list[str] = field(default_factory=list)
    drop_image: bool = False  # drop: S.image goes too

    @property
    def removed(self) -> list[str]:
        """The files that leave the volume once the delete is done."""
        return [self.remove, *([self.base] if self.drop_image else [])]

    def format_of(self, path: str) -> str:
        """PATH's format as the live chain named it when planned (never probed)."""
        try:
            return self.formats[path]
        except KeyError:
            raise MergeFailed(f"no recorded format for {path}; delete again to replan") from None

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["method"] = self.method.value
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> DeletePlan:
        fields = dict(doc)
        fields["method"] = Method(doc["method"])
        fields["relinks"] = [Relink(**r) for r in doc["relinks"]]
        return cls(**fields)

    @property
    def expected_chain(self) -> list[str]:
        if self.after is not None:
            return self.after
        return [p for p in self.chain if p != self.remove]

    @property
    def live_job(self) -> bool:
        """Whether the merge runs as a block job of the running domain."""
        return self.method.live or self.job


# --- plan ---------------------------------------------------------------------


def _volume(meta: SnapshotMeta, dom: Domain) -> Volume:
    vol = identity.volume_of(meta, dom)
    if vol.chain_error is not None or vol.shareable or vol.readonly:
        raise UnsupportedDisk(f"{dom.name}/{vol.target} cannot be merged safely: "
                              f"{vol.chain_error or 'shareable or read-only'}")
    return vol


def _locate(meta: SnapshotMeta, vol: Volume, dom: Domain) -> tuple[list[str], int]:
    chain = [layer.path for layer in vol.chain]
    index = chain.index(str(meta.file))
    below = chain[index + 1] if index + 1 < len(chain) else None
    if below != meta.backing_file:
        raise ChainMismatch(f"snapshot {meta.id}: below its overlay the live chain has "
                            f"{below}, the record says {meta.backing_file}")
    return chain, index


async def plan(ctx: Context, snapshot_id: str, strategy: Strategy) -> DeletePlan:
    meta = await ctx.metadata.get_snapshot(snapshot_id)
    if meta.status not in DELETE_FROM:
        raise WrongStatus(f"snapshot {snapshot_id} is {meta.status.value}; only available "
                          "snapshots can be deleted")
    dom = await identity.domain_of(ctx, meta)
    if dom.state not in (DomainState.RUNNING, DomainState.PAUSED, DomainState.SHUTOFF):
        raise Conflict(f"{dom.name} is {dom.state.value}", code="domain_state")
    live = dom.state is not DomainState.SHUTOFF
    vol = _volume(meta, dom)
    if live and await ctx.hv.block_job_info(dom.name, vol.target) is not None:
        raise Conflict(f"a block job already runs on {dom.name}/{vol.target}",
                       code="block_job_running")
    metas = await ctx.metadata.list_snapshots(volume_id=meta.volume_id)
    nodes = await tree.read(vol, metas)
    if nodes.unreadable:
        # A file that cannot be read might depend on what the merge removes.
        raise ChainMismatch(f"the files of volume {vol.volume_id} cannot all be read "
                            f"safely: {'; '.join(nodes.unreadable)}")
    identity.check_files(meta, vol, nodes, metas)
    if not nodes.consistent(meta):
        raise ChainMismatch(f"snapshot {meta.id}: its overlay {meta.file} is missing, or "
                            f"does not back onto its image {meta.backing_file}")
    others = [m for m in metas if m.id != meta.id and m.status in HOLDING]
    if any(m.backing_file == meta.backing_file for m in others):
        raise ChainMismatch(f"snapshot {meta.id}: another snapshot records the same image")
    in_chain = str(meta.file) in [layer.path for layer in vol.chain]
    if not in_chain and not _on_a_branch(meta, vol, nodes, metas):
        raise ChainMismatch(f"snapshot {meta.id}: its overlay {meta.file} is not in the live "
                            f"chain of {dom.name}/{vol.target}, nor on a branch a revert left")
    own = await _clone_of(ctx, meta.volume_id)
    merge = drop_of(meta, dom, vol, nodes=nodes, others=others, own=own, in_chain=in_chain)
    if merge is None:
        merge = await _choose(meta, dom, vol, live=live, strategy=strategy, nodes=nodes,
                              others=others, own=own, in_chain=in_chain)
    broken = left_broken(merge, nodes, others)
    if broken:
        raise HasDependents(
            f"snapshot {meta.id}: merging it would leave the overlays of snapshots "
            f"{', '.join(broken)} off their images; delete those first", snapshots=broken)
    if own is not None and merge.remove == own.file:
        raise StrategyUnsupported(f"snapshot {meta.id}: merging it so would remove clone "
                                  f"{own.id}'s own file; commit it instead")
    await _check_clones(ctx, merge, nodes)
    await _check_other_users(ctx, merge, dom, vol)
    await space.check({os.path.dirname(merge_target(merge)): merge.moved_bytes}, ctx.min_free,
                      f"the merge of snapshot {meta.id}")
    return dataclasses.replace(merge, memory_file=meta.memory_file, group_id=meta.group_id,
                               memory_dirs=sorted({os.path.dirname(layer.path)
                                                   for v in dom.volumes for layer in v.chain}))


async def _choose(meta: SnapshotMeta, dom: Domain, vol: Volume, *, live: bool,
                  strategy: Strategy, nodes: tree.Tree, others: list[SnapshotMeta],
                  own: CloneMeta | None, in_chain: bool) -> DeletePlan:
    """The merge for META: linear when S.image backs S.file alone in the
    running chain and no branch hangs off what it removes, else a branch pull."""
    dependents = nodes.dependents(str(meta.backing_file))
    merge: DeletePlan | None = None
    if in_chain and len(dependents) == 1:
        merge = await _linear(meta, dom, vol, live=live, strategy=strategy, others=others)
        if own is not None and merge.remove == own.file and strategy is Strategy.AUTO:
            # A clone's own file stays: its record and every host name it.
            merge = await _linear(meta, dom, vol, live=live, strategy=Strategy.COMMIT,
                                  others=others)
        if left_broken(merge, nodes, others):
            # S.file also backs a branch a revert left: a commit would remove
            # it from under that branch.  Pulling S.image up keeps S.file.
            merge = None
    if merge is None and strategy is Strategy.COMMIT:
        raise HasDependents(f"snapshot {meta.id}: its files also back a branch a revert "
                            "left (or it lies on one); only pull can merge it")
    if merge is None:
        merge = await _branch(meta, dom, vol, live=live, nodes=nodes, dependents=dependents,
                              others=others)
    return merge


async def _clone_of(ctx: Context, volume_id: str) -> CloneMeta | None:
    """The clone that VOLUME_ID is, if it is one."""
    try:
        return await ctx.metadata.get_clone(volume_id)
    except CloneNotFound:
        return None


def merge_target(merge: DeletePlan) -> str:
    """The file MERGE's data goes into (a branch pull's others lie beside it)."""
    return merge.base if merge.method.commits else merge.top


def touched(merge: DeletePlan) -> set[str]:
    """The files MERGE writes into or removes."""
    written = {merge_target(merge)}
    if merge.method is Method.BRANCH_PULL:
        written = {*merge.dependents, *([merge.top] if merge.pull_active else [])}
    elif merge.method is Method.DROP:
        written = set()
    return {*written, *merge.removed}


async def _check_clones(ctx: Context, merge: DeletePlan, nodes: tree.Tree) -> None:
    """Refuse a merge that would write into, or remove, a file a linked
    clone reads (its image, or any file below it): nothing has changed yet."""
    changed = touched(merge)
    # A clone's own file is never this delete's either, whatever a record
    # says: it backs onto one of the volume's snapshot points.
    blocking = [c.id for c in await ctx.metadata.list_clones(volume_id=merge.volume_id)
                if c.file in changed
                or (c.mode is CloneMode.LINKED and c.status is not CloneStatus.ERROR and c.image
                    and changed & ({c.image} | set(nodes.lineage(c.image))))]
    if blocking:
        raise SnapshotHasClones(
            f"snapshot {merge.snapshot_id}: the linked clones {', '.join(blocking)} read the "
            "files this delete would change; flatten or delete them first", clones=blocking)


async def _check_other_users(ctx: Context, merge: DeletePlan, dom: Domain, vol: Volume
                             ) -> None:
    """Refuse a merge that would write into, or remove, a file that another
    disk reads: a child gasnap has no record of (an overlay or clone made by
    hand or by another tool, then attached) needs it as the clone would."""
    users = await identity.other_disks(ctx, dom, vol)
    shared = sorted([path for path in touched(merge) if await images.real_path(path) in users])
    if shared:
        raise SnapshotHasClones(
            f"snapshot {merge.snapshot_id}: {', '.join(shared)} is also in the disk of another "
            "domain or another disk (a child made outside gasnap); detach it first",
            files=shared)


def left_broken(merge: DeletePlan, nodes: tree.Tree, others: list[SnapshotMeta]
                ) -> list[str]:
    """The other snapshots whose overlay backs onto their image now but would
    not once MERGE ran (its relinks applied), or whose image would then read
    through the file MERGE removes: the plan would break them.  The backing
    pointers after the merge are what ``merging`` rewrites, no more."""
    moved = _repointed(merge)
    after = tree.Tree({path: dataclasses.replace(node, backing=moved[path]) if path in moved
                       else node for path, node in nodes.nodes.items()}, [])
    relinks = {r.snapshot_id: r for r in merge.relinks}
    gone = set(merge.removed)
    broken = []
    for other in others:
        if not nodes.consistent(other):
            continue  # already off its image: not this merge's doing
        relink = relinks.get(other.id, Relink(other.id))
        file = relink.file or str(other.file)
        image = relink.backing_file or other.backing_file
        node = after.nodes.get(file)
        if node is None or node.backing != image or gone & set(after.lineage(file)):
            broken.append(other.id)
    return broken


def _repointed(merge: DeletePlan) -> dict[str, str | None]:
    """The files MERGE gives a new backing file, and that file."""
    if merge.method is Method.BRANCH_PULL:
        moved = [*merge.dependents, *([merge.top] if merge.pull_active else [])]
        return dict.fromkeys(moved, merge.pull_base)
    if merge.method in (Method.PULL, Method.OFFLINE_PULL):
        return {merge.top: merge.pull_base}
    return {merge.above: merge.base} if merge.above else {}


def _on_a_branch(meta: SnapshotMeta, vol: Volume, nodes: tree.Tree,
                 metas: list[SnapshotMeta]) -> bool:
    """META's overlay is off the running chain because a revert left it on a
    branch, not because the chain was changed by hand.  A branch a revert
    left ends in a before-revert snapshot's overlay; once that snapshot is
    deleted, the branch is known by its shape: every record of the volume
    agrees with its files, and the branch does not back onto the running
    layer (an active commit by hand leaves the overlay so)."""
    holding = [m for m in metas if m.status in HOLDING]
    left = {path for m in holding if m.origin is Origin.BEFORE_REVERT and m.file
            for path in nodes.lineage(m.file)}
    if str(meta.file) in left:
        return True
    return (all(nodes.consistent(m) for m in holding)
            and vol.active_file not in nodes.lineage(str(meta.file)))


def drop_of(meta: SnapshotMeta, dom: Domain, vol: Volume, *, nodes: tree.Tree,
          others: list[SnapshotMeta], own: CloneMeta | None, in_chain: bool
          ) -> DeletePlan | None:
    """META's overlay is the leaf of a branch a revert left, and nothing
    else holds it: the branch's state past META's image is nobody's.  Its
    image goes as well when META alone holds that (the overlay backs it
    alone, off the running chain, no other record names it); whatever lies
    below the image is another record's.  None if META is not such a leaf."""
    file, image = str(meta.file), str(meta.backing_file)
    chain = [layer.path for layer in vol.chain]

    def held(path: str, dependents: list[str]) -> bool:
        return (path in chain or nodes.dependents(path) != dependents
                or (own is not None and own.file == path)
                or any(path in (m.file, m.backing_file) for m in others))

    if in_chain or held(file, []):
        return None
    return DeletePlan(
        snapshot_id=meta.id, domain=dom.name, target=vol.target, volume_id=meta.volume_id,
        method=Method.DROP, top=file, base=image, remove=file, pull_base=None, above=None,
        base_format=nodes.format_of(image), moved_bytes=0, chain=chain, uuid=dom.uuid,
        after=chain, drop_image=not held(image, [file]),
    )


async def _branch(meta: SnapshotMeta, dom: Domain, vol: Volume, *, live: bool,
                  nodes: tree.Tree, dependents: list[str],
                  others: list[SnapshotMeta]) -> DeletePlan:
    """Pull S.image into every file it backs: the active layer of the chain
    through it by a block job (offline: qemu-img), every other one with
    qemu-img; the files between the active layer and S.image (other
    snapshots' files) leave the running chain but stay, whole."""
    image = str(meta.backing_file)
    node = nodes.nodes[image]
    chain = [layer.path for layer in vol.chain]
    through = image in chain
    rebased = [d for d in dependents if not (through and d == chain[0])]
    keep = chain[0] if through else dependents[0]
    after = [chain[0], *chain[chain.index(image) + 1:]] if through else chain
    formats = {n.path: n.format for n in nodes.nodes.values()}
    if node.backing is not None and node.backing_format is not None:
        formats.setdefault(node.backing, node.backing_format)
    return DeletePlan(
        snapshot_id=meta.id, domain=dom.name, target=vol.target, volume_id=meta.volume_id,
        method=Method.BRANCH_PULL, top=chain[0], base=image, remove=image,
        pull_base=node.backing, above=None, base_format=node.format,
        moved_bytes=await images.allocated(image) * max(1, len(dependents)), chain=chain,
        relinks=[Relink(m.id, file=keep) for m in others if m.file == image],
        uuid=dom.uuid, formats=formats, dependents=rebased, pull_active=through,
        job=through and live, after=after,
    )


async def _linear(meta: SnapshotMeta, dom: Domain, vol: Volume, *, live: bool,
                  strategy: Strategy, others: list[SnapshotMeta]) -> DeletePlan:
    """S.image backs S.file alone, in the chain the domain runs."""
    chain, index = _locate(meta, vol, dom)
    image = str(meta.backing_file)
    base_format = vol.chain[index + 1].format

    def make(method: Method, remove: str, *, pull_base: str | None = None,
             above: str | None = None, moved: int, relinks: list[Relink] | None = None
             ) -> DeletePlan:
        return DeletePlan(
            snapshot_id=meta.id, domain=dom.name, target=vol.target,
            volume_id=meta.volume_id, method=method, top=str(meta.file), base=image,
            remove=remove, pull_base=pull_base, above=above, base_format=base_format,
            moved_bytes=moved, chain=chain, relinks=relinks or [], uuid=dom.uuid,
            formats={layer.path: layer.format for layer in vol.chain},
        )

    if index > 0:  # inner
        if strategy is Strategy.PULL:
            raise StrategyUnsupported(f"snapshot {meta.id} is not the newest of its volume: "
                                      "only commit can merge an inner layer")
        return make(Method.COMMIT if live else Method.OFFLINE_COMMIT, str(meta.file),
                    above=chain[index - 1], moved=await images.allocated(str(meta.file)),
                    relinks=[Relink(m.id, backing_file=image) for m in others
                             if m.backing_file == meta.file])
    top_bytes, base_bytes = await images.allocated(str(meta.file)), await images.allocated(image)
    if strategy is Strategy.AUTO:
        strategy = Strategy.PULL if base_bytes < top_bytes else Strategy.COMMIT
    if strategy is Strategy.COMMIT:
        return make(Method.ACTIVE_COMMIT if live else Method.OFFLINE_COMMIT, str(meta.file),
                    moved=top_bytes)
    return make(Method.PULL if live else Method.OFFLINE_PULL, image,
                pull_base=chain[index + 2] if index + 2 < len(chain) else None,
                moved=base_bytes,
                relinks=[Relink(m.id, file=str(meta.file)) for m in others if m.file == image])
