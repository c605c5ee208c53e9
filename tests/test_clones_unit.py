"""Clone rules a lab guest does not show by itself: which files each merge
method writes or removes (the dependency rule's input), the clone request's
parsing, and qemu-img's flags for a full copy (formats named, flushed, the
bandwidth setting as its rate limit)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from gasnap import images, qemuimg
from gasnap.errors import BadRequest
from gasnap.metadata import CloneChange, CloneMeta, CloneMode, CloneStatus
from gasnap.workflows import clone, cloneplan
from gasnap.workflows.cloneplan import AttachPlan, request_from_doc
from gasnap.workflows.deleteplan import DeletePlan, Method, touched
from gasnap.workflows.windows import Windows


def plan(method: Method, **fields: Any) -> DeletePlan:
    base = {"snapshot_id": "s", "domain": "d", "target": "vda", "volume_id": "v",
            "method": method, "top": "/v/top", "base": "/v/image", "remove": "/v/top",
            "pull_base": None, "above": None, "base_format": "qcow2", "moved_bytes": 0,
            "chain": []}
    return DeletePlan(**{**base, **fields})


@pytest.mark.parametrize(("method", "fields", "expected"), [
    (Method.COMMIT, {}, {"/v/image", "/v/top"}),
    (Method.ACTIVE_COMMIT, {}, {"/v/image", "/v/top"}),
    (Method.OFFLINE_COMMIT, {}, {"/v/image", "/v/top"}),
    (Method.PULL, {"remove": "/v/image"}, {"/v/top", "/v/image"}),
    (Method.OFFLINE_PULL, {"remove": "/v/image"}, {"/v/top", "/v/image"}),
    (Method.BRANCH_PULL, {"remove": "/v/image", "dependents": ["/v/b1"], "pull_active": True},
     {"/v/b1", "/v/top", "/v/image"}),
    (Method.BRANCH_PULL, {"remove": "/v/image", "dependents": ["/v/b1", "/v/b2"]},
     {"/v/b1", "/v/b2", "/v/image"}),
])
def test_each_merge_names_what_it_writes_and_removes(
    method: Method, fields: dict[str, Any], expected: set[str]
) -> None:
    assert touched(plan(method, **fields)) == expected


def test_clone_requests() -> None:
    req = request_from_doc("s1", {})
    assert (req.mode, req.name, req.attach) == (CloneMode.LINKED, "", None)
    req = request_from_doc("s1", {"mode": "full", "name": "copy",
                                  "attach": {"domain": "d", "target": "vdq", "readonly": True}})
    assert req.mode is CloneMode.FULL and req.attach is not None
    assert (req.attach.domain, req.attach.target, req.attach.readonly) == ("d", "vdq", True)
    for bad in ({"mode": "deep"}, {"extra": 1}, {"attach": "d"}, {"attach": {}},
                {"attach": {"domain": "d", "target": "hda"}},
                {"attach": {"domain": "d", "readonly": "yes"}}, {"name": "a\nb"}):
        with pytest.raises(BadRequest):
            request_from_doc("s1", bad)


@pytest.mark.parametrize(("bandwidth", "limit"), [(0, []), (25, ["-r", "25M"])])
async def test_a_full_copy_names_formats_flushes_and_is_throttled(
    monkeypatch: pytest.MonkeyPatch, bandwidth: int, limit: list[str]
) -> None:
    calls: list[tuple[str, ...]] = []

    async def run(*args: str, timeout: float | None = None) -> str:
        calls.append(args)
        return ""

    monkeypatch.setattr(qemuimg, "run", run)
    await qemuimg.convert("/v/image", "raw", "/v/.volume-c.part", bandwidth_mib=bandwidth)
    assert calls == [("convert", "-t", "writeback", "-f", "raw", "-O", "qcow2", *limit,
                      "/v/image", "/v/.volume-c.part")]


# --- a plug never lands inside a freeze window ---------------------------------------


class _Hypervisor:
    def __init__(self) -> None:
        self.attached: list[str] = []

    @contextlib.asynccontextmanager
    async def hold(self, _domains: dict[str, str]) -> AsyncIterator[None]:
        yield

    async def attach_disk(self, _name: str, _path: str, target: str, _serial: str, *,
                          readonly: bool) -> None:
        self.attached.append(target)


class _Metadata:
    async def update_clone_metadata(self, clone_id: str, change: CloneChange) -> str:
        return clone_id


async def test_an_attach_waits_for_the_window_of_its_domain() -> None:
    """The lab test's host lets libvirt itself delay a plug past a freeze
    call; the window lock is what keeps it out of the rest of the window."""
    hv, windows = _Hypervisor(), Windows()
    ctx = SimpleNamespace(windows=windows, hv=hv, metadata=_Metadata())
    planned = AttachPlan("c1", "/v/c1", "reader", "uuid-r", "vdb", readonly=False)
    async with windows.owning(["uuid-r"]):
        attaching = asyncio.create_task(clone._attach(ctx, planned))  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        assert hv.attached == [] and not attaching.done()
    assert await attaching == "c1"
    assert hv.attached == ["vdb"]
    async with windows.owning(["uuid-other"]):  # another domain's window: no wait
        await asyncio.wait_for(clone._attach(ctx, planned), 5)  # type: ignore[arg-type]


@pytest.mark.parametrize(("file", "image", "ok"), [
    ("/v/a/volume-{id}", "/v/a/volume-x.img", True),
    ("/v/a/volume-{id}", None, True),
    ("/etc/passwd", None, False),  # a record may name any path: never used
    ("/v/a/../b/volume-{id}", None, False),
    ("/v/a/volume-{id}", "/v/b/volume-x.img", False),
    ("/v/a/volume-other", None, False),
])
def test_a_clone_record_names_a_file_gasnap_made_or_nothing_is_done(
        file: str, image: str | None, ok: bool) -> None:
    """REVIEW-2 item 7: attach, flatten and delete use a clone record's file
    only if it is gasnap's name for that clone, beside its image."""
    clone_id = "0b9f4c1e-6d0a-4d4b-9d57-5a0c1f2e3d4c"
    meta = CloneMeta(clone_id, "c", "s", "v", CloneMode.LINKED, file.format(id=clone_id),
                     image, 1 << 20, CloneStatus.AVAILABLE, "2026-01-01T00:00:00")
    if ok:
        cloneplan.check_own_file(meta)
    else:
        with pytest.raises(images.UnsafeImage):
            cloneplan.check_own_file(meta)
