"""A bare-QEMU domain's disks and chains, read from its block graph.

Each layer's format is the one QEMU opened it with (``query-block``'s image
tree), never probed.  Each layer's file name needs care: a node whose
options no plain name can say is called ``json:{...}`` by QEMU, and that
name nests the whole chain below it, cut at 4 KiB.  An overlay gasnap adds
is such a node (``"backing": null`` at ``blockdev-add``, its header's
backing name relative), so:

* the active layer's file comes from its protocol child, which gasnap names
  ``<node>-f`` (a plain name: protocol nodes have no backing);
* every layer below comes from the layer above: QEMU's
  ``full-backing-filename``, the header's pointer made absolute, unless the
  layer's own name is already plain.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..hypervisor import Layer

if TYPE_CHECKING:
    from .monitor import Session

PROTOCOL_SUFFIX = "-f"  # the protocol child of node N is N-f when gasnap added N


@dataclass(frozen=True)
class Disk:
    target: str  # the device's id
    qdev: str  # its QOM path (for qom-get)
    root: str  # the node name of the active layer
    chain: tuple[Layer, ...]  # active layer first
    readonly: bool


async def disks(qmp: Session) -> dict[str, Disk]:
    """Each target's disk, as QEMU runs it now."""
    named = await _named(qmp)
    found = {}
    for block in await qmp.call("query-block"):
        inserted = block.get("inserted")
        target = _target(block.get("qdev", ""))
        if inserted is None or target is None:
            continue  # an empty drive, or not a device gasnap knows how to name
        root = str(inserted["node-name"])
        active = node_path(root, str(inserted["image"]["filename"]), named)
        found[target] = Disk(target, str(block["qdev"]), root,
                             chain_of(inserted["image"], active), bool(inserted.get("ro")))
    return found


async def format_nodes(qmp: Session) -> dict[tuple[str, str], str]:
    """(file name, driver) -> node name, for every named node."""
    named = await _named(qmp)
    return {(node_path(name, str(node["file"]), named), str(node["drv"])): name
            for name, node in named.items()}


async def _named(qmp: Session) -> dict[str, dict[str, Any]]:
    nodes = await qmp.call("query-named-block-nodes", {"flat": True})
    return {str(n["node-name"]): n for n in nodes if n.get("node-name")}


def node_path(name: str, filename: str, named: dict[str, dict[str, Any]]) -> str:
    """The file node NAME reads."""
    path = file_name(filename)
    child = named.get(f"{name}{PROTOCOL_SUFFIX}")
    if not path.startswith("/") and child is not None:
        return file_name(str(child["file"]))
    return path


def chain_of(image: dict[str, Any], active: str) -> tuple[Layer, ...]:
    """Active layer (its file ACTIVE) first, each with its format."""
    layers = []
    node, path = image, active
    while True:
        layers.append(Layer(path, str(node["format"])))
        below = node.get("backing-image")
        if below is None:
            return tuple(layers)
        own = file_name(str(below["filename"]))
        path = own if own.startswith("/") else str(node.get("full-backing-filename", own))
        node = below


def file_name(filename: str) -> str:
    """FILENAME, or the file a short ``json:{...}`` name reads; anything
    else (a network image, a name cut short) comes back as it is."""
    if not filename.startswith("json:"):
        return filename
    try:
        child = json.loads(filename[len("json:"):]).get("file")
    except (ValueError, AttributeError):
        return filename
    if isinstance(child, dict) and child.get("driver") in ("file", "host_device"):
        return str(child.get("filename", filename))
    return filename


def _target(qdev: str) -> str | None:
    """The device id of ``/machine/peripheral/ID/virtio-backend``: the target."""
    parts = qdev.strip("/").split("/")
    if len(parts) >= 3 and parts[:2] == ["machine", "peripheral"]:
        return parts[2]
    return None
