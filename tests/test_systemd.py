"""Operating gasnap as a service: ``make install`` into a prefix, the units
it installs pass ``systemd-analyze verify`` with no complaint, and the agent
and the metadata service speak systemd's readiness protocol."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import GASNAP, URI
from gasnap.client import ApiClient
from metaservice import free_port, secret_file

ROOT = Path(__file__).resolve().parent.parent
UNITS = ["gasnap.service", "gasnap-metadata.service", "gasnap-snapshot@.service",
         "gasnap-snapshot@.timer"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("install")
    subprocess.run(["make", "-C", str(ROOT), "install", f"PREFIX={base}/opt",
                    f"SYSCONFDIR={base}/etc", f"UNITDIR={base}/units"],
                   check=True, capture_output=True, text=True, timeout=900)
    return base


def test_make_install_lays_out_a_prefix(installed: Path) -> None:
    assert sorted(p.name for p in (installed / "units").iterdir()) == sorted(UNITS)
    gasnap = installed / "opt/bin/gasnap"
    assert subprocess.run([str(gasnap), "--help"], check=True, capture_output=True).returncode == 0
    service = (installed / "units/gasnap.service").read_text()
    assert f"ExecStart={installed}/opt/bin/gasnap serve --config {installed}/etc/agent.toml" \
        in service
    config = installed / "etc/agent.toml"
    assert oct(config.stat().st_mode & 0o777) == "0o640"
    checked = subprocess.run([str(gasnap), "serve", "--config", str(config), "--check-config"],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    # A second install keeps the operator's configuration.
    config.write_text(config.read_text() + "\n# edited by the operator\n")
    subprocess.run(["make", "-C", str(ROOT), "install", f"PREFIX={installed}/opt",
                    f"SYSCONFDIR={installed}/etc", f"UNITDIR={installed}/units"],
                   check=True, capture_output=True, timeout=900)
    assert "edited by the operator" in config.read_text()


def test_units_verify_cleanly(installed: Path) -> None:
    units = installed / "units"
    instances = ["gasnap.service", "gasnap-metadata.service",
                 "gasnap-snapshot@nightly.service", "gasnap-snapshot@nightly.timer"]
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", *instances],
                            cwd=units, capture_output=True, text=True, check=False)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stderr
    # The check is real: a typo in a unit is reported.
    broken = units / "gasnap-broken.service"
    broken.write_text((units / "gasnap.service").read_text().replace("Type=notify",
                                                                     "Type=notfy"))
    try:
        bad = subprocess.run(["systemd-analyze", "verify", "--man=no", broken.name],
                             cwd=units, capture_output=True, text=True, check=False)
        assert "Type" in bad.stderr or "type" in bad.stderr
    finally:
        broken.unlink()


def test_units_say_what_the_issue_asks(installed: Path) -> None:
    agent = (installed / "units/gasnap.service").read_text()
    for line in ("Type=notify", "Restart=on-failure", "ProtectSystem=strict",
                 "NoNewPrivileges=yes", "PrivateTmp=yes", "ReadWritePaths=-/var/lib/gasnap"):
        assert line in agent
    timer = (installed / "units/gasnap-snapshot@.timer").read_text()
    for line in ("OnCalendar=daily", "RandomizedDelaySec=", "Persistent=true"):
        assert line in timer
    oneshot = (installed / "units/gasnap-snapshot@.service").read_text()
    assert "Type=oneshot" in oneshot and "schedule run %i" in oneshot


# --- readiness -----------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(90)
    yield sock
    sock.close()


def messages(sock: socket.socket, until: str) -> list[str]:
    seen = []
    while not any(until in m for m in seen):
        seen.append(sock.recv(4096).decode())
    return seen


def test_agent_is_ready_only_when_listening_and_recovered(
    notify_socket: socket.socket, tmp_path: Path
) -> None:
    api = tmp_path / "api.sock"
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.getsockname()}
    proc = subprocess.Popen([*GASNAP, "serve", "--listen", f"unix:{api}", "--state-dir",
                             str(tmp_path / "state"), "--libvirt-uri", URI],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = messages(notify_socket, "READY=1")
        # At the moment systemd hears READY=1, the API answers and recovery is done.
        assert ApiClient(f"unix:{api}").get("/v1/health")["recovery"] == "done"
        assert any("STATUS=" in m for m in ready)
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in "".join(messages(notify_socket, "STOPPING=1"))
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_ready_means_every_listener_answers(
    notify_socket: socket.socket, tmp_path: Path
) -> None:
    """The unit's agent on its socket (the timers' way in) and on TCP for
    Nova-style callers at once: READY=1 comes when both answer."""
    api, port = tmp_path / "api.sock", free_port()
    token = secret_file(tmp_path / "api.token", "unit-s3cret")
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.getsockname()}
    proc = subprocess.Popen([*GASNAP, "serve", "--listen", f"unix:{api}", "--listen",
                             f"tcp:127.0.0.1:{port}", "--token-file", str(token),
                             "--state-dir", str(tmp_path / "state"), "--libvirt-uri", URI],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = "".join(messages(notify_socket, "READY=1"))
        assert f"unix:{api}" in ready and f"tcp:127.0.0.1:{port}" in ready
        assert ApiClient(f"unix:{api}").get("/v1/health")["recovery"] == "done"
        tcp = ApiClient(f"http://127.0.0.1:{port}", token="unit-s3cret")
        assert tcp.get("/v1/health")["recovery"] == "done"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_metadata_service_notifies_too(notify_socket: socket.socket, tmp_path: Path) -> None:
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.getsockname(),
           "GASNAP_METADATA_TOKEN": "from-env"}
    port = free_port()
    proc = subprocess.Popen([*GASNAP, "metadata", "serve", "--listen", f"tcp:127.0.0.1:{port}",
                             "--db", f"sqlite:///{tmp_path}/m.db"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        messages(notify_socket, "READY=1")
        # The token came from the environment (TCP refuses to start without one).
        client = ApiClient(f"http://127.0.0.1:{port}", token="from-env")
        assert client.get("/v1/snapshots") == {"snapshots": []}
    finally:
        proc.terminate()
        proc.wait(30)
