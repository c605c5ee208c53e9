"""Planning a create: the request checked, then read against the live domains.

Nothing here changes a disk or a record.  Every caller (the API, the CLI
through it, schedules, Nova's create_info) builds a ``CreateRequest``, and
``check_request`` is the one place that says what a request must be;
``plan`` then names every volume's image, format, size and overlay, taken
from the domain XML (formats never guessed), and the domains' UUIDs, by
which the execution holds them.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import images
from ..errors import BadRequest, Conflict, GasnapError, NotFound
from ..guestagent import AgentAbsent, AgentUnresponsive
from ..hypervisor import AgentState, Domain, DomainState, Feature, Volume, require
from ..metadata import NOVA_DESCRIPTION, Origin
from ..quiesce import Quiesce
from . import Context, limits, space

MAX_NAME = 255
MAX_DESCRIPTION = 4096


class VolumeNotFound(NotFound):
    code = "volume_not_found"


class UnsupportedDisk(BadRequest):
    code = "unsupported_disk"


class DomainStateConflict(Conflict):
    code = "domain_state"


@dataclass(frozen=True)
class Preset:
    """A snapshot whose id and overlay the caller chose (Nova's create_info)."""

    snapshot_id: str
    overlay: str  # absolute path, checked to lie next to the active file ("": gasnap's name)
    reuse: bool  # the caller made the overlay (checked: qcow2 on the active file)


@dataclass(frozen=True)
class CreateRequest:
    domains: list[str]
    disks: dict[str, list[str]]  # domain -> targets; a domain not listed: all its disks
    name: str
    description: str
    quiesce: Quiesce
    presets: dict[str, Preset] = field(default_factory=dict)  # by volume_id
    schedule: str | None = None  # the schedule taking it (recorded for retention)
    origin: Origin = Origin.CREATED
    memory: bool = False  # live domains: their RAM and device state too
    # paused ones too: QEMU saves a paused guest once, then refuses to save
    # it again until it has run ("paused due to previous migration"), so a
    # revert's before-revert snapshot keeps a paused guest's disks only
    memory_of_paused: bool = True
    # with the volume's auto_delete, merge its oldest snapshots away after;
    # not on Nova's path, where Cinder owns the snapshots
    auto_delete: bool = True
    # a volume with snapshots Cinder keeps is snapshotted all the same (its
    # active file changes behind Cinder's back)
    force: bool = False


@dataclass(frozen=True)
class VolumePlan:
    snapshot_id: str
    domain: str
    volume_id: str
    target: str
    image: str  # the active file now: the snapshot's point-in-time data
    format: str
    overlay: str  # <image basename>.<snapshot id>, next to the image
    size: int
    reuse: bool = False  # the overlay is the caller's: never created nor removed by us
    # the chain below ``image``, nearest first: the parent is the snapshot
    # whose image is the first of these (found as the record is made)
    below: list[str] = field(default_factory=list)
    domain_state: str | None = None  # the domain's state when planned


@dataclass(frozen=True)
class CreatePlan:
    group_id: str | None
    name: str
    description: str
    quiesce: Quiesce
    created_at: str
    volumes: list[VolumePlan]
    live: list[str]  # running or paused: switched by libvirt
    running: list[str]  # the live ones whose guests can be frozen
    stopped: list[str]  # switched offline in the persistent definition
    schedule: str | None = None
    # by domain: the disks not snapshotted, named to libvirt as such (without
    # a read of the definition inside the freeze window)
    left_alone: dict[str, list[str]] = field(default_factory=dict)
    # by domain: its UUID when planned; the window's calls hold the domains by
    # it (``Hypervisor.hold``) rather than resolve each name again
    uuids: dict[str, str] = field(default_factory=dict)
    origin: Origin = Origin.CREATED
    memory: dict[str, str] = field(default_factory=dict)  # live domain -> its memory file
    warnings: list[str] = field(default_factory=list)  # for the task's result
    force: bool = False  # see CreateRequest.force

    @property
    def cinder_ok(self) -> bool:
        """Whether it may change the active file of a volume Cinder keeps
        snapshots of: Nova's own creates (Cinder asked), or forced."""
        return self.force or self.description == NOVA_DESCRIPTION

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["quiesce"] = self.quiesce.value
        doc["origin"] = self.origin.value
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> CreatePlan:
        return cls(
            group_id=doc["group_id"], name=doc["name"], description=doc["description"],
            quiesce=Quiesce(doc["quiesce"]), created_at=doc["created_at"],
            volumes=[VolumePlan(**v) for v in doc["volumes"]], live=list(doc["live"]),
            running=list(doc["running"]), stopped=list(doc["stopped"]),
            schedule=doc.get("schedule"), left_alone=dict(doc.get("left_alone", {})),
            uuids=dict(doc.get("uuids", {})),
            origin=Origin(doc.get("origin", Origin.CREATED.value)),
            memory=dict(doc.get("memory", {})), warnings=list(doc.get("warnings", [])),
            force=bool(doc.get("force", False)),
        )

    def of(self, domain: str) -> list[VolumePlan]:
        return [v for v in self.volumes if v.domain == domain]

    def directories(self) -> list[str]:
        """Where the create writes: its overlays' and memory files' directories."""
        paths = [v.overlay for v in self.volumes] + list(self.memory.values())
        return list(dict.fromkeys(os.path.dirname(p) for p in paths))


# --- the request: parsed and checked here, and nowhere else -------------------

REQUEST_FIELDS = frozenset({"domains", "disks", "name", "description", "quiesce", "memory",
                            "force"})


def _string_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise BadRequest(f"{what} must be a list of names", code="invalid_request")
    return value


def _optional_string(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{key} must be a string", code="invalid_request")
    return value


def request_from_doc(doc: dict[str, Any]) -> CreateRequest:
    """The API's create request body as a checked ``CreateRequest``."""
    unknown = set(doc) - REQUEST_FIELDS
    if unknown:
        raise BadRequest(f"unknown fields: {sorted(unknown)}", code="invalid_request")
    domains = _string_list(doc.get("domains"), "domains")
    disks_doc = doc.get("disks") or {}
    if not isinstance(disks_doc, dict):
        raise BadRequest("disks must map domain names to lists of targets",
                         code="invalid_request")
    disks = {str(k): _string_list(v, f"disks.{k}") for k, v in disks_doc.items()}
    try:
        quiesce = Quiesce(_optional_string(doc, "quiesce") or Quiesce.PREFERRED.value)
    except ValueError as err:
        raise BadRequest("quiesce must be required, preferred or off",
                         code="invalid_request") from err
    memory, force = doc.get("memory", False), doc.get("force", False)
    if not isinstance(memory, bool) or not isinstance(force, bool):
        raise BadRequest("memory and force must be true or false", code="invalid_request")
    request = CreateRequest(
        domains=domains, disks=disks, name=_optional_string(doc, "name") or default_name(),
        description=_optional_string(doc, "description") or "", quiesce=quiesce,
        memory=memory, force=force,
    )
    check_caller_description(request.description)
    check_request(request)
    return request


def default_name() -> str:
    return "gasnap-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def check_request(req: CreateRequest) -> None:
    """What a request must be, whoever built it (API, CLI, schedule, Nova)."""
    if not req.domains:
        raise BadRequest("no domain given", code="invalid_request")
    if len(set(req.domains)) != len(req.domains):
        raise BadRequest("a domain is named twice", code="invalid_request")
    unknown = set(req.disks) - set(req.domains)
    if unknown:
        raise BadRequest(f"disks given for domains not in the request: {sorted(unknown)}",
                         code="invalid_request")
    check_name(req.name)
    check_description(req.description)


def check_description(description: str) -> None:
    if len(description) > MAX_DESCRIPTION:
        raise BadRequest("description is too long", code="invalid_description")


def check_caller_description(description: str) -> None:
    """What a caller of gasnap's own API may write: Nova's description is
    Nova's path's alone (it marks the snapshots Cinder keeps)."""
    check_description(description)
    if description == NOVA_DESCRIPTION:
        raise BadRequest(f"the description {NOVA_DESCRIPTION!r} is kept for snapshots Nova "
                         "takes", code="invalid_description")


def check_name(name: str) -> None:
    if len(name) > MAX_NAME:
        raise BadRequest(f"name is longer than {MAX_NAME} characters", code="invalid_name")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise BadRequest("name contains control characters", code="invalid_name")



def _check_volume(domain: str, vol: Volume) -> None:
    if vol.source_type != "file":
        raise UnsupportedDisk(
            f"{domain}/{vol.target} is a {vol.source_type} disk; gasnap snapshots file-backed "
            "disks only"
        )
    if vol.shareable or vol.readonly:
        kind = "shareable" if vol.shareable else "read-only"
        raise UnsupportedDisk(f"{domain}/{vol.target} is {kind}; gasnap snapshots disks "
                              "that one domain writes")
    if vol.chain_error is not None:
        raise UnsupportedDisk(f"{domain}/{vol.target}: its chain cannot be read safely: "
                              f"{vol.chain_error}")
    if vol.format not in images.FORMATS:
        raise UnsupportedDisk(
            f"{domain}/{vol.target} is {vol.format or 'of unknown format'}; gasnap snapshots "
            "qcow2 and raw disks only"
        )


def check_unique_id(ctx: Context, domain: str, vol: Volume) -> None:
    """With records shared by a fleet, a disk without a serial has a volume
    id (``domain/target``) that a domain of the same name on another host
    has too: its records would mix with that one's.  Refused, with the fix."""
    if ctx.shared_records and vol.serial is None:
        raise UnsupportedDisk(
            f"{domain}/{vol.target} has no <serial>: its volume id {vol.volume_id} is not "
            "unique among the hosts sharing the metadata service; give the disk a <serial> "
            "(Nova gives every Cinder volume its id)")


def _selected(dom: Domain, targets: list[str] | None) -> list[Volume]:
    if targets is None:
        # A read-only disk (a clone attached to read from) cannot change:
        # "every disk" means every disk the guest writes.
        return [vol for vol in dom.volumes if not vol.readonly]
    chosen = []
    for target in dict.fromkeys(targets):
        vol = dom.volume(target)
        if vol is None:
            raise VolumeNotFound(f"domain {dom.name} has no disk {target}")
        chosen.append(vol)
    return chosen


def _check_quiesce(dom: Domain, quiesce: Quiesce) -> None:
    if quiesce is not Quiesce.REQUIRED:
        return
    if dom.state is DomainState.PAUSED:
        raise DomainStateConflict(f"{dom.name} is paused and cannot be quiesced "
                                  "(quiesce=required)")
    if dom.state is DomainState.RUNNING and dom.guest_agent is not AgentState.CONNECTED:
        error = AgentAbsent if dom.guest_agent is AgentState.ABSENT else AgentUnresponsive
        raise error(f"{dom.name}: guest agent {dom.guest_agent.value}; quiesce=required "
                    "cannot be met")


# --- the plan: read from the live domains, nothing changed -------------------


async def plan(ctx: Context, req: CreateRequest) -> CreatePlan:
    """REQ checked against the domains as they are now."""
    check_request(req)
    if req.memory:
        require(ctx.hv, Feature.MEMORY)
    volumes: list[VolumePlan] = []
    live: list[str] = []
    running: list[str] = []
    stopped: list[str] = []
    left_alone: dict[str, list[str]] = {}
    uuids: dict[str, str] = {}
    ram: dict[str, int] = {}
    # Only quiesce=required needs the guest agent's answer before anything is
    # touched; otherwise the freeze itself finds out (one ping less).
    probe = req.quiesce is Quiesce.REQUIRED
    for dom in await asyncio.gather(*(ctx.hv.get_domain(n, probe_agent=probe)
                                      for n in req.domains)):
        if dom.state is DomainState.RUNNING:
            live.append(dom.name)
            running.append(dom.name)
        elif dom.state is DomainState.PAUSED:
            live.append(dom.name)
        elif dom.state is DomainState.SHUTOFF:
            require(ctx.hv, Feature.OFFLINE)
            stopped.append(dom.name)
        else:
            raise DomainStateConflict(f"{dom.name} is {dom.state.value}; gasnap snapshots "
                                      "running, paused and stopped domains")
        _check_quiesce(dom, req.quiesce)
        uuids[dom.name] = dom.uuid
        ram[dom.name] = dom.memory
        chosen = _selected(dom, req.disks.get(dom.name))
        if not chosen:
            raise BadRequest(f"{dom.name} has no disk to snapshot", code="invalid_request")
        taken = {v.target for v in chosen}
        left_alone[dom.name] = [v.target for v in dom.volumes if v.target not in taken]
        for vol in chosen:
            _check_volume(dom.name, vol)
            check_unique_id(ctx, dom.name, vol)
            try:
                size = await images.virtual_size(vol.active_file, vol.format)
            except (OSError, GasnapError) as err:
                raise UnsupportedDisk(f"{dom.name}/{vol.target}: cannot read "
                                      f"{vol.active_file}: {err}") from err
            preset = req.presets.get(vol.volume_id)
            snapshot_id = preset.snapshot_id if preset else str(uuid.uuid4())
            overlay = ((preset.overlay if preset else "")
                       or images.overlay_path(vol.active_file, vol.volume_id, snapshot_id))
            volumes.append(VolumePlan(
                snapshot_id, dom.name, vol.volume_id, vol.target, vol.active_file, vol.format,
                overlay, size, reuse=preset.reuse if preset else False,
                below=[layer.path for layer in vol.chain[1:]], domain_state=dom.state.value,
            ))
    group_id = str(uuid.uuid4()) if len(volumes) > 1 or req.memory else None
    memory, warnings = _memory_files(req, volumes, live=live, running=running,
                                     stopped=stopped,
                                     left_alone=left_alone, uuids=uuids, group_id=group_id)
    await limits.refuse_early(ctx, volumes,
                              cinder_ok=req.force or req.description == NOVA_DESCRIPTION)
    await space.check(_needs(volumes, memory, ram), ctx.min_free, "the snapshot")
    return CreatePlan(
        group_id=group_id,
        name=req.name, description=req.description, quiesce=req.quiesce,
        created_at=datetime.now(UTC).isoformat(timespec="microseconds"),
        volumes=volumes, live=live, running=running, stopped=stopped, schedule=req.schedule,
        left_alone=left_alone, uuids=uuids, origin=req.origin, memory=memory,
        warnings=warnings, force=req.force,
    )


def _needs(volumes: list[VolumePlan], memory: dict[str, str], ram: dict[str, int]
           ) -> dict[str, int]:
    """Bytes per directory: each new overlay's metadata, each memory file."""
    needs: dict[str, int] = {}
    for v in volumes:
        if not v.reuse:  # Nova made the overlay already
            where = os.path.dirname(v.overlay)
            needs[where] = needs.get(where, 0) + space.overlay_bytes(v.size)
    for name, path in memory.items():
        where = os.path.dirname(path)
        needs[where] = needs.get(where, 0) + space.memory_bytes(ram[name])
    return needs


def _memory_files(req: CreateRequest, volumes: list[VolumePlan], *, live: list[str],
                  running: list[str],
                  stopped: list[str], left_alone: dict[str, list[str]],
                  uuids: dict[str, str], group_id: str | None
                  ) -> tuple[dict[str, str], list[str]]:
    """Each live domain's memory file, next to its first disk and named
    from the group; a stopped domain has no RAM to save (a warning, as
    Kimchi does).  A disk left out would run on past the saved RAM."""
    if not req.memory:
        return {}, []
    memory = {}
    for name in live:
        if name not in running and not req.memory_of_paused:
            continue
        if left_alone.get(name):
            raise BadRequest(f"a memory snapshot of {name} takes every disk of it, not only "
                             "some", code="invalid_request")
        first = next(v for v in volumes if v.domain == name)
        memory[name] = str(Path(first.image).with_name(
            f"gasnap-memory-{group_id}.{uuids[name]}"))
    return memory, [f"{name} is shut off: its snapshot holds its disks only"
                    for name in stopped]


async def check_exclusive(ctx: Context, planned: CreatePlan) -> None:
    """No planned disk is a disk of another domain too (a multi-attached
    volume without ``<shareable/>``): its snapshot would switch one domain
    while the other kept writing into the point-in-time image."""
    others = await ctx.hv.files_in_use(besides=frozenset(planned.uuids.values()))
    for v in planned.volumes:
        if await images.real_path(v.image) in others:
            raise UnsupportedDisk(f"{v.domain}/{v.target}: {v.image} is a disk of another "
                                  "domain too; gasnap snapshots disks that one domain writes")
