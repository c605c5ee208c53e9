"""``gasnap serve`` as a real process: the API, the CLI through it, doctor,
and recovery from a libvirtd restart."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import libvirtd
from conftest import GASNAP, Agent, gasnap
from gasnap.client import ApiClient, ApiError
from gasnap.hypervisor import Domain
from metaservice import free_port


def test_health(agent: Agent) -> None:
    health = agent.client.get("/v1/health")
    assert health["status"] == "ok"
    assert health["libvirt"] == "connected"


def test_domains_list_the_lab_guest(agent: Agent, guest: Domain) -> None:
    domains = {d["name"]: d for d in agent.client.get("/v1/domains")["domains"]}
    rec = domains[guest.name]
    assert rec["state"] == "running"
    assert rec["guest_agent"] == "connected"
    assert [v["volume_id"] for v in rec["volumes"]] == [v.volume_id for v in guest.volumes]
    for vol in rec["volumes"]:
        assert vol["chain"][0] == vol["active_file"]
    assert agent.client.get(f"/v1/domains/{guest.name}") == rec


def test_unknown_domain_is_a_404_json_error(agent: Agent) -> None:
    with pytest.raises(ApiError) as info:
        agent.client.get("/v1/domains/gt-does-not-exist")
    assert info.value.details["status"] == 404
    assert info.value.code == "domain_not_found"
    assert "gt-does-not-exist" in info.value.message


def test_unknown_route_is_a_404_json_error(agent: Agent) -> None:
    with pytest.raises(ApiError) as info:
        agent.client.get("/v1/nothing-here")
    assert info.value.details["status"] == 404
    assert info.value.code == "not_found"


def test_socket_is_not_world_accessible(agent: Agent) -> None:
    path = Path(agent.api.removeprefix("unix:"))
    assert path.stat().st_mode & 0o777 == 0o660


def test_cli_domain_list_goes_through_the_api(agent: Agent, guest: Domain) -> None:
    records = json.loads(gasnap("--api", agent.api, "domain", "list", "--json").stdout)
    assert guest.name in [r["name"] for r in records]
    table = gasnap("--api", agent.api, "domain", "list").stdout
    assert guest.name in table
    assert table.splitlines()[0].split()[:3] == ["DOMAIN", "STATE", "AGENT"]


def test_cli_without_an_agent_fails_in_one_line(tmp_path: Path) -> None:
    proc = gasnap("--api", f"unix:{tmp_path}/none.sock", "domain", "list", check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert "cannot reach the gasnap agent" in proc.stderr


def test_doctor(guest: Domain, tmp_path: Path) -> None:
    proc = gasnap("doctor", "--state-dir", str(tmp_path / "state"))
    lines = proc.stdout.splitlines()
    assert any(line.startswith("ok") and "libvirtd" in line for line in lines)
    assert any(line.startswith("ok") and "qemu-img" in line for line in lines)
    assert any(f"guest agent {guest.name}: connected" in line for line in lines)
    checks = json.loads(gasnap("doctor", "--json", "--state-dir", str(tmp_path)).stdout)
    assert {c["check"] for c in checks} >= {"libvirtd", "qemu-img", "state dir"}


def test_doctor_fails_when_libvirtd_is_unreachable(tmp_path: Path) -> None:
    proc = gasnap("doctor", "--libvirt-uri", f"qemu+unix:///system?socket={tmp_path}/no.sock",
                  "--state-dir", str(tmp_path), check=False)
    assert proc.returncode == 1
    assert any(line.startswith("FAIL") and "libvirtd" in line
               for line in proc.stdout.splitlines())



def test_tcp_listen_requires_a_token(tmp_path: Path) -> None:
    proc = gasnap("serve", "--listen", f"tcp:127.0.0.1:{free_port()}",
                  "--state-dir", str(tmp_path), check=False, timeout=30)
    assert proc.returncode == 2
    assert "token" in proc.stderr


def test_tcp_with_token(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*GASNAP, "serve", "--listen", f"tcp:127.0.0.1:{port}", "--token", "s3cret-t0ken",
         "--state-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                assert ApiClient(url, "s3cret-t0ken").get("/v1/health")["status"] == "ok"
                break
            except ApiError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with pytest.raises(ApiError) as info:
            ApiClient(url).get("/v1/health")
        assert info.value.details["status"] == 401
        out = json.loads(gasnap("--api", url, "--token", "s3cret-t0ken",
                                "domain", "list", "--json").stdout)
        assert isinstance(out, list)
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=10)[0].decode()
    assert proc.returncode == 0
    assert "s3cret-t0ken" not in output


# --- libvirtd restart ------------------------------------------------------


@pytest.fixture
def restartable_libvirtd() -> Iterator[bool]:
    """libvirtd stopped and started the way the host runs it (tests/libvirtd.py);
    whatever happens, it runs again afterwards."""
    managed = libvirtd.systemd_managed()
    yield managed
    libvirtd.start(managed)


def test_agent_recovers_from_a_libvirtd_restart(
    agent: Agent, guest: Domain, restartable_libvirtd: bool
) -> None:
    assert guest.name in [d["name"] for d in agent.client.get("/v1/domains")["domains"]]
    libvirtd.stop()
    with pytest.raises(ApiError) as info:
        agent.client.get("/v1/domains")
    assert info.value.details["status"] == 503
    assert info.value.code == "libvirt_unavailable"
    libvirtd.start(restartable_libvirtd)
    # libvirtd re-attaches each domain's monitor and agent in the background
    # after it starts, so "absent" may be the truth for a moment.
    deadline = time.monotonic() + 60
    while True:
        try:
            rec = agent.client.get(f"/v1/domains/{guest.name}")
            if rec["guest_agent"] == "connected":
                break
        except ApiError as err:
            assert err.details["status"] == 503, err
        assert time.monotonic() < deadline, "agent did not recover"
        time.sleep(0.2)
    assert rec["state"] == "running"  # QEMU kept running across the restart
    assert agent.client.get("/v1/health")["libvirt"] == "connected"
    assert guest.name in [d["name"] for d in agent.client.get("/v1/domains")["domains"]]
