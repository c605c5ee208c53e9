"""Wait until a service started by a doc example listens (and, for the
agent, has finished recovery): ``python docwait.py LISTEN [agent]``."""

from __future__ import annotations

import os
import socket
import sys
import time

from gasnap.client import ApiClient


def connectable(listen: str) -> bool:
    if listen.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX)
        address: object = listen.removeprefix("unix:")
    else:
        host, _, port = listen.removeprefix("tcp:").rpartition(":")
        sock = socket.socket()
        address = (host if host not in ("", "0.0.0.0") else "127.0.0.1", int(port))
    with sock:
        return sock.connect_ex(address) == 0  # type: ignore[arg-type]


def main(listen: str, kind: str = "") -> int:
    deadline = time.monotonic() + 60
    while not connectable(listen):
        if time.monotonic() > deadline:
            print(f"docwait: nothing listens on {listen}", file=sys.stderr)
            return 1
        time.sleep(0.1)
    if kind == "agent":
        api = listen if listen.startswith("unix:") else (
            "http://127.0.0.1:" + listen.rpartition(":")[2])
        client = ApiClient(api, token=os.environ.get("TOKEN"))
        while client.get("/v1/health")["recovery"] != "done":
            time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
