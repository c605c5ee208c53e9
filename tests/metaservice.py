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


class MetadataServer:
    def __init__(self, db_url: str, log: Path, token: str = TOKEN) -> None:
        self.db_url = db_url
        self.log = log
        self.token = token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MetadataServer:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*GASNAP, "metadata", "serve", "--listen", f"tcp:127.0.0.1:{self.port}",
                 "--db", self.db_url, "--token", self.token],
                stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"metadata service exited: {self.output()}"
            try:
                if requests.get(f"{self.url}/openapi.json", timeout=1).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise AssertionError("the metadata service did not listen in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, headers={"X-Auth-Token": self.token}, timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")
