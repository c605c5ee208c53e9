"""A host that refuses a file operation (NFS with root_squash refusing a
chown, a directory made immutable): the workflow ends in an error record
naming the refusal, no file left behind, the chain as it was (REVIEW item 10).

The create runs in this process on the real runtime (libvirtd, lab guest,
journal, store, freeze guard); only ``os.chown`` is made to refuse, since a
root process on a local disk cannot be refused one on demand.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import chain_of, volume_files
from gasnap.config import Settings
from gasnap.hypervisor import Domain
from gasnap.quiesce import Quiesce
from gasnap.runtime import open_runtime
from gasnap.tasks import TaskState
from gasnap.virt import LibvirtHypervisor
from gasnap.workflows.createplan import CreateRequest


async def test_a_refused_chown_ends_in_an_error_record(
    tmp_path: Path, hv: LibvirtHypervisor, guest: Domain, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = guest.volumes[1].target
    chain = await chain_of(hv, guest.name, target)
    files = volume_files(chain[0])

    def refuse(path: Any, *_args: Any, **_kwargs: Any) -> None:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))

    monkeypatch.setattr(os, "chown", refuse)
    settings = Settings(state_dir=tmp_path, spare_overlays=False)
    async with open_runtime(settings) as runtime:
        await asyncio.wait_for(runtime.service.ready.wait(), 60)
        task = await runtime.service.create(CreateRequest(
            [guest.name], {guest.name: [target]}, "refused", "", Quiesce.REQUIRED))
        await asyncio.wait_for(task.done.wait(), 60)
        assert task.state is TaskState.FAILED
        assert task.error is not None and task.error["code"] == "host_io", task.error
        assert "Operation not permitted" in task.error["message"]
        (record,) = await runtime.service.records(domain=guest.name, status="error")
        assert "Operation not permitted" in record["error"]
    assert await chain_of(hv, guest.name, target) == chain
    assert volume_files(chain[0]) == files


async def test_a_merged_file_that_cannot_be_removed_does_not_fail_the_delete(
    tmp_path: Path, hv: LibvirtHypervisor, guest: Domain
) -> None:
    """The merge is done and verified; the file (in no chain any more) stays,
    its path logged, and the snapshot is gone."""
    target = guest.volumes[1].target
    settings = Settings(state_dir=tmp_path, spare_overlays=False)
    async with open_runtime(settings) as runtime:
        await asyncio.wait_for(runtime.service.ready.wait(), 60)
        made = []
        for name in ("a", "b"):
            task = await runtime.service.create(CreateRequest(
                [guest.name], {guest.name: [target]}, name, "", Quiesce.OFF))
            await asyncio.wait_for(task.done.wait(), 60)
            assert task.state is TaskState.SUCCEEDED, task.error
            made.append(task.result["snapshots"][0] if task.result else {})
        directory = Path(made[0]["file"]).parent
        subprocess.run(["chattr", "+i", str(directory)], check=True)
        try:
            from gasnap.workflows.deleteplan import Strategy  # noqa: PLC0415
            task = await runtime.service.delete(made[0]["id"], Strategy.COMMIT)
            await asyncio.wait_for(task.done.wait(), 120)
        finally:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        assert task.state is TaskState.SUCCEEDED, task.error
        assert Path(made[0]["file"]).exists()
        assert made[0]["file"] not in await chain_of(hv, guest.name, target)
        Path(made[0]["file"]).unlink()
