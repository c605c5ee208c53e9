"""The journal's vocabulary, shared by the workflows that write it and the
recovery that reads it back: operation kinds and each kind's steps.

Values are the strings stored in ``journal.db``; they never change, so a
journal written by an older agent reads back the same.
"""

from __future__ import annotations

import enum


class Kind(enum.StrEnum):
    CREATE = "create"
    DELETE = "delete"
    REVERT = "revert"
    CLONE = "clone"


class CreateStep(enum.StrEnum):
    """Each written before the action it names (see ``create``)."""

    PLANNED = "planned"
    RECORDING = "recording"
    OVERLAYS = "overlays"
    FREEZING = "freezing"
    THAWED = "thawed"
    OFFLINE = "offline"
    FINALIZING = "finalizing"


class DeleteStep(enum.StrEnum):
    """Each written before the action it names (see ``delete``)."""

    PLANNED = "planned"
    DELETING = "deleting"
    JOB = "job"
    PIVOT = "pivot"
    CLEANUP = "cleanup"


class RevertStep(enum.StrEnum):
    """Each written before the action it names (see ``revert``)."""

    PLANNED = "planned"
    BEFORE = "before"  # the before-revert snapshots (a create of its own)
    STOPPING = "stopping"
    OVERLAYS = "overlays"
    SWITCHING = "switching"
    STARTING = "starting"


class CloneStep(enum.StrEnum):
    """Each written before the action it names (see ``clone``)."""

    RECORDING = "recording"  # create: the record, status creating
    MAKING = "making"  # create: the file, made aside and renamed whole
    ATTACHING = "attaching"
    DETACHING = "detaching"
    FLATTENING = "flattening"
    DELETING = "deleting"
    FINALIZING = "finalizing"


# Steps after which a create's recorded consistency is proven: the switch
# returned while the guests were frozen.  Cut short at FREEZING, a switch
# libvirt finished after the guard thawed would be no frozen image.
CONSISTENCY_PROVEN = frozenset({CreateStep.THAWED, CreateStep.OFFLINE, CreateStep.FINALIZING})
# A delete cut short at these may have a block job of its own still running.
JOB_STEPS = frozenset({DeleteStep.JOB, DeleteStep.PIVOT})
