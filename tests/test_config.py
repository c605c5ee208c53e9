"""Settings: file, then flags; bad input names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gasnap import config
from gasnap.errors import ConfigError
from gasnap.metadata import Limits


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_file_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, '[agent]\nstate_dir = "/srv/gasnap"\nfreeze_timeout = 5\n'
                           '[metadata]\nurl = "http://meta:8776"\ntoken = "s3cret"\n')
    settings = config.load(path, {"state_dir": "/tmp/x", "listen": None})
    assert settings.state_dir == Path("/tmp/x")
    assert settings.freeze_timeout == 5.0
    assert settings.metadata_url == "http://meta:8776"
    assert "s3cret" not in repr(settings)
    assert settings.metadata_deadline == 120.0
    flagged = config.load(path, {"metadata_url": "unix:/run/gasnap/metadata.sock"})
    assert flagged.metadata_url == "unix:/run/gasnap/metadata.sock"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[agent]\nlisten_on = "unix:/x"\n', "agent.listen_on"),
        ("[agent]\nfreeze_timeout = \"ten\"\n", "agent.freeze_timeout"),
        ("[agent]\nfreeze_timeout = 0\n", "freeze_timeout"),
        ('[metadata]\nurl = 3\n', "metadata.url"),
        ('[agent]\nlisten = "tcp:127.0.0.1:8000"\n', "token"),
        ("[agent\n", "agent.toml"),
        ('[metadata]\ndeadline = 0\n', "metadata.deadline"),
        ('[metadata]\ndeadline = "soon"\n', "metadata.deadline"),
        ('[metadata]\nurl = "ftp://meta"\n', "metadata.url"),
        ("[agent]\nspare_overlays = 1\n", "agent.spare_overlays"),
        ("[agent]\nmerge_bandwidth = true\n", "agent.merge_bandwidth"),
        ("[agent]\ndetach_timeout = 0\n", "agent.detach_timeout"),
        ("[agent]\nsweep_interval = 0\n", "agent.sweep_interval"),
        ("[limits]\nmin_free_mib = -1\n", "limits.min_free_mib"),
        ('[limits]\nmin_free_mib = "lots"\n', "limits.min_free_mib"),
        ("[limits]\nmax_snapshots = 0\n", "limits.max_snapshots"),
        ("[limits]\nsoft_limit_percent = 101\n", "limits.soft_limit_percent"),
        ("[limits]\nmax_chain_depth = 1\n", "limits.max_chain_depth"),
        ('[limits]\nauto_delete = "yes"\n', "limits.auto_delete"),
        ("[limits]\nmax_snapshot = 5\n", "limits.max_snapshot"),
        ('[agent]\nhypervisor = "xen"\n', "agent.hypervisor"),
        ('[qmp]\nrundir = "/run"\n', "qmp.rundir"),
        ("[qmp]\nrun_dir = 3\n", "qmp.run_dir"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        config.load(write(tmp_path, text), {})


def test_limits(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, ""), {}).limits_min_free_mib == 256
    assert config.load(write(tmp_path, "[limits]\nmin_free_mib = 0\n"),
                       {}).limits_min_free_mib == 0
    assert config.load(write(tmp_path, ""), {}).limits == Limits(256, 90, False, 64)
    text = ("[limits]\nmax_snapshots = 10\nsoft_limit_percent = 50\nauto_delete = true\n"
            "max_chain_depth = 8\n")
    limits = config.load(write(tmp_path, text), {}).limits
    assert limits == Limits(10, 50, True, 8)
    assert (limits.soft_snapshots, limits.soft_depth) == (5, 4)


def test_spare_overlays_is_a_boolean(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, ""), {}).spare_overlays is True
    off = config.load(write(tmp_path, "[agent]\nspare_overlays = false\n"), {})
    assert off.spare_overlays is False


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml", {})


def test_cinder_section(tmp_path: Path) -> None:
    secret = tmp_path / "cinder.token"
    secret.write_text("t\n")
    secret.chmod(0o600)
    ok = config.load(write(tmp_path, f'[cinder]\nurl = "http://c:8776/v3/p"\n'
                                     f'token_file = "{secret}"\n'), {})
    assert ok.cinder is not None and ok.cinder.url == "http://c:8776/v3/p"
    for text, fragment in (
            ('[cinder]\ntoken_file = "x"\n', "cinder.url is required"),
            ('[cinder]\nurl = "c:8776"\ntoken_file = "x"\n', "cinder.url must be"),
            ('[cinder]\nurl = "http://c/v3/p"\n', "one of the two"),
            ('[cinder]\nurl = "http://c/v3/p"\nusername = "u"\n', "go together"),
            ('[cinder]\nurl = "http://c/v3/p"\ntoken_file = "x"\nusername = "u"\n',
             "one of the two"),
            ('[cinder]\nurl = "http://c/v3/p"\npassword = "x"\n', "cinder.password")):
        with pytest.raises(ConfigError, match=fragment):
            config.load(write(tmp_path, text), {})



def test_the_qmp_backend(tmp_path: Path) -> None:
    default = config.load(write(tmp_path, ""), {})
    assert (default.hypervisor, default.qmp_run_dir) == ("libvirt", Path("/run/gasnap/qemu"))
    settings = config.load(write(tmp_path, '[agent]\nhypervisor = "qmp"\n'
                                           '[qmp]\nrun_dir = "/srv/qemu"\n'), {})
    assert (settings.hypervisor, settings.qmp_run_dir) == ("qmp", Path("/srv/qemu"))
    missing = config.missing_domains(
        config.Settings(hypervisor="qmp", qmp_run_dir=Path("/srv/qemu"),
                        schedules={"n": config.Schedule("n", ("vm1",), 1)}), [])
    assert missing == ["schedules.n.domains: no domain 'vm1' on qmp:/srv/qemu"]


@pytest.mark.parametrize("value", ["nan", "inf", "-1.0", "0"])
def test_a_timeout_must_be_a_positive_finite_number(tmp_path: Path, value: str) -> None:
    """REVIEW-2 item 13: TOML spells nan and inf; either would pass ``<= 0``."""
    with pytest.raises(ConfigError, match=r"agent\.freeze_timeout must be a positive number"):
        config.load(write(tmp_path, f"[agent]\nfreeze_timeout = {value}\n"), {})
