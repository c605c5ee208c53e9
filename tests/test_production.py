"""One agent for every caller: its unix socket and TCP with TLS at once,
tokens and passwords read from root-only files (never a command line),
certificates checked by the CLI and by the metadata client, and a warning
when a token would cross the network in the clear."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import GASNAP, URI, gasnap
from gasnap import metrics
from gasnap.client import AgentUnreachable, ApiClient, ApiError
from gasnap.metaclient import MetadataUnauthorized, RemoteMetadata
from gasnap.metadata import NewSnapshot
from metaservice import MetadataServer, free_port, make_cert, secret_file

TOKEN = "tcp-s3cret"


class Served:
    """``gasnap serve --config FILE`` (the config names the listeners)."""

    def __init__(self, base: Path, config: str) -> None:
        self.base = base
        self.log = base / "agent.log"
        (base / "agent.toml").write_text(config)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*GASNAP, "serve", "--config", str(base / "agent.toml"), "--state-dir",
                 str(base / "state"), "--libvirt-uri", URI],
                stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, client: ApiClient) -> None:
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                if client.get("/v1/health")["recovery"] == "done":
                    return
            except AgentUnreachable:
                pass
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture
def tls(tmp_path: Path) -> tuple[Path, Path]:
    directory = tmp_path / "tls"
    directory.mkdir()
    return make_cert(directory)


@pytest.fixture
def both(tmp_path: Path, tls: tuple[Path, Path]) -> Iterator[tuple[Served, Path, int]]:
    """An agent on a unix socket and on TCP with TLS, its token from a file."""
    sock, port = tmp_path / "api.sock", free_port()
    token_file = secret_file(tmp_path / "api.token", TOKEN)
    served = Served(tmp_path, f'[agent]\nlisten = ["unix:{sock}", "tcp:127.0.0.1:{port}"]\n'
                              f'token_file = "{token_file}"\ntls_cert = "{tls[0]}"\n'
                              f'tls_key = "{tls[1]}"\n')
    try:
        served.wait_ready(ApiClient(f"unix:{sock}"))
        yield served, sock, port
    finally:
        served.stop()


def test_one_agent_answers_its_socket_and_tls(both: tuple[Served, Path, int],
                                              tls: tuple[Path, Path], tmp_path: Path) -> None:
    served, sock, port = both
    # The socket (timers, local tools): its file mode guards it, no token.
    assert ApiClient(f"unix:{sock}").get("/v1/health")["status"] == "ok"
    https = f"https://127.0.0.1:{port}"
    assert ApiClient(https, TOKEN, ca_file=str(tls[0])).get("/v1/health")["status"] == "ok"
    with pytest.raises(ApiError) as refused:  # TCP needs the token
        ApiClient(https, ca_file=str(tls[0])).get("/v1/health")
    assert refused.value.code == "unauthorized"
    with pytest.raises(AgentUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
        ApiClient(https, TOKEN).get("/v1/health")  # the system's CAs do not know it
    with pytest.raises(ApiError):  # plain HTTP is not spoken on the TLS port
        ApiClient(f"http://127.0.0.1:{port}", TOKEN).get("/v1/health")
    assert "tls:127.0.0.1" in served.output() and "plain TCP" not in served.output()
    # The CLI reads the token from a file (flag or environment) and checks
    # the certificate against --ca-file.
    token_file = tmp_path / "api.token"
    listed = gasnap("--api", https, "--token-file", str(token_file), "--ca-file", str(tls[0]),
                    "domain", "list", "--json")
    assert isinstance(json.loads(listed.stdout), list)
    env = {"GASNAP_API": https, "GASNAP_TOKEN_FILE": str(token_file),
           "GASNAP_CA_FILE": str(tls[0])}
    by_env = subprocess.run([*GASNAP, "domain", "list", "--json"], capture_output=True,
                            text=True, check=False, env={**os.environ, **env})
    assert by_env.returncode == 0, by_env.stderr


def test_secrets_that_others_can_read_are_refused(tmp_path: Path) -> None:
    loose = tmp_path / "loose.token"
    loose.write_text(TOKEN)
    loose.chmod(0o644)
    port = free_port()
    for config, expected in (
            (f'[agent]\nlisten = "tcp:127.0.0.1:{port}"\ntoken_file = "{loose}"\n',
             "chmod 600"),
            (f'[agent]\nlisten = "tcp:127.0.0.1:{port}"\ntoken = "x"\n'
             f'token_file = "{loose}"\n', "not both"),
            (f'[agent]\nlisten = ["unix:{tmp_path}/s", "unix:{tmp_path}/s"]\n', "twice"),
            (f'[agent]\nlisten = "unix:{tmp_path}/s"\ntls_cert = "{loose}"\n'
             f'tls_key = "{loose}"\n', "TLS is for TCP")):
        (tmp_path / "agent.toml").write_text(config)
        checked = gasnap("serve", "--config", str(tmp_path / "agent.toml"), "--check-config",
                         check=False)
        assert checked.returncode == 2 and expected in checked.stderr, checked.stderr
    service = subprocess.run([*GASNAP, "metadata", "serve", "--listen", f"tcp:127.0.0.1:{port}",
                              "--token-file", str(loose), "--db", f"sqlite:///{tmp_path}/m.db"],
                             capture_output=True, text=True, check=False, timeout=60)
    assert service.returncode == 2 and "chmod 600" in service.stderr


def test_a_token_in_the_clear_beyond_this_host_is_warned_of(tmp_path: Path) -> None:
    sock, port = tmp_path / "api.sock", free_port()
    token_file = secret_file(tmp_path / "api.token", TOKEN)
    served = Served(tmp_path, f'[agent]\nlisten = ["unix:{sock}", "tcp:0.0.0.0:{port}"]\n'
                              f'token_file = "{token_file}"\n')
    try:
        served.wait_ready(ApiClient(f"unix:{sock}"))
        assert "tokens reach tcp:0.0.0.0" in served.output()
        assert "plain TCP" in served.output()
        assert ApiClient(f"http://127.0.0.1:{port}", TOKEN).get("/v1/health")["status"] == "ok"
    finally:
        served.stop()


async def test_the_metadata_client_checks_the_services_certificate(
    tmp_path: Path, tls: tuple[Path, Path]
) -> None:
    server = MetadataServer(f"sqlite:///{tmp_path}/m.db", tmp_path / "service.log",
                            tls=tls).start()
    try:
        assert "--token-file" in " ".join(str(a) for a in server.proc.args)  # type: ignore[union-attr]
        trusted = RemoteMetadata(server.url, server.token, deadline=5, ca_file=str(tls[0]))
        new = NewSnapshot("s1", "v1", "n", "", 1, "2026-11-26T00:00:00Z", "dom")
        assert (await trusted.create_snapshot_metadata(new)).id == "s1"
        await trusted.close()
        untrusted = RemoteMetadata(server.url, server.token, deadline=60)
        retries = metrics.AGENT.get_sample_value("gasnap_metadata_retries_total")
        with pytest.raises(MetadataUnauthorized) as refused:
            await untrusted.list_snapshots()
        assert refused.value.code == "metadata_untrusted"
        # Refused at once: no retry makes an unknown certificate known.
        assert metrics.AGENT.get_sample_value("gasnap_metadata_retries_total") == retries
        await untrusted.close()
    finally:
        server.stop()


def test_the_agent_reaches_its_metadata_service_over_tls(
    tmp_path: Path, tls: tuple[Path, Path]
) -> None:
    """[metadata] url https://..., its token from a file, its certificate
    checked against ca_file: the agent's listing comes from the service."""
    server = MetadataServer(f"sqlite:///{tmp_path}/m.db", tmp_path / "service.log",
                            tls=tls).start()
    sock = tmp_path / "api.sock"
    token_file = secret_file(tmp_path / "meta.token", server.token)
    served = Served(tmp_path, f'[agent]\nlisten = "unix:{sock}"\n'
                              f'[metadata]\nurl = "{server.url}"\n'
                              f'token_file = "{token_file}"\nca_file = "{tls[0]}"\n')
    try:
        client = ApiClient(f"unix:{sock}")
        served.wait_ready(client)
        assert client.get("/v1/snapshots") == {"snapshots": []}
        assert server.token not in served.output()
    finally:
        served.stop()
        server.stop()
