"""What gasnap believes about image files: formats named, never guessed.

Images made with the real qemu-img; the hostile ones are what a guest (a raw
disk's bytes) or a careless caller (a header without a backing format) can
produce.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from gasnap import images
from gasnap.hypervisor import Layer


def qemu_img(*args: str, cwd: Path) -> None:
    subprocess.run(["qemu-img", *args], check=True, cwd=cwd, capture_output=True)


def hostile_raw(directory: Path, target: str = "/etc/hostname") -> Path:
    """A raw disk whose first bytes are a qcow2 header backed by TARGET: what
    any guest can write to its own disk."""
    disk = directory / "volume-raw"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", target, str(disk), "1M",
             cwd=directory)
    assert disk.read_bytes()[:4] == images.QCOW2_MAGIC
    return disk


def test_a_raw_disk_stays_raw_whatever_its_bytes_say(tmp_path: Path) -> None:
    disk = hostile_raw(tmp_path)
    assert images.chain(str(disk), "raw") == (Layer(str(disk), "raw"),)


def test_an_overlay_on_a_raw_disk_ends_at_the_raw_disk(tmp_path: Path) -> None:
    disk = hostile_raw(tmp_path)
    top = tmp_path / "volume-raw.snap"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", disk.name, str(top), "1M",
             cwd=tmp_path)
    assert images.chain(str(top), "qcow2") == (Layer(str(top), "qcow2"),
                                               Layer(str(disk), "raw"))


def test_formats_come_from_each_header_down_the_chain(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "raw", "base", "1M", cwd=tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base", "mid", cwd=tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "mid", "top", cwd=tmp_path)
    assert images.chain(str(tmp_path / "top"), "qcow2") == (
        Layer(str(tmp_path / "top"), "qcow2"), Layer(str(tmp_path / "mid"), "qcow2"),
        Layer(str(tmp_path / "base"), "raw"))


def test_a_backing_file_without_a_recorded_format_is_refused(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "raw", "base", "1M", cwd=tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base", "top", cwd=tmp_path)
    # An older tool's header: the backing-format extension missing (its type
    # overwritten with one nobody knows, which qemu skips).
    top = tmp_path / "top"
    data = top.read_bytes()
    at = data.index(bytes.fromhex("e2792aca"))
    top.write_bytes(data[:at] + bytes.fromhex("0badf00d") + data[at + 4:])
    assert images.read_qcow2_header(str(tmp_path / "top")).backing_format is None
    with pytest.raises(images.UnsafeImage, match="names no format"):
        images.chain(str(tmp_path / "top"), "qcow2")


@pytest.mark.parametrize("target", ["/etc/hostname", "../outside", "sub/inner"])
def test_backing_files_outside_the_volume_directory_are_refused(tmp_path: Path,
                                                                target: str) -> None:
    volume = tmp_path / "vol"
    (volume / "sub").mkdir(parents=True)
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", target, "top", "1M",
             cwd=volume)
    with pytest.raises(images.UnsafeImage, match="lies outside"):
        images.chain(str(volume / "top"), "qcow2")


def test_a_symlink_out_of_the_directory_is_refused(tmp_path: Path) -> None:
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "base").symlink_to("/etc/hostname")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "base", "top", "1M",
             cwd=volume)
    with pytest.raises(images.UnsafeImage, match="lies outside"):
        images.chain(str(volume / "top"), "qcow2")


def test_an_external_data_file_must_lie_in_the_directory(tmp_path: Path) -> None:
    volume = tmp_path / "vol"
    volume.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "inside", "1M",
             cwd=volume)
    header = images.read_qcow2_header(str(volume / "inside"))
    assert header.data_file == "data.raw"
    assert images.chain(str(volume / "inside"), "qcow2") == (
        Layer(str(volume / "inside"), "qcow2"),)
    with pytest.raises(images.UnsafeImage, match="external file"):
        images.check_plain(str(volume / "inside"), header)  # never taken as a spare
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'out.raw'}",
             "outside", "1M", cwd=volume)
    with pytest.raises(images.UnsafeImage, match="lies outside"):
        images.chain(str(volume / "outside"), "qcow2")


def test_unknown_incompatible_features_are_refused(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "top", "1M", cwd=tmp_path)
    path = tmp_path / "top"
    images.check_plain(str(path), images.read_qcow2_header(str(path)))
    data = bytearray(path.read_bytes())
    data[72:80] = (1 << 40).to_bytes(8, "big")
    path.write_bytes(bytes(data))
    with pytest.raises(images.UnsafeImage, match="features"):
        images.check_plain(str(path), images.read_qcow2_header(str(path)))


def test_a_chain_that_loops_is_refused(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", "b", "a", "1M",
             cwd=tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", "a", "b", "1M",
             cwd=tmp_path)
    with pytest.raises(images.UnsafeImage, match="loops"):
        images.chain(str(tmp_path / "a"), "qcow2")


def test_a_chain_behind_a_symlinked_directory_keeps_the_directory_spelling(
        tmp_path: Path) -> None:
    """Libvirt, QEMU and the records name a layer by its overlay's directory
    as configured; a chain read from the headers must say the same names,
    or one file looks like two (REVIEW-2 item 2)."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "images"
    link.symlink_to(real)
    qemu_img("create", "-q", "-f", "raw", "base", "1M", cwd=real)
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base", "mid", cwd=real)
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(real / "mid"), "top",
             cwd=real)
    assert images.chain(str(link / "top"), "qcow2") == (
        Layer(str(link / "top"), "qcow2"), Layer(str(link / "mid"), "qcow2"),
        Layer(str(link / "base"), "raw"))
    assert images.same_file(str(link / "base"), str(real / "base"))
    assert not images.same_file(str(link / "base"), str(real / "mid"))


def test_a_loop_through_two_spellings_is_still_a_loop(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "images").symlink_to(real)
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", "b", "a", "1M",
             cwd=real)
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b",
             str(tmp_path / "images" / "a"), "b", "1M", cwd=real)
    with pytest.raises(images.UnsafeImage, match="loops"):
        images.chain(str(real / "a"), "qcow2")


@pytest.mark.parametrize("path", ["relative/volume", "/v/a/../b/volume", "/v/./a/volume",
                                  "/v//a/volume", "json:{\"driver\": \"file\"}"])
def test_a_layer_gasnap_would_have_to_interpret_makes_the_chain_unusable(path: str) -> None:
    """File names from libvirt's XML or QEMU's graph feed overlay names,
    directory checks and unlinks: only plain absolute ones are acted on
    (REVIEW-2 item 8)."""
    chain = (Layer("/v/a/volume-1.top", "qcow2"), Layer(path, "qcow2"))
    assert images.unplain(chain) is not None
    assert images.unplain(chain[:1]) is None


def test_a_pointer_elsewhere_that_links_back_in_is_refused(tmp_path: Path) -> None:
    """An absolute pointer outside the directory that is a symlink to a file
    inside it: respelled, it would name a file beside the one QEMU reads."""
    volume = tmp_path / "vol"
    volume.mkdir()
    qemu_img("create", "-q", "-f", "raw", "y", "1M", cwd=volume)
    (tmp_path / "victim").symlink_to(volume / "y")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", str(tmp_path / "victim"),
             "top", "1M", cwd=volume)
    with pytest.raises(images.UnsafeImage, match="lies outside"):
        images.chain(str(volume / "top"), "qcow2")


def test_a_chain_naming_its_directory_two_ways_is_unusable(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "images"
    link.symlink_to(real)
    mixed = (Layer(str(link / "top"), "qcow2"), Layer(str(real / "base"), "raw"))
    assert "another way" in (images.chain_problem(mixed) or "")
    assert images.chain_problem((Layer(str(link / "top"), "qcow2"),
                                 Layer(str(link / "base"), "raw"))) is None
    assert images.chain_problem((Layer(str(link / "top"), "qcow2"),
                                 Layer(str(tmp_path / "golden"), "raw"))) is None


def test_relative_pointers_span_directories() -> None:
    assert images.relative_pointer("/v/a/top", "/v/a/base") == "base"
    assert images.relative_pointer("/v/a/top", "/v/b/base") == "../b/base"


async def test_a_cancelled_qemu_img_does_not_outlive_its_call(tmp_path: Path) -> None:
    """REVIEW item 17: a cancelled call (a task cancelled at shutdown) kills
    its qemu-img instead of leaving it writing next to the disks."""
    import asyncio  # noqa: PLC0415

    from gasnap import qemuimg  # noqa: PLC0415

    qemu_img("create", "-q", "-f", "qcow2", "busy.qcow2", "64M", cwd=tmp_path)
    marker = str(tmp_path / "busy.qcow2")
    call = asyncio.create_task(qemuimg.run("bench", "-f", "qcow2", "-c", "100000000", marker))

    def running() -> bool:
        found = subprocess.run(["pgrep", "-f", f"qemu-img bench .*{marker}"],
                               capture_output=True, check=False)
        return found.returncode == 0

    for _ in range(100):
        if running():
            break
        await asyncio.sleep(0.05)
    assert running()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert not running()


def test_a_memory_file_cut_short_or_foreign_is_unusable(tmp_path: Path) -> None:
    """A memory file is used only whole (its size sealed next to it when it
    was made) and only if it is a libvirt save image."""
    memory = tmp_path / "gasnap-memory-g.u"
    memory.write_bytes(images.MEMORY_MAGIC + b"\0" * 4096)
    with pytest.raises(images.MemoryUnusable):
        images.check_memory(str(memory))  # never sealed
    assert images.seal_memory(str(memory)) == 4096 + len(images.MEMORY_MAGIC)
    assert images.check_memory(str(memory)) == 4096 + len(images.MEMORY_MAGIC)
    os.truncate(memory, 2048)
    with pytest.raises(images.MemoryUnusable, match="were written"):
        images.check_memory(str(memory))
    memory.write_bytes(b"QFI\xfb" + b"\0" * (4096 + len(images.MEMORY_MAGIC) - 4))
    with pytest.raises(images.MemoryUnusable, match="not a libvirt memory image"):
        images.check_memory(str(memory))
    images.drop_memory(str(memory))
    assert list(tmp_path.iterdir()) == []


def test_a_memory_file_is_used_only_where_and_as_gasnap_named_it() -> None:
    """REVIEW-2 item 7: a record's memory_file is unlinked and restored only
    if it is gasnap's own name for the group and the domain, in a directory
    of that domain's images (the caller's, from the live domain)."""
    group, dom = "0d5a1b56-3f00-4a4e-9a9e-6e0f8c3f8a11", "5b2e7a61-9d2c-4f8e-8a44-1b9d2c7e4f00"
    other = "7c3e8b72-0e3d-4a9f-9b55-2c0e3d8f5a11"
    here = ["/v/images"]
    ok = f"/v/images/gasnap-memory-{group}.{dom}"
    assert images.memory_name_ok(ok, here, group, dom)
    for path in (f"/v/other/gasnap-memory-{group}.{dom}",  # not in a directory of the domain
                 f"/v/images/../images/gasnap-memory-{group}.{dom}",  # not normal
                 f"images/gasnap-memory-{group}.{dom}",  # relative
                 "/etc/passwd", f"/v/images/volume-a.{dom}",
                 f"/v/images/gasnap-memory-{dom}.{dom}",  # another group's
                 f"/v/images/gasnap-memory-{group}.{other}"):  # another domain's
        assert not images.memory_name_ok(path, here, group, dom), path
    assert not images.memory_name_ok(ok, here, None, dom)
    assert not images.memory_name_ok(ok, here, group, None)
