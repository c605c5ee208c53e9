"""Build (once) and cache the lab guests' kernel and initramfs.

Everything comes from Debian packages installed on the host: the kernel
(linux-image-amd64), busybox-static, the kernel modules the guest needs and
qemu-guest-agent with its shared libraries.  The cache key covers all inputs,
so an upgraded package or an edited guest script yields a new image while the
old one stays for the guests that still boot from it.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import lzma
import os
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import GasnapError, Unavailable

log = logging.getLogger(__name__)

CACHE_DIR = Path(os.environ.get("GASNAP_LAB_CACHE", "/var/cache/gasnap/lab"))
BUSYBOX = Path("/bin/busybox")
QEMU_GA = Path("/usr/sbin/qemu-ga")
# In load order: each module's dependencies come before it.
MODULES = (
    "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
    "virtio_blk", "virtio_console", "crc16", "mbcache", "jbd2", "crc32c_generic", "ext4",
)
# guest file -> (path in the initramfs, mode)
GUEST_FILES = {
    "inittab": ("etc/inittab", 0o644),
    "rcS": ("etc/init.d/rcS", 0o755),
    "gasnap-qga": ("sbin/gasnap-qga", 0o755),
    "fsfreeze-hook": ("etc/qemu/fsfreeze-hook", 0o755),
    "shutdown": ("sbin/shutdown", 0o755),
    "gasnap-load": ("usr/bin/gasnap-load", 0o755),
}


class LabImageError(GasnapError):
    code = "lab_image"


class LabPrerequisiteMissing(LabImageError, Unavailable):
    code = "lab_prerequisite_missing"


@dataclass(frozen=True)
class LabImage:
    kernel: Path
    initrd: Path


# Bumped when the layout of a built image changes (2: a PVH kernel).
LAYOUT = "2"
# An ELF note "Xen" of type 18 (XEN_ELFNOTE_PHYS32_ENTRY): QEMU boots such a
# kernel directly (PVH), without the firmware and the kernel's own
# decompression, which take half of a TCG guest's boot.
_PVH_NOTE = re.compile(rb"\x04\x00\x00\x00[\x04\x08]\x00\x00\x00\x12\x00\x00\x00Xen\x00",
                       re.S)


# --- inputs ----------------------------------------------------------------


def _kernel() -> tuple[str, Path]:
    """The newest installed Debian kernel that has modules."""
    found = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*"):
        release = vmlinuz.name.removeprefix("vmlinuz-")
        if Path("/lib/modules", release).is_dir():
            found.append((release, vmlinuz))
    if not found:
        raise LabPrerequisiteMissing("no kernel in /boot with modules (install linux-image-amd64)")
    return max(found, key=lambda item: [int(x) for x in re.findall(r"\d+", item[0])])


def _module_paths(release: str) -> list[Path]:
    moddir = Path("/lib/modules", release)
    index: dict[str, Path] = {}
    for ko in moddir.rglob("*.ko"):
        index[ko.name.removesuffix(".ko").replace("-", "_")] = ko
    builtin_list = moddir / "modules.builtin"
    builtin = builtin_list.read_text() if builtin_list.exists() else ""
    paths = []
    for name in MODULES:
        if name in index:
            paths.append(index[name])
        elif f"/{name}.ko" not in builtin.replace("-", "_"):
            raise LabPrerequisiteMissing(f"kernel module {name} not found for {release}")
    return paths


async def _shared_libraries(binary: Path) -> list[Path]:
    proc = await asyncio.create_subprocess_exec(
        "ldd", str(binary), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise LabImageError(f"ldd {binary}: {err.decode().strip()}")
    libs = re.findall(r"(/\S+\.so[^\s]*)", out.decode())
    return [Path(lib) for lib in dict.fromkeys(libs)]


def _guest_file(name: str) -> bytes:
    return resources.files("gasnap.lab").joinpath("guest").joinpath(name).read_bytes()


def _cache_key(release: str, inputs: list[Path]) -> str:
    digest = hashlib.sha256(f"{LAYOUT}:{release}".encode())
    for path in inputs:
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for name in sorted(GUEST_FILES):
        digest.update(_guest_file(name))
    return digest.hexdigest()[:16]


# --- build -----------------------------------------------------------------


def _install(src: Path, root: Path, dest: str | None = None, mode: int | None = None) -> None:
    target = root / (dest or str(src).lstrip("/"))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src.resolve(), target)
    if mode is not None:
        target.chmod(mode)


def _stage(root: Path, modules: list[Path], libs: list[Path]) -> None:
    _install(BUSYBOX, root, "bin/busybox", 0o755)
    (root / "init").symlink_to("bin/busybox")
    (root / "bin/sh").symlink_to("busybox")
    _install(QEMU_GA, root, "usr/sbin/qemu-ga", 0o755)
    for lib in libs:
        _install(lib, root)
    for ko in modules:
        _install(ko, root, f"lib/modules/{ko.name}")
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/gasnap-modules").write_text(
        "\n".join(ko.name.removesuffix(".ko") for ko in modules) + "\n"
    )
    for name, (dest, mode) in GUEST_FILES.items():
        path = root / dest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_guest_file(name))
        path.chmod(mode)
    for directory in ("proc", "sys", "dev", "run", "tmp", "var/log", "root"):
        (root / directory).mkdir(parents=True, exist_ok=True)


async def _cpio(root: Path, files: list[str], dest: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        "cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0",
        cwd=root, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(("\n".join(files) + "\n").encode())
    if proc.returncode != 0:
        raise LabImageError(f"cpio failed: {err.decode().strip()}")
    await asyncio.to_thread(dest.write_bytes, gzip.compress(out, compresslevel=6))


def _plan(libs: list[Path], rebuild: bool) -> tuple[Path, list[Path], Path, bool]:
    """The kernel, the modules, the image's directory, and whether to build it."""
    release, vmlinuz = _kernel()
    modules = _module_paths(release)
    image_dir = CACHE_DIR / _cache_key(release, [vmlinuz, BUSYBOX, QEMU_GA, *modules, *libs])
    stale = rebuild or not (image_dir / "initrd.img").exists()
    return vmlinuz, modules, image_dir, stale


async def ensure_image(*, rebuild: bool = False) -> LabImage:
    """The cached image for the current inputs, built if needed."""
    for tool in (BUSYBOX, QEMU_GA):
        if not tool.exists():
            raise LabPrerequisiteMissing(f"{tool} missing (busybox-static, qemu-guest-agent)")
    if shutil.which("cpio") is None:
        raise LabPrerequisiteMissing("cpio missing")
    libs = await _shared_libraries(QEMU_GA)
    vmlinuz, modules, image_dir, stale = await asyncio.to_thread(_plan, libs, rebuild)
    if stale:
        log.info("building lab image %s", image_dir)
        await _build(vmlinuz, modules, libs, image_dir)
    pvh = image_dir / "vmlinux"
    return LabImage(pvh if pvh.exists() else image_dir / "vmlinuz", image_dir / "initrd.img")


def _build_tree(
    tmp: Path, vmlinuz: Path, modules: list[Path], libs: list[Path]
) -> tuple[Path, list[str]]:
    """Stage the initramfs under tmp/root; return the output dir and the file list."""
    root = tmp / "root"
    _stage(root, modules, libs)
    out = tmp / "out"
    out.mkdir()
    shutil.copy2(vmlinuz, out / "vmlinuz")
    pvh = pvh_kernel(vmlinuz.read_bytes())
    if pvh is not None:
        (out / "vmlinux").write_bytes(pvh)
    else:
        log.info("%s has no PVH entry gasnap can unpack: guests boot it through firmware "
                 "(slower under TCG)", vmlinuz)
    return out, sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def pvh_kernel(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside BZIMAGE (xz or gzip, as Debian builds them),
    if it has a PVH entry point; else None."""
    for magic, unpack in ((b"\xfd7zXZ\x00", _unxz), (b"\x1f\x8b\x08\x00", _gunzip)):
        at = bzimage.find(magic)
        while at != -1:
            elf = unpack(bzimage[at:])
            if elf is not None and elf.startswith(b"\x7fELF") and _PVH_NOTE.search(elf):
                return elf
            at = bzimage.find(magic, at + 1)
    return None


def _unxz(data: bytes) -> bytes | None:
    try:
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data)
    except lzma.LZMAError:
        return None


def _gunzip(data: bytes) -> bytes | None:
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    except zlib.error:
        return None


async def _build(vmlinuz: Path, modules: list[Path], libs: list[Path], image_dir: Path) -> None:
    await asyncio.to_thread(CACHE_DIR.mkdir, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix=".build-") as tmp:
        out, files = await asyncio.to_thread(_build_tree, Path(tmp), vmlinuz, modules, libs)
        await _cpio(Path(tmp) / "root", files, out / "initrd.img")
        await asyncio.to_thread(shutil.rmtree, image_dir, True)
        os.replace(out, image_dir)  # atomic: a half-built image is never visible
