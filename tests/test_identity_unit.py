"""Which disk a record is of, on real qcow2 files and without a hypervisor:
the paths a lab guest reaches only slowly (a golden base many disks share,
a revert's branch), for disks without a serial (REVIEW-2 R4, identity)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from gasnap.errors import NotFound
from gasnap.hypervisor import AgentState, Domain, DomainState, Layer, Volume
from gasnap.metadata import SnapshotMeta, Status
from gasnap.workflows import Context, identity, tree


def qcow2(path: Path, backing: str | None = None) -> str:
    args = ["-b", backing, "-F", "qcow2"] if backing else []
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *args, str(path), "16M"],
                   check=True, cwd=path.parent)
    return str(path)


def record(sid: str, file: str, image: str) -> SnapshotMeta:
    return SnapshotMeta(sid, "D/vdb", sid, "", 1, "t", "D", None, "vdb", Status.AVAILABLE,
                        file=file, backing_file=image)


def disk(*chain: str, serial: str | None = None) -> Volume:
    return Volume(serial or "D/vdb", "vdb", serial, "file",
                  tuple(Layer(p, "qcow2") for p in chain))


async def test_a_golden_base_does_not_make_another_disk_this_one(tmp_path: Path) -> None:
    """Volume A (on a shared base) left; volume C (on the same base, no
    serial) took its target.  A's snapshot meets C's chain only at the base:
    not C's.  The reviewer's reproduction: it planned a drop of A whole."""
    base = qcow2(tmp_path / "base.qcow2")
    a = qcow2(tmp_path / "volume-A", "base.qcow2")
    s = record("s", qcow2(tmp_path / "volume-A.s", "volume-A"), a)
    c = disk(qcow2(tmp_path / "volume-C", "base.qcow2"), base)
    nodes = await tree.read(c, [s])
    with pytest.raises(identity.VolumeDetached):
        identity.check_files(s, c, nodes, [s])


async def test_a_record_naming_another_volumes_files_is_refused(tmp_path: Path) -> None:
    """A Cinder share holds every volume's files in one directory.  A
    record of volume C (it has a serial) naming volume B's files, off C's
    chain, is refused before anything is read or removed (outside review:
    such a record was planned as a drop of B's active file and base).  A
    record on a tree of C's own named for C (a branch pull of a base with
    no backing leaves two trees) is still C's."""
    b = qcow2(tmp_path / "volume-B")
    forged = SnapshotMeta("f", "C", "f", "", 1, "t", "D", None, "vdb", Status.AVAILABLE,
                          file=qcow2(tmp_path / "volume-B.s", "volume-B"), backing_file=b)
    c = disk(qcow2(tmp_path / "volume-C"), serial="C")
    nodes = await tree.read(c, [forged])
    with pytest.raises(tree.TreeMismatch) as err:
        identity.check_files(forged, c, nodes, [forged])
    assert err.value.code == "chain_mismatch"
    top = qcow2(tmp_path / "volume-C.1")
    own = SnapshotMeta("o", "C", "o", "", 1, "t", "D", None, "vdb", Status.AVAILABLE,
                       file=qcow2(tmp_path / "volume-C.2", "volume-C.1"), backing_file=top)
    identity.check_files(own, c, await tree.read(c, [own]), [own])


async def test_a_revert_branch_is_still_this_disks(tmp_path: Path) -> None:
    """After a revert to S the running chain is a fresh overlay on S's image;
    the branch left (S's overlay, the before-revert snapshot above it) meets
    it at S's image, a snapshot point."""
    image = qcow2(tmp_path / "volume-D_vdb")  # named for the volume id D/vdb
    s = record("s", qcow2(tmp_path / "volume-D_vdb.s", "volume-D_vdb"), image)
    before = record("b", qcow2(tmp_path / "volume-D_vdb.b", "volume-D_vdb.s"), str(s.file))
    running = disk(qcow2(tmp_path / "volume-D_vdb.r", "volume-D_vdb"), image)
    nodes = await tree.read(running, [s, before])
    for meta in (s, before):
        identity.check_files(meta, running, nodes, [s, before])


async def test_a_record_naming_a_file_elsewhere_is_never_read(tmp_path: Path) -> None:
    """REVIEW-2 item 7: a record's files are read, and may be removed, only
    in the volume's directory."""
    (tmp_path / "images").mkdir()
    (tmp_path / "elsewhere").mkdir()
    image = qcow2(tmp_path / "images" / "volume-x")
    running = disk(qcow2(tmp_path / "images" / "volume-x.r", "volume-x"), image)
    stray = record("s", qcow2(tmp_path / "elsewhere" / "volume-x.s", "../images/volume-x"),
                   image)
    nodes = await tree.read(running, [stray])
    assert not nodes.consistent(stray)
    assert nodes.unreadable and "outside the volume's directory" in nodes.unreadable[0]


def meta_of(sid: str, volume: str, file: str, image: str, domain: str = "D") -> SnapshotMeta:
    return SnapshotMeta(sid, volume, sid, "", 1, "t", domain, None, "vdb", Status.AVAILABLE,
                        file=file, backing_file=image)


async def test_a_branch_through_a_layer_named_by_hand_is_still_the_volumes(
        tmp_path: Path) -> None:
    """Outside review: layers virsh named (``data.snap1``, ``data.snap2``),
    the newer adopted with manage (M), a snapshot S on top, then a revert to
    M.  M's file and S's image are off the chain and not named for the
    volume, but their lineage meets the chain at M's image, a snapshot
    point: still the volume's, so they can be deleted and reverted to."""
    base = qcow2(tmp_path / "volume-X")
    snap1 = qcow2(tmp_path / "data.snap1", "volume-X")
    snap2 = qcow2(tmp_path / "data.snap2", "data.snap1")
    m = meta_of("m", "X", snap2, snap1)
    s = meta_of("s", "X", qcow2(tmp_path / "volume-X.s", "data.snap2"), snap2)
    running = disk(qcow2(tmp_path / "volume-X.r", "data.snap1"), snap1, base, serial="X")
    nodes = await tree.read(running, [m, s])
    for meta in (m, s):
        identity.check_files(meta, running, nodes, [m, s])


class _Domains:
    def __init__(self, *domains: Domain) -> None:
        self.domains = {d.name: d for d in domains}

    async def get_domain(self, name: str, **_: Any) -> Domain:
        if name not in self.domains:
            raise NotFound(f"no domain {name}")
        return self.domains[name]

    async def list_domains(self, **_: Any) -> list[Domain]:
        return list(self.domains.values())


async def test_a_volume_is_followed_to_another_domain_only_with_its_files() -> None:
    """Outside review: vm1, whose disk has the serial ``data``, was undefined
    with its files kept; vm2, a copy of its definition, has the serial too
    but files of its own.  A snapshot of vm1 is not vm2's (a delete would
    have removed vm1's active file).  A volume that moved with its files
    (Cinder attached it elsewhere) is followed."""
    snap = meta_of("s", "data", "/v/volume-data.s2", "/v/volume-data.s1", domain="vm1")

    def vm2(*chain: str) -> Domain:
        return Domain("vm2", "u2", DomainState.SHUTOFF, AgentState.ABSENT,
                      (Volume("data", "vdb", "data", "file",
                              tuple(Layer(p, "qcow2") for p in chain)),))

    ctx = cast(Context, SimpleNamespace(hv=_Domains(vm2("/w/volume-data", "/w/base"))))
    with pytest.raises(NotFound):
        await identity.domain_of(ctx, snap)
    ctx = cast(Context, SimpleNamespace(hv=_Domains(vm2("/v/volume-data.s2",
                                                        "/v/volume-data.s1"))))
    assert (await identity.domain_of(ctx, snap)).name == "vm2"
