"""The space estimates and checks on real filesystems of this host: what a
fresh overlay takes, needs adding up per filesystem, and a failure
explained as a full filesystem only when it is one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from gasnap.errors import GasnapError
from gasnap.workflows import space

MIB = 1 << 20


@pytest.mark.parametrize("size_mib", [32, 1024, 1 << 20])
def test_the_overlay_estimate_covers_what_qemu_img_makes(tmp_path: Path, size_mib: int) -> None:
    path = tmp_path / "overlay"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_mib}M"],
                   check=True)
    assert os.stat(path).st_blocks * 512 <= space.overlay_bytes(size_mib * MIB)
    assert space.overlay_bytes(size_mib * MIB) < 2 * MIB  # and stays small


async def test_needs_on_one_filesystem_add_up(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    half = free // 2 + MIB
    await space.check({str(tmp_path / "a"): half}, 0, "one half")
    with pytest.raises(space.InsufficientSpace) as refused:
        await space.check({str(tmp_path / "a"): half, str(tmp_path / "b"): half}, 0, "both")
    assert refused.value.code == "insufficient_space"
    with pytest.raises(space.InsufficientSpace):
        await space.check({str(tmp_path): 0}, free + MIB, "the reserve alone")


async def test_a_failure_is_blamed_on_space_only_when_it_ran_out(tmp_path: Path) -> None:
    failure = GasnapError("the block job failed", code="merge_failed")
    assert await space.explain(failure, str(tmp_path), 0) is failure
    explained = await space.explain(failure, str(tmp_path), 1 << 62)
    assert explained.code == "insufficient_space"
    assert "the block job failed" in explained.message
