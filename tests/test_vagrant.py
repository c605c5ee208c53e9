"""The Vagrantfile: valid for Vagrant with the libvirt provider (boxes cannot
be downloaded here, so ``vagrant up`` is not run)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def validate(vagrantfile: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """``vagrant validate`` of VAGRANTFILE in DIRECTORY, a scratch directory:
    Vagrant writes its state (.vagrant, and .vagrant.d under HOME) next to it,
    which must not land in the source tree."""
    directory.mkdir(exist_ok=True)
    (directory / "Vagrantfile").write_text(vagrantfile)
    return subprocess.run(["vagrant", "validate"], cwd=directory, capture_output=True,
                          text=True, timeout=120, check=False,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(directory),
                               "VAGRANT_DEFAULT_PROVIDER": "libvirt"})


def test_vagrantfile_validates(tmp_path: Path) -> None:
    text = (ROOT / "Vagrantfile").read_text()
    ok = validate(text, tmp_path / "ok")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "validated successfully" in ok.stdout
    assert 'config.vm.box = "debian/bookworm64"' in text
    assert "make setup" in text
    # The provider's options are checked too: a wrong one is caught.
    bad = validate(text.replace("lv.cpus = 2", "lv.cpus = 2\n    lv.no_such_option = 1"),
                   tmp_path / "bad")
    assert bad.returncode != 0 and "no_such_option" in bad.stdout + bad.stderr
