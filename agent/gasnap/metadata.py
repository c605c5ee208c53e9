"""The metadata service boundary: the contract's calls, whatever serves them.

The agent records every snapshot in two phases: ``create-snapshot-metadata``
(status ``creating``) before it touches a disk, ``finalize-snapshot-metadata``
(``available`` or ``error``) after.  Workflows use the ``MetadataService``
protocol only; the embedded SQLite store (``gasnap.metastore``) is the
default implementation and a remote service can replace it.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from .errors import BadRequest, Conflict, GasnapError, NotFound, Unavailable


class MetadataError(GasnapError):
    code = "metadata"


class SnapshotNotFound(MetadataError, NotFound):
    code = "snapshot_not_found"


class InvalidMarker(MetadataError, BadRequest):
    code = "invalid_marker"


class WrongStatus(MetadataError, Conflict):
    code = "wrong_status"


class CloneNotFound(MetadataError, NotFound):
    code = "clone_not_found"


class SnapshotHasClones(WrongStatus):
    """A linked clone still reads this snapshot's image (or one below it)."""

    code = "snapshot_has_clones"


class MetadataUnavailable(MetadataError, Unavailable):
    """The metadata service (or its database) cannot be reached; the call
    changed nothing."""

    code = "metadata_unavailable"


class Status(enum.Enum):
    CREATING = "creating"
    AVAILABLE = "available"
    ERROR = "error"
    DELETING = "deleting"
    ERROR_DELETING = "error_deleting"


class Consistency(enum.Enum):
    MEMORY = "memory"  # the disks are those of the RAM saved with them
    FILESYSTEM = "filesystem"
    CRASH = "crash"
    UNKNOWN = "unknown"  # a layer adopted (managed): how it was taken is not known


class Origin(enum.Enum):
    """How a record came to be."""

    CREATED = "created"  # a create (API, CLI, schedule, Nova)
    BEFORE_REVERT = "before-revert"  # the state a revert left, kept so it can be undone
    MANAGED = "managed"  # an existing layer adopted


# The description of every snapshot taken for Nova's os-assisted-volume-snapshots.
NOVA_DESCRIPTION = "os-assisted-volume-snapshots"

# Records whose files are still there: a tree's nodes.
HOLDING = frozenset({Status.AVAILABLE, Status.DELETING, Status.ERROR_DELETING})


# Cinder's life cycle; anything else is a 409.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.CREATING: frozenset({Status.AVAILABLE, Status.ERROR}),
    Status.AVAILABLE: frozenset({Status.DELETING}),
    Status.DELETING: frozenset({Status.ERROR_DELETING}),
    Status.ERROR_DELETING: frozenset({Status.DELETING}),
    Status.ERROR: frozenset(),
}
# States from which snapshot-delete-metadata may remove the record.
DELETABLE = frozenset({Status.DELETING, Status.ERROR})


def check_transition(snapshot_id: str, current: Status, new: Status) -> None:
    if new not in TRANSITIONS[current]:
        raise WrongStatus(
            f"snapshot {snapshot_id} is {current.value}; it cannot become {new.value}",
            current=current.value,
        )


@dataclass(frozen=True)
class SnapshotMeta:
    """A snapshot as the metadata service knows it."""

    id: str
    volume_id: str
    name: str
    description: str
    size: int
    created_at: str
    domain: str
    group_id: str | None
    target: str | None
    status: Status
    file: str | None = None
    backing_file: str | None = None
    consistency: Consistency | None = None
    error: str | None = None
    progress: str | None = None
    schedule: str | None = None  # the schedule that took it, if one did
    # The snapshot whose image lies nearest below this one's image (the
    # tree's edge), set when it is made; a delete hands its children on.
    parent: str | None = None
    origin: Origin = Origin.CREATED
    domain_state: str | None = None  # running | paused | shutoff, when taken
    memory_file: str | None = None  # the group's saved RAM and device state, if any

    @property
    def automatic(self) -> bool:
        """Whether gasnap's own automation (auto-delete) may merge it away:
        a snapshot gasnap made for its own callers.  Not one Nova asked for
        (Cinder keeps its record and deletes it), nor an adopted layer
        (someone else made it, and may depend on it)."""
        return self.origin is not Origin.MANAGED and self.description != NOVA_DESCRIPTION

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["status"] = self.status.value
        doc["consistency"] = self.consistency.value if self.consistency else None
        doc["origin"] = self.origin.value
        return doc


@dataclass(frozen=True)
class NewSnapshot:
    """The body of create-snapshot-metadata."""

    snapshot_id: str
    volume_id: str
    name: str
    description: str
    size: int
    created_at: str
    domain: str
    group_id: str | None = None
    target: str | None = None
    schedule: str | None = None
    parent: str | None = None
    origin: Origin = Origin.CREATED
    domain_state: str | None = None
    memory_file: str | None = None


@dataclass(frozen=True)
class Finalization:
    """The body of finalize-snapshot-metadata."""

    status: Status
    file: str | None
    backing_file: str | None
    consistency: Consistency | None
    error: str | None = None


# --- clones -------------------------------------------------------------------


class CloneStatus(enum.Enum):
    CREATING = "creating"
    AVAILABLE = "available"
    ERROR = "error"
    DELETING = "deleting"


class CloneMode(enum.Enum):
    LINKED = "linked"  # a qcow2 backed by the snapshot's image
    FULL = "full"  # an independent copy


# A clone's life cycle: a delete that changed nothing goes back to available.
CLONE_TRANSITIONS: dict[CloneStatus, frozenset[CloneStatus]] = {
    CloneStatus.CREATING: frozenset({CloneStatus.AVAILABLE, CloneStatus.ERROR}),
    CloneStatus.AVAILABLE: frozenset({CloneStatus.DELETING}),
    CloneStatus.DELETING: frozenset({CloneStatus.AVAILABLE, CloneStatus.ERROR}),
    CloneStatus.ERROR: frozenset({CloneStatus.DELETING}),
}
CLONE_DELETABLE = frozenset({CloneStatus.DELETING, CloneStatus.ERROR})


def check_clone_transition(clone_id: str, current: CloneStatus, new: CloneStatus) -> None:
    if new not in CLONE_TRANSITIONS[current]:
        raise WrongStatus(f"clone {clone_id} is {current.value}; it cannot become {new.value}",
                          current=current.value)


@dataclass(frozen=True)
class Attachment:
    """Where a clone is attached: the domain's disk TARGET (``<serial>`` is
    the clone's id)."""

    domain: str
    target: str
    readonly: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CloneMeta:
    """A volume made from a snapshot, as the metadata service knows it."""

    id: str
    name: str
    source_snapshot: str
    source_volume_id: str
    mode: CloneMode
    file: str  # volume-<id>, next to the source volume's files
    image: str | None  # linked: the file it backs onto (the snapshot's image)
    size: int
    status: CloneStatus
    created_at: str
    attached_to: Attachment | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["mode"] = self.mode.value
        doc["status"] = self.status.value
        doc["attached_to"] = self.attached_to.to_dict() if self.attached_to else None
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> CloneMeta:
        attached = doc.get("attached_to")
        return cls(
            id=doc["id"], name=doc["name"], source_snapshot=doc["source_snapshot"],
            source_volume_id=doc["source_volume_id"], mode=CloneMode(doc["mode"]),
            file=doc["file"], image=doc.get("image"), size=doc["size"],
            status=CloneStatus(doc["status"]), created_at=doc["created_at"],
            attached_to=Attachment(str(attached["domain"]), str(attached["target"]),
                                   bool(attached["readonly"])) if attached else None,
            error=doc.get("error"),
        )


@dataclass(frozen=True)
class NewClone:
    """The body of create-clone-metadata (the source volume is the snapshot's)."""

    clone_id: str
    source_snapshot: str
    name: str
    mode: CloneMode
    file: str
    image: str | None
    size: int
    created_at: str


@dataclass(frozen=True)
class CloneChange:
    """The body of update-clone-metadata: None leaves a field as it is;
    ``detach`` clears ``attached_to``."""

    status: CloneStatus | None = None
    mode: CloneMode | None = None
    attached_to: Attachment | None = None
    detach: bool = False
    error: str | None = None


# --- volume limits ---------------------------------------------------------------

# gluster's names; the agent's [limits] gives the default of each
LIMIT_FIELDS = ("max_snapshots", "soft_limit_percent", "auto_delete", "max_chain_depth")
_LIMIT_RANGES = {"max_snapshots": (1, 65535), "soft_limit_percent": (1, 100),
                 "max_chain_depth": (2, 1024)}


class InvalidLimits(MetadataError, BadRequest):
    code = "invalid_limits"


@dataclass(frozen=True)
class VolumeLimits:
    """A volume's own limits, stored with its records so every host sees
    them; None: the agent's default."""

    max_snapshots: int | None = None
    soft_limit_percent: int | None = None
    auto_delete: bool | None = None
    max_chain_depth: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def changed(self, change: dict[str, Any]) -> VolumeLimits:
        """These limits with CHANGE (checked by ``check_limits``) applied."""
        return VolumeLimits(**{**self.to_dict(), **change})


@dataclass(frozen=True)
class Limits:
    """The limits in force on a volume: its own, else the agent's defaults."""

    max_snapshots: int = 256
    soft_limit_percent: int = 90
    auto_delete: bool = False
    max_chain_depth: int = 64  # files in the chain, the active one included

    def under(self, own: VolumeLimits) -> Limits:
        """These defaults with the volume's OWN limits over them."""
        return Limits(**{**asdict(self),
                         **{k: v for k, v in own.to_dict().items() if v is not None}})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def soft_snapshots(self) -> int:
        return max(1, self.max_snapshots * self.soft_limit_percent // 100)

    @property
    def soft_depth(self) -> int:
        # a chain holds at least the active file and the image below it
        return max(2, self.max_chain_depth * self.soft_limit_percent // 100)


def check_limits(doc: dict[str, Any]) -> dict[str, Any]:
    """DOC as a change of limits: the fields it names, each a value in its
    range or null (back to the default)."""
    unknown = set(doc) - set(LIMIT_FIELDS)
    if unknown:
        raise InvalidLimits(f"unknown limits: {sorted(unknown)}; known: {list(LIMIT_FIELDS)}")
    for key, value in doc.items():
        if value is None:
            continue
        if key == "auto_delete":
            if not isinstance(value, bool):
                raise InvalidLimits("auto_delete must be true, false or null")
            continue
        low, high = _LIMIT_RANGES[key]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise InvalidLimits(f"{key} must be an integer from {low} to {high}, or null")
    return dict(doc)


class MetadataService(Protocol):
    async def create_snapshot_metadata(self, new: NewSnapshot) -> SnapshotMeta: ...

    async def finalize_snapshot_metadata(
        self, snapshot_id: str, final: Finalization
    ) -> SnapshotMeta: ...

    async def update_snapshot_status(
        self, snapshot_id: str, status: Status, progress: str
    ) -> SnapshotMeta: ...

    async def update_snapshot_metadata(
        self, snapshot_id: str, name: str | None, description: str | None
    ) -> SnapshotMeta: ...

    async def update_snapshot_files(
        self, snapshot_id: str, file: str | None, backing_file: str | None
    ) -> SnapshotMeta:
        """A merge moved this snapshot's overlay or data to another file."""

    async def snapshot_delete_metadata(self, snapshot_id: str) -> None: ...

    async def get_snapshot(self, snapshot_id: str) -> SnapshotMeta: ...

    async def list_snapshots(
        self, volume_id: str | None = None, status: Status | None = None, *,
        domain: str | None = None, limit: int | None = None, marker: str | None = None,
        parent: str | None = None, roots: bool = False, group_id: str | None = None,
    ) -> list[SnapshotMeta]:
        """Oldest first (a group in the order it was made); with LIMIT, at most
        that many; with MARKER (a snapshot id), only those after it; PARENT:
        its children only; ROOTS: those without a parent only."""

    # clones: a linked clone's record keeps its source snapshot from being
    # marked deleting (snapshot_has_clones), on every host of the service

    async def create_clone_metadata(self, new: NewClone) -> CloneMeta:
        """Status creating; the source snapshot must be available."""

    async def finalize_clone_metadata(self, clone_id: str, status: CloneStatus,
                                      error: str | None = None) -> CloneMeta: ...

    async def update_clone_metadata(self, clone_id: str, change: CloneChange) -> CloneMeta: ...

    async def clone_delete_metadata(self, clone_id: str) -> None: ...

    async def get_clone(self, clone_id: str) -> CloneMeta: ...

    async def list_clones(self, snapshot_id: str | None = None,
                          volume_id: str | None = None) -> list[CloneMeta]:
        """Oldest first; SNAPSHOT_ID: clones of that snapshot; VOLUME_ID:
        clones of that volume's snapshots."""

    # limits: stored per volume, read by every host that snapshots it

    async def get_volume_limits(self, volume_id: str) -> VolumeLimits:
        """The volume's own limits (all None when it has none)."""

    async def update_volume_limits(self, volume_id: str,
                                   change: dict[str, Any]) -> VolumeLimits:
        """Apply CHANGE (``check_limits``): a field named is set, null
        clears it; a field not named stays."""

    async def close(self) -> None: ...
