"""The Vagrantfile: valid for Vagrant with the libvirt provider (boxes cannot
be downloaded here, so ``vagrant up`` is not run)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def validate(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["vagrant", "validate"], cwd=directory, capture_output=True,
                          text=True, timeout=120, check=False,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(directory),
                               "VAGRANT_DEFAULT_PROVIDER": "libvirt"})


def test_vagrantfile_validates(tmp_path: Path) -> None:
    ok = validate(ROOT)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "validated successfully" in ok.stdout
    text = (ROOT / "Vagrantfile").read_text()
    assert 'config.vm.box = "debian/bookworm64"' in text
    assert "make setup" in text
    # The provider's options are checked too: a wrong one is caught.
    shutil.copy(ROOT / "Vagrantfile", tmp_path / "Vagrantfile")
    broken = tmp_path / "Vagrantfile"
    broken.write_text(text.replace("lv.cpus = 2", "lv.cpus = 2\n    lv.no_such_option = 1"))
    bad = validate(tmp_path)
    assert bad.returncode != 0 and "no_such_option" in bad.stdout + bad.stderr
