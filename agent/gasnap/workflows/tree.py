"""A volume's snapshots as a tree of files.

A snapshot's ``parent`` is the snapshot whose image lies nearest below its
own image; a volume's ``current`` is the snapshot whose image lies nearest
below the active file.  In a plain chain that is the previous snapshot; after
a revert the new active layer sits on the reverted-to snapshot's image, and
the snapshots taken on it form a branch.

Every file of a volume's tree is its active file or a record's image or
overlay (``file``): a revert keeps the state it leaves as ``before-revert``
snapshots, so no branch is without records.  Each file's format is known
without probing: the active file's from the domain XML, an overlay is a
qcow2 that gasnap (or Nova) wrote, and an image's format is the backing
format recorded in its overlay's header.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .. import images
from ..errors import Conflict, GasnapError
from ..hypervisor import Volume
from ..metadata import HOLDING, SnapshotMeta

log = logging.getLogger(__name__)


class TreeMismatch(Conflict):
    """The records and the files of a volume disagree."""

    code = "chain_mismatch"


def nearest(below: Sequence[str], metas: Iterable[SnapshotMeta]) -> SnapshotMeta | None:
    """The snapshot whose image is the first of BELOW (paths, nearest first)."""
    by_image = {m.backing_file: m for m in metas
                if m.status in HOLDING and m.backing_file is not None}
    for path in below:
        if path in by_image:
            return by_image[path]
    return None


def current(vol: Volume, metas: Iterable[SnapshotMeta]) -> SnapshotMeta | None:
    """The snapshot the active layer of VOL descends from directly."""
    return nearest([layer.path for layer in vol.chain[1:]], metas)


@dataclass(frozen=True)
class Node:
    """One file of a volume's tree."""

    path: str
    format: str
    backing: str | None  # absolute path, None for a file without backing
    backing_format: str | None


@dataclass(frozen=True)
class Tree:
    nodes: dict[str, Node]  # by path
    unreadable: list[str]  # snapshots whose files could not be read (why, each)

    def dependents(self, path: str) -> list[str]:
        """The files whose backing file is PATH, in path order."""
        return sorted(n.path for n in self.nodes.values() if n.backing == path)

    def format_of(self, path: str) -> str:
        return self.nodes[path].format

    def consistent(self, meta: SnapshotMeta) -> bool:
        """META's overlay is there and backs onto META's image, as recorded."""
        node = self.nodes.get(meta.file or "")
        return (node is not None and node.backing == meta.backing_file
                and meta.backing_file in self.nodes)

    def lineage(self, path: str) -> list[str]:
        """PATH and every file below it, nearest first."""
        found: list[str] = []
        node = self.nodes.get(path)
        while node is not None and node.path not in found:
            found.append(node.path)
            node = self.nodes.get(node.backing) if node.backing else None
        return found


async def read(vol: Volume, metas: Iterable[SnapshotMeta]) -> Tree:
    """The tree of VOL's files: its live chain (formats from the XML) and
    every holding record's overlay and image (formats from the overlays'
    headers).  Each file's backing is what its header says: a record that
    disagrees with its files (a chain changed by hand) adds its overlay as
    it is and not its image; ``consistent`` tells the two apart."""
    return await asyncio.to_thread(_read, vol, list(metas))


def _read(vol: Volume, metas: list[SnapshotMeta]) -> Tree:
    directory = os.path.dirname(vol.active_file)
    nodes: dict[str, Node] = {}
    unreadable: list[str] = []
    for upper, lower in zip(vol.chain, [*vol.chain[1:], None], strict=True):
        nodes[upper.path] = Node(upper.path, upper.format, lower.path if lower else None,
                                 lower.format if lower else None)
    home = os.path.realpath(directory)
    for meta in metas:
        if meta.status not in HOLDING or not meta.file or not meta.backing_file:
            continue
        try:
            # A record is data from a service a fleet shares: its files are
            # read (and a delete may remove them) only in the volume's
            # directory, where every file of a volume's tree is made.
            for path in (meta.file, meta.backing_file):
                # The file itself, not only its directory: a record's file
                # that is a symlink out would be rebased or removed through.
                if os.path.dirname(os.path.realpath(path)) != home:
                    raise TreeMismatch(f"{path} lies outside the volume's directory "
                                       f"{directory}")
            node = nodes.get(meta.file) or _overlay(meta.file, directory)
            nodes[meta.file] = node
            if (node.backing == meta.backing_file and node.backing_format is not None
                    and meta.backing_file not in nodes):
                nodes[meta.backing_file] = _image(meta.backing_file, node.backing_format,
                                                  directory)
        except (OSError, GasnapError) as err:
            log.warning("snapshot %s: its files cannot be read safely: %s", meta.id, err)
            unreadable.append(f"snapshot {meta.id}: {err}")
    return Tree(nodes, unreadable)


def _overlay(path: str, directory: str) -> Node:
    """A record's overlay: a qcow2 whose header names its backing format."""
    header = images.read_qcow2_header(path)
    images.check_plain(path, header)
    if header.backing_file is None or header.backing_format is None:
        raise TreeMismatch(f"{path} has no backing file with a recorded format")
    backing = images.resolve_inside(directory, header.backing_file, f"the backing of {path}")
    return Node(path, "qcow2", backing, header.backing_format)


def _image(path: str, fmt: str, directory: str) -> Node:
    if fmt != "qcow2":
        return Node(path, fmt, None, None)
    header = images.read_qcow2_header(path)
    images.check_plain(path, header)
    if header.backing_file is None:
        return Node(path, fmt, None, None)
    if header.backing_format is None:
        raise TreeMismatch(f"{path} records no format for its backing file")
    backing = images.resolve_inside(directory, header.backing_file, f"the backing of {path}")
    return Node(path, fmt, backing, header.backing_format)
