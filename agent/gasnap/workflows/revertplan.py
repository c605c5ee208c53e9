"""Planning a revert: which volumes go back, onto which images, and how.

Nothing here changes a disk, a domain or a record.  ``scope=group`` (the
default) takes every snapshot of the group, so every volume of every domain
captured in that instant goes back to it; ``scope=volume`` takes the one.
Each snapshot's image and its format come from the tree of its volume (the
format recorded in the header of the overlay gasnap wrote on it, never
guessed), and its chain must read safely down to the bottom.  A running
domain is refused unless forced; the before-revert snapshots are planned
(and so checked) here too, so a request that cannot keep the state it
leaves fails before anything happens.
"""

from __future__ import annotations

import asyncio
import enum
import os
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import images
from ..errors import Conflict, GasnapError
from ..hypervisor import AgentState, Domain, DomainState, Feature, Volume, require
from ..metadata import Origin, SnapshotMeta, Status, WrongStatus
from ..quiesce import Quiesce
from . import Context, createplan, identity, limits, space, tree

LIVE = (DomainState.RUNNING, DomainState.PAUSED)


class Scope(enum.Enum):
    GROUP = "group"
    VOLUME = "volume"


class DomainRunning(Conflict):
    code = "domain_running"


@dataclass(frozen=True)
class RevertVolume:
    snapshot_id: str  # the snapshot gone back to
    domain: str
    volume_id: str
    target: str
    image: str  # the snapshot's image: the backing of the new active layer
    image_format: str
    overlay: str  # the new active layer, made fresh
    size: int
    before_id: str  # the snapshot that keeps the state this volume leaves


@dataclass(frozen=True)
class RevertPlan:
    snapshot_id: str
    volumes: list[RevertVolume]
    uuids: dict[str, str]  # domain name -> its UUID when planned
    stop: list[str]  # live domains, shut down before the switch
    start: list[str]  # domains started again afterwards
    agents: list[str] = field(default_factory=list)  # started ones whose agent is awaited
    # domains restored from the group's saved RAM instead of booted, and
    # those of them saved paused (restored paused)
    memory: dict[str, str] = field(default_factory=dict)
    paused: list[str] = field(default_factory=list)
    snapshot_name: str = ""  # names the before-revert snapshots
    # every disk of the domains: a revert takes each whole domain down and
    # up again, so nothing may merge offline on another disk meanwhile
    held: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> RevertPlan:
        return cls(doc["snapshot_id"], [RevertVolume(**v) for v in doc["volumes"]],
                   dict(doc["uuids"]), list(doc["stop"]), list(doc["start"]),
                   list(doc.get("agents", [])), dict(doc.get("memory", {})),
                   list(doc.get("paused", [])), doc.get("snapshot_name", ""),
                   list(doc.get("held", [])))

    @property
    def holds(self) -> frozenset[str]:
        """The volumes the revert keeps to itself while it runs."""
        return frozenset([*self.held, *(v.volume_id for v in self.volumes)])

    @property
    def domains(self) -> list[str]:
        return list(dict.fromkeys(v.domain for v in self.volumes))

    def directories(self) -> list[str]:
        """Where the revert writes: its new overlays' directories."""
        return list(dict.fromkeys(os.path.dirname(v.overlay) for v in self.volumes))

    def of(self, domain: str) -> list[RevertVolume]:
        return [v for v in self.volumes if v.domain == domain]

    def before_request(self) -> createplan.CreateRequest:
        """The create that keeps, first, the state every volume leaves."""
        disks: dict[str, list[str]] = {}
        for v in self.volumes:
            disks.setdefault(v.domain, []).append(v.target)
        return createplan.CreateRequest(
            domains=self.domains, disks=disks, name=f"before-revert to {self.snapshot_name}"[:255],
            description=f"the state left by a revert to snapshot {self.snapshot_id}",
            quiesce=Quiesce.PREFERRED, origin=Origin.BEFORE_REVERT,
            memory=bool(self.memory), memory_of_paused=False,
            presets={v.volume_id: createplan.Preset(v.before_id, "", reuse=False)
                     for v in self.volumes},
            force=True)  # the revert itself was allowed (see ``plan``)


async def plan(ctx: Context, snapshot_id: str, scope: Scope, *, force: bool,
               start: bool | None) -> RevertPlan:
    require(ctx.hv, Feature.OFFLINE)  # a revert stops, redefines and starts domains
    meta = await ctx.metadata.get_snapshot(snapshot_id)
    targets = await _targets(ctx, meta, scope)
    domains = {name: await ctx.hv.get_domain(name)
               for name in dict.fromkeys(t.domain for t in targets)}
    for dom in domains.values():
        _check_state(dom, force)
    volumes = [await _volume(ctx, t, domains[t.domain], force) for t in targets]
    live = [d.name for d in domains.values() if d.state in LIVE]
    memory = await _memory(targets, domains, scope) if start is not False else {}
    if start is None:
        restart = list(dict.fromkeys(
            [*memory, *(d.name for d in domains.values() if d.state is DomainState.RUNNING)]))
    else:
        restart = list(domains) if start else []
    # The guests that had an agent answering are awaited after the start, so
    # that a finished revert means a guest that is back.
    agents = [d.name for d in domains.values()
              if d.name in restart and d.guest_agent is AgentState.CONNECTED]
    planned = RevertPlan(meta.id, volumes, {d.name: d.uuid for d in domains.values()},
                         live, restart, agents, memory,
                         [t.domain for t in targets
                          if t.domain in memory and t.domain_state == "paused"], meta.name,
                         sorted({v.volume_id for d in domains.values() for v in d.volumes}))
    needs: dict[str, int] = {}
    for v in volumes:
        where = os.path.dirname(v.overlay)
        needs[where] = needs.get(where, 0) + space.overlay_bytes(v.size)
    await space.check(needs, ctx.min_free, "the revert's new overlays")
    # The before-revert snapshots must be possible, or nothing is done.
    await createplan.plan(ctx, planned.before_request())
    return planned


async def _memory(targets: list[SnapshotMeta], domains: dict[str, Domain],
                  scope: Scope) -> dict[str, str]:
    """The domains to restore from the group's saved RAM: each whose every
    disk goes back with it (a group revert) and whose memory file is whole."""
    memory: dict[str, str] = {}
    for name, dom in domains.items():
        files = {t.memory_file for t in targets if t.domain == name}
        whole = {t.volume_id for t in targets if t.domain == name} == {
            v.volume_id for v in dom.volumes}
        if scope is Scope.GROUP and whole and len(files) == 1 and None not in files:
            path = str(files.pop())
            mine = [t for t in targets if t.domain == name]
            if not images.memory_name_ok(
                    path, [os.path.dirname(str(t.backing_file)) for t in mine if t.backing_file],
                    mine[0].group_id, dom.uuid):
                raise images.MemoryUnusable(f"{path} is not a memory file gasnap named beside "
                                            f"the images of {name}'s snapshots")
            await asyncio.to_thread(images.check_memory, path)  # 409 memory_unusable
            memory[name] = path
    return memory


async def _targets(ctx: Context, meta: SnapshotMeta, scope: Scope) -> list[SnapshotMeta]:
    targets = [meta]
    if scope is Scope.GROUP and meta.group_id is not None:
        targets = await ctx.metadata.list_snapshots(group_id=meta.group_id)
    for target in targets:
        if target.status is not Status.AVAILABLE:
            raise WrongStatus(f"snapshot {target.id} is {target.status.value}; only available "
                              "snapshots can be reverted to")
    return targets


def _check_state(dom: Domain, force: bool) -> None:
    if dom.state in LIVE and not force:
        raise DomainRunning(f"{dom.name} is {dom.state.value}; shut it down first, or revert "
                            "with force (gasnap then shuts it down and starts it again)")
    if dom.state not in (*LIVE, DomainState.SHUTOFF):
        raise Conflict(f"{dom.name} is {dom.state.value}", code="domain_state")


async def _volume(ctx: Context, meta: SnapshotMeta, dom: Domain, force: bool
                  ) -> RevertVolume:
    vol = identity.volume_of(meta, dom)
    if vol.chain_error is not None or vol.shareable or vol.readonly:
        raise createplan.UnsupportedDisk(f"{dom.name}/{vol.target} cannot be reverted safely: "
                                         f"{vol.chain_error or 'shareable or read-only'}")
    image = str(meta.backing_file)
    fmt = await _image_format(ctx, meta, vol, force)
    try:
        await images.read_chain(image, fmt, os.path.dirname(vol.active_file))
        size = await images.virtual_size(image, fmt)
    except (OSError, GasnapError) as err:
        raise tree.TreeMismatch(f"snapshot {meta.id}: its image {image} cannot be read "
                                f"safely: {err}") from err
    revert_id = str(uuid.uuid4())
    return RevertVolume(meta.id, dom.name, vol.volume_id, vol.target, image, fmt,
                        images.overlay_path(vol.active_file, vol.volume_id, revert_id), size,
                        before_id=str(uuid.uuid4()))


async def _image_format(ctx: Context, meta: SnapshotMeta, vol: Volume, force: bool) -> str:
    metas = await ctx.metadata.list_snapshots(volume_id=meta.volume_id)
    if not force:  # forced: the operator takes Cinder's view in hand
        limits.refuse_cinder_volume(meta.volume_id, metas)
    nodes = await tree.read(vol, metas)
    identity.check_files(meta, vol, nodes, metas)
    if not nodes.consistent(meta):
        raise tree.TreeMismatch(f"snapshot {meta.id}: its overlay {meta.file} is missing, or "
                                f"does not back onto its image {meta.backing_file}")
    return nodes.format_of(str(meta.backing_file))
