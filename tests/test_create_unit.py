"""Create-workflow rules that need no guest: naming, XML, parents, and the
validation errors a real lab guest cannot produce on demand (fake hypervisor)."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from gasnap import domxml
from gasnap.hypervisor import AgentState, Domain, DomainState, Layer, Volume
from gasnap.images import overlay_path, spare_path
from gasnap.metadata import VolumeLimits
from gasnap.quiesce import Quiesce
from gasnap.workflows import Context
from gasnap.workflows.createplan import (
    CreatePlan,
    CreateRequest,
    DomainStateConflict,
    UnsupportedDisk,
    plan,
)

SNAP1 = "11111111-2222-3333-4444-555555555555"
SNAP2 = "66666666-7777-8888-9999-000000000000"


def test_overlay_names_come_from_the_volume_id() -> None:
    """Cinder's volume-<volume_id>.<snapshot_id>, whatever the active file is
    called: names never grow with the chain."""
    assert overlay_path("/v/volume-abc", "abc", SNAP1) == f"/v/volume-abc.{SNAP1}"
    assert overlay_path(f"/v/volume-abc.{SNAP1}", "abc", SNAP2) == f"/v/volume-abc.{SNAP2}"
    long = "/v/" + "x" * 200 + ".virsh1"  # a layer made by hand
    assert overlay_path(long, "abc", SNAP1) == f"/v/volume-abc.{SNAP1}"
    # A disk without a serial: its fallback id, characters outside
    # [A-Za-z0-9._-] written as "_" (the contract's spelling).
    assert overlay_path("/v/d", "web1/vda", SNAP1) == f"/v/volume-web1_vda.{SNAP1}"
    long_one, long_two = (overlay_path("/v/d", f"{'w' * 300}/vd{x}", SNAP1) for x in "ab")
    assert long_one != long_two
    for hostile in ("../../etc", "a/../b", "." * 300, "x" * 300):
        name = Path(overlay_path("/v/d", hostile, SNAP1))
        assert name.parent == Path("/v") and len(name.name) < 255 and ".." not in name.name


def test_spare_names_stay_within_name_max() -> None:
    assert spare_path(f"/v/volume-abc.{SNAP1}") == "/v/.volume-abc.gasnap-spare"
    long = spare_path("/v/" + "y" * 250)
    assert Path(long).parent == Path("/v") and len(Path(long).name) < 255


def test_snapshot_xml_names_every_disk() -> None:
    root = ET.fromstring(domxml.snapshot_xml({"vdb": "/v/b.1"}, ["vda", "vdb"]))
    disks = {d.get("name"): d for d in root.iter("disk")}
    assert disks["vda"].get("snapshot") == "no"
    assert disks["vdb"].get("snapshot") == "external"
    assert disks["vdb"].find("source").get("file") == "/v/b.1"  # type: ignore[union-attr]
    assert disks["vdb"].find("driver").get("type") == "qcow2"  # type: ignore[union-attr]


def test_offline_switch_rewrites_only_the_chosen_disks() -> None:
    xml = """<domain><name>d</name><devices>
      <disk type='file' device='disk'><driver name='qemu' type='raw'/>
        <source file='/v/a'/><backingStore/><target dev='vda'/></disk>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='/v/b'/><target dev='vdb'/></disk>
    </devices></domain>"""
    out = domxml.disks(domxml.with_disk_sources(xml, {"vda": "/v/a.1"}))
    assert out[0].chain == (Layer("/v/a.1", "qcow2"),)
    assert not out[0].chain_complete  # the stale <backingStore/> is gone
    assert out[1].chain == (Layer("/v/b", "qcow2"),)
    with pytest.raises(domxml.DomainXMLError):
        domxml.with_disk_sources(xml, {"vdz": "/x"})


class FakeHypervisor:
    def __init__(self, domain: Domain) -> None:
        self.domain = domain

    async def get_domain(self, name: str, *, probe_agent: bool = False,
                         uuid: str | None = None) -> Domain:
        return self.domain

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"plan must not call {name}")


class NoRecords:
    """A metadata service with no snapshot yet."""

    async def list_snapshots(self, **_filters: Any) -> list[Any]:
        return []

    async def get_volume_limits(self, _volume_id: str) -> VolumeLimits:
        return VolumeLimits()


def context(domain: Domain) -> Context:
    return Context(FakeHypervisor(domain), None, NoRecords(),  # type: ignore[arg-type]
                   None, None, 10.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("source_type", "fmt", "reason"),
    [("network", "raw", "network disk"), ("block", "raw", "block disk"),
     ("file", "vmdk", "vmdk")],
)
async def test_unsupported_disks_are_refused(source_type: str, fmt: str, reason: str,
                                             tmp_path: Path) -> None:
    vol = Volume("d/vda", "vda", None, source_type, (Layer(str(tmp_path / "x"), fmt),))
    dom = Domain("d", "u", DomainState.RUNNING, AgentState.CONNECTED, (vol,))
    with pytest.raises(UnsupportedDisk, match=reason):
        await plan(context(dom), CreateRequest(["d"], {}, "n", "", Quiesce.PREFERRED))


async def test_crashed_domain_is_a_conflict(tmp_path: Path) -> None:
    vol = Volume("d/vda", "vda", None, "file", (Layer(str(tmp_path / "x"), "qcow2"),))
    dom = Domain("d", "u", DomainState.CRASHED, AgentState.ABSENT, (vol,))
    with pytest.raises(DomainStateConflict):
        await plan(context(dom), CreateRequest(["d"], {}, "n", "", Quiesce.OFF))


async def test_the_plan_names_the_disks_left_alone(tmp_path: Path) -> None:
    """The switch runs with the guest frozen and gets every other disk from the
    plan (as snapshot='no'), not from a read of the definition in the window;
    the journal keeps them, and a plan journaled before the field reads back."""
    images = {t: tmp_path / t for t in ("vda", "vdb", "vdc")}
    for image in images.values():
        image.write_bytes(b"\0" * 512)
    vols = tuple(Volume(f"d/{t}", t, None, "file", (Layer(str(p), "raw"),))
                 for t, p in images.items())
    dom = Domain("d", "u", DomainState.RUNNING, AgentState.CONNECTED, vols)
    planned = await plan(context(dom), CreateRequest(["d"], {"d": ["vdb"]}, "n", "",
                                                      Quiesce.OFF))
    assert planned.left_alone == {"d": ["vda", "vdc"]}
    assert [v.target for v in planned.volumes] == ["vdb"]
    doc = planned.to_dict()
    assert CreatePlan.from_dict(doc) == planned
    del doc["left_alone"]
    assert CreatePlan.from_dict(doc).left_alone == {}


async def test_the_plan_keeps_each_domains_uuid(tmp_path: Path) -> None:
    """The window holds its domains by the UUIDs seen at plan time; a plan
    journaled before the field reads back with none (held by name then)."""
    image = tmp_path / "vda"
    image.write_bytes(b"\0" * 512)
    vol = Volume("d/vda", "vda", None, "file", (Layer(str(image), "raw"),))
    dom = Domain("d", "5f0e3b52-0c36-4f0c-9a57-3f7c2a1d9e11", DomainState.RUNNING,
                 AgentState.CONNECTED, (vol,))
    planned = await plan(context(dom), CreateRequest(["d"], {}, "n", "", Quiesce.OFF))
    assert planned.uuids == {"d": dom.uuid}
    doc = planned.to_dict()
    assert CreatePlan.from_dict(doc) == planned
    del doc["uuids"]
    assert CreatePlan.from_dict(doc).uuids == {}


# --- settle: what the live chain proves -------------------------------------------


class SettleHypervisor:
    """The chain settle reads, and what every domain's chains hold."""

    def __init__(self, domain: Domain, in_use: set[str]) -> None:
        self.domain = domain
        self.in_use = in_use
        self.uuids: list[str | None] = []

    async def get_domain(self, name: str, *, probe_agent: bool = False,
                         uuid: str | None = None) -> Domain:
        self.uuids.append(uuid)
        return self.domain

    async def files_in_use(self) -> set[str]:
        return self.in_use


async def _settled(tmp_path: Path, chain: list[str], in_use: set[str]
                   ) -> tuple[Any, Path, SettleHypervisor]:
    from gasnap.metadata import NewSnapshot  # noqa: PLC0415
    from gasnap.metastore import open_sqlite  # noqa: PLC0415
    from gasnap.workflows.createplan import VolumePlan  # noqa: PLC0415
    from gasnap.workflows.settle import settle  # noqa: PLC0415

    overlay = tmp_path / f"vol.{SNAP1}"
    overlay.write_bytes(b"")
    vol = Volume("d/vda", "vda", None, "file", tuple(Layer(p, "qcow2") for p in chain))
    hv = SettleHypervisor(Domain("d", "uuid-d", DomainState.RUNNING, AgentState.CONNECTED,
                                 (vol,)), in_use)
    store = await open_sqlite(tmp_path / "meta.db")
    await store.create_snapshot_metadata(NewSnapshot(SNAP1, "d/vda", "n", "", 1, "t", "d"))
    plan_ = CreatePlan(None, "n", "", Quiesce.OFF, "t", [VolumePlan(
        SNAP1, "d", "d/vda", "vda", str(tmp_path / "vol"), "qcow2", str(overlay), 1)],
        ["d"], ["d"], [], uuids={"d": "uuid-d"})
    ctx = Context(hv, None, store, None, None, 10.0)  # type: ignore[arg-type]
    (meta,) = await settle(ctx, plan_, {"d": "filesystem"}, "failed")
    await store.close()
    return meta, overlay, hv


async def test_settle_reads_the_planned_domain_by_uuid(tmp_path: Path) -> None:
    meta, overlay, hv = await _settled(
        tmp_path, [str(tmp_path / f"vol.{SNAP1}"), str(tmp_path / "vol")], set())
    assert (meta.status.value, meta.backing_file) == ("available", str(tmp_path / "vol"))
    assert hv.uuids == ["uuid-d"] and overlay.exists()


async def test_an_overlay_on_another_image_is_an_error_and_is_kept(tmp_path: Path) -> None:
    """REVIEW item 5: the overlay became active on a file other than the one
    planned (a stale plan): never recorded available on the wrong image, and
    never removed while a chain holds it."""
    stale = [str(tmp_path / f"vol.{SNAP1}"), str(tmp_path / "vol.other")]
    meta, overlay, _ = await _settled(tmp_path, stale, {str(overlay_path_of(tmp_path))})
    assert meta.status.value == "error" and "not on the planned image" in str(meta.error)
    assert overlay.exists()


async def test_a_failed_overlay_is_removed_only_when_no_chain_holds_it(tmp_path: Path) -> None:
    held_dir, free_dir = tmp_path / "held", tmp_path / "free"
    held_dir.mkdir()
    free_dir.mkdir()
    held, overlay, _ = await _settled(held_dir, [str(held_dir / "vol")],
                                      {str(overlay_path_of(held_dir))})
    assert held.status.value == "error" and overlay.exists()  # another domain uses it
    gone, overlay, _ = await _settled(free_dir, [str(free_dir / "vol")], set())
    assert gone.status.value == "error" and not overlay.exists()


async def test_a_record_another_call_settled_is_neither_finalized_nor_its_file_removed(
        tmp_path: Path) -> None:
    """Outside review: a create refused because its snapshot id exists
    already settled (a Nova call sent twice) settles its volumes: the other
    call's record stays as it is, and its overlay (off the chain, after a
    revert) is not removed as this create's failed one."""
    from gasnap.metadata import Consistency, Finalization, NewSnapshot, Status  # noqa: PLC0415
    from gasnap.metastore import open_sqlite  # noqa: PLC0415
    from gasnap.workflows.createplan import VolumePlan  # noqa: PLC0415
    from gasnap.workflows.settle import settle  # noqa: PLC0415

    overlay = tmp_path / f"vol.{SNAP1}"
    overlay.write_bytes(b"")
    vol = Volume("d/vda", "vda", None, "file", (Layer(str(tmp_path / "vol.r"), "qcow2"),
                                                 Layer(str(tmp_path / "vol"), "qcow2")))
    hv = SettleHypervisor(Domain("d", "uuid-d", DomainState.RUNNING, AgentState.CONNECTED,
                                 (vol,)), set())
    store = await open_sqlite(tmp_path / "meta.db")
    await store.create_snapshot_metadata(NewSnapshot(SNAP1, "d/vda", "n", "", 1, "t", "d"))
    await store.finalize_snapshot_metadata(SNAP1, Finalization(
        Status.AVAILABLE, str(overlay), str(tmp_path / "vol"), Consistency.FILESYSTEM))
    plan_ = CreatePlan(None, "n", "", Quiesce.OFF, "t2", [VolumePlan(
        SNAP1, "d", "d/vda", "vda", str(tmp_path / "vol"), "qcow2", str(overlay), 1)],
        ["d"], ["d"], [], uuids={"d": "uuid-d"})
    ctx = Context(hv, None, store, None, None, 10.0)  # type: ignore[arg-type]
    assert await settle(ctx, plan_, {}, "snapshot exists") == []
    assert (await store.get_snapshot(SNAP1)).status is Status.AVAILABLE
    await store.close()
    assert overlay.exists()


def overlay_path_of(directory: Path) -> Path:
    return Path(os.path.realpath(directory / f"vol.{SNAP1}"))


# --- the freeze window: when a snapshot may be called filesystem-consistent -------


class Clock:
    """A monotonic clock that moves only when a fake says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


class WindowFakes:
    """Guard, guest agent, journal and hypervisor of one freeze window, each
    taking the (fake) time given: the guard's deadline runs from when it
    takes the arm, as the real guard's ``call_later`` does."""

    def __init__(self, clock: Clock, *, ack: float, switch: float) -> None:
        self.clock, self.ack, self.switch = clock, ack, switch
        self.guard_deadline = 0.0
        self.switched_at = 0.0

    async def arm(self, domains: list[str], timeout: float, *, owner: str) -> None:
        self.guard_deadline = self.clock.now + timeout
        self.clock.now += self.ack  # a loaded host: the answer comes late

    async def disarm(self, domains: list[str], *, owner: str, thawed: bool = False) -> None:
        pass

    async def step(self, op: Any, _step: Any, **_fields: Any) -> Any:
        return op

    async def fsfreeze(self, _domain: str, _timeout: float) -> int:
        self.clock.now += 0.1
        return 1

    async def fsthaw(self, _domain: str, _timeout: float) -> int:
        return 1

    async def switch_overlays(self, *_args: Any) -> None:
        self.clock.now += self.switch
        self.switched_at = self.clock.now


@pytest.mark.parametrize(("ack", "switch", "expected"), [
    (0.0, 0.5, "filesystem"),
    (0.5, 0.3, "filesystem"),  # 0.9 s after the arm: inside the guard's deadline
    (0.5, 0.6, "crash"),  # 1.2 s: the guard had thawed, though 0.7 s after its ack
])
async def test_a_switch_after_the_guards_deadline_is_crash_consistent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ack: float, switch: float, expected: str
) -> None:
    from types import SimpleNamespace  # noqa: PLC0415

    from gasnap.workflows import create  # noqa: PLC0415
    from gasnap.workflows.createplan import VolumePlan  # noqa: PLC0415

    clock = Clock()
    monkeypatch.setattr(create, "time", SimpleNamespace(monotonic=clock.monotonic))
    fakes = WindowFakes(clock, ack=ack, switch=switch)
    ctx = Context(fakes, fakes, None, fakes, fakes, 1.0)  # type: ignore[arg-type]
    planned = CreatePlan(None, "n", "", Quiesce.PREFERRED, "t", [VolumePlan(
        SNAP1, "d", "d/vda", "vda", str(tmp_path / "vol"), "qcow2", str(tmp_path / "o"), 1)],
        ["d"], ["d"], [])
    _, consistency = await create._owned_window(ctx, SimpleNamespace(id="op"), planned, {},
                                                create.WindowTimes())
    assert (fakes.switched_at < fakes.guard_deadline) == (expected == "filesystem")
    assert consistency == {"d": expected}
