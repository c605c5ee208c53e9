"""``gasnap metadata serve`` as a real process on a free TCP port, with a token.

It can be stopped and started again on the same port and database, which is
how the tests make a metadata-service outage.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

GASNAP = [sys.executable, "-m", "gasnap.cli.main"]
TOKEN = "meta-s3cret"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_cert(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for HOST (an IP) and its key, made by openssl:
    the CA file a client checks it against is the certificate itself."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={host}",
                    "-addext", f"subjectAltName=IP:{host}"], check=True, capture_output=True)
    key.chmod(0o600)
    return cert, key


def secret_file(path: Path, secret: str) -> Path:
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


class MetadataServer:
    def __init__(self, db_url: str, log: Path, token: str = TOKEN,
                 tls: tuple[Path, Path] | None = None,
                 env: dict[str, str] | None = None) -> None:
        """TLS: (certificate, key) to serve https with; the token then comes
        from a root-only file, as production runs it.  ENV: the service's
        own (say, how long its stand-in Keystone's tokens are good)."""
        self.env = env or {}
        self.db_url = db_url
        self.log = log
        self.token = token
        self.tls = tls
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MetadataServer:
        args = [*GASNAP, "metadata", "serve", "--listen", f"tcp:127.0.0.1:{self.port}",
                "--db", self.db_url]
        if self.tls is None:
            args += ["--token", self.token]
        else:
            token_file = secret_file(self.log.with_name("metadata.token"), self.token)
            args += ["--token-file", str(token_file), "--tls-cert", str(self.tls[0]),
                     "--tls-key", str(self.tls[1])]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"metadata service exited: {self.output()}"
            try:
                if requests.get(f"{self.url}/openapi.json", timeout=1,
                                verify=str(self.tls[0]) if self.tls else True).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise AssertionError("the metadata service did not listen in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def kill(self) -> None:
        """Gone at once, as a crash or a host losing power takes it (a
        graceful stop waits for the requests its clients have open)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(20)

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, headers={"X-Auth-Token": self.token}, timeout=10,
                            verify=str(self.tls[0]) if self.tls else True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")
