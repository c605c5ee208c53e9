"""A private PostgreSQL cluster for tests and benchmarks: initdb in a temp
dir, a free port, run as the unprivileged ``postgres`` user, removed
afterwards."""

from __future__ import annotations

import glob
import itertools
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (make setup installs it)")
    return Path(found[-1]).parent


@dataclass
class Cluster:
    port: int
    _names: Iterator[int]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://gasnap@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh empty database; its URL."""
        name = f"t{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@contextmanager
def private_cluster(*, durable: bool = False) -> Iterator[Cluster]:
    """DURABLE: fsync as production runs it (benchmarks); tests go without."""
    bindir = _bindir()
    user = pwd.getpwnam("postgres")
    root = Path(tempfile.mkdtemp(prefix="gasnap-pg-"))
    shutil.chown(root, user.pw_uid, user.pw_gid)
    data, port = root / "data", free_port()

    def as_postgres(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, user=user.pw_uid,
                       group=user.pw_gid, cwd=root)

    try:
        as_postgres(str(bindir / "initdb"), "-D", str(data), "-U", "gasnap",
                    "--auth=trust", "--no-sync")
        as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w",
                    "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 "
                    f"-c fsync={'on' if durable else 'off'} -c max_connections=300",
                    "start")
        yield Cluster(port, itertools.count(1))
    finally:
        if (data / "postmaster.pid").exists():
            as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                        "stop")
        shutil.rmtree(root, ignore_errors=True)
