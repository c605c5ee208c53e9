"""P11: a fleet on one metadata service (two replicas, one PostgreSQL).

N simulated agents, each with its own client speaking the metadata
protocol to one of two ``gasnap metadata serve`` replicas (alternately),
on one PostgreSQL that syncs its commits as production's does.  Each
agent records snapshots of its own volume (create-snapshot-metadata, then
finalize-snapshot-metadata), the fleet together offering the goal's 500
calls per second, each agent from a random phase; then the largest fleet
runs back to back, which measures what the pair of replicas can take.  The agents run as
coroutines in a few worker processes (``python -m gasnap.bench.fleet``),
so that N reaches 1000 on two cores; every call's latency is kept.

Reported per N: calls per second served (create and finalize each count
one) and the p99 of a call's latency, against the goal of >= 500 calls/s
with p99 <= 50 ms, and the CPU each part used, which names the bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from ..lab.pgcluster import free_port, private_cluster
from ..metaclient import RemoteMetadata
from ..metadata import Consistency, Finalization, NewSnapshot, Status
from .stats import Figure, p99

TOKEN = secrets.token_urlsafe(24)  # this run's
WORKERS = 4
GOAL_RATE = 500.0
GOAL_P99_MS = 50.0


def fleet(sizes: tuple[int, ...], seconds: float, base: Path) -> list[Figure]:
    figures: list[Figure] = []
    token = base / "fleet.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    with private_cluster(durable=True) as cluster:
        database = cluster.new_database()
        replicas = [_replica(database, token, base / f"replica{r}.log") for r in range(2)]
        try:
            urls = [url for url, _ in replicas]
            for n in sizes:
                figures += _figures(n, *_run(n, seconds, urls, GOAL_RATE))
            # What the pair can take: the largest fleet, every agent back to back.
            latencies, elapsed, cpu = _run(sizes[-1], seconds, urls, 0.0)
            figures.append(Figure(
                "P11", f"capacity: {sizes[-1]} agents back to back, calls per second",
                "calls/s", [len(latencies) / elapsed], None,
                note=f"p99 {p99(latencies) * 1000:.0f} ms (queueing); "
                     f"{_bound(0.0, 0.0, cpu)}"))
        finally:
            for _, proc in replicas:
                proc.terminate()
                proc.wait(30)
    return figures


def _figures(n: int, latencies: list[float], elapsed: float,
             cpu: dict[str, float]) -> list[Figure]:
    rate = len(latencies) / elapsed
    bound = _bound(rate, p99(latencies) * 1000, cpu)
    median_ms = statistics.median(latencies) * 1000
    return [
        Figure("P11", f"fleet of {n} agents offering {GOAL_RATE:.0f} calls/s: calls per "
               "second served", "calls/s", [rate], None,
               note=f"goal >= {GOAL_RATE:.0f}; median call {median_ms:.1f} ms; {bound}"),
        Figure("P11", f"fleet of {n} agents offering {GOAL_RATE:.0f} calls/s: p99 of a call",
               "ms", [x * 1000 for x in latencies], GOAL_P99_MS, note=bound),
    ]


def _replica(database: str, token: Path, log: Path) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gasnap.cli.main", "metadata", "serve", "--listen",
             f"tcp:127.0.0.1:{port}", "--db", database, "--token-file", str(token)],
            stdout=out, stderr=subprocess.STDOUT)
    _wait_listening(port, proc)
    return f"http://127.0.0.1:{port}", proc


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    import socket  # noqa: PLC0415

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("a metadata replica exited at start")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("a metadata replica did not listen")


def _run(n: int, seconds: float, urls: list[str], rate: float
         ) -> tuple[list[float], float, dict[str, float]]:
    """N agents for SECONDS, together offering RATE calls per second (0: each
    as fast as it is answered); every call's latency, the agents' window,
    and the CPU seconds per second each part used."""
    interval = 2 * n / rate if rate else 0.0  # each agent's pair of calls
    per_worker = [n // WORKERS + (1 if w < n % WORKERS else 0) for w in range(WORKERS)]
    before = _cpu_by_part()
    started = time.monotonic()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "gasnap.bench.fleet", json.dumps(
            {"urls": urls, "agents": count, "first": sum(per_worker[:w]), "seconds": seconds,
             "interval": interval})],
        # the token travels in the environment, never on a command line
        stdout=subprocess.PIPE, env={**os.environ, "GASNAP_FLEET_TOKEN": TOKEN})
        for w, count in enumerate(per_worker) if count]
    latencies: list[float] = []
    # Served per second of the agents' window (each runs SECONDS once its
    # process has started); the CPU shares are over the whole wall time.
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 300)
        if proc.returncode != 0:
            raise RuntimeError("a fleet worker failed")
        latencies += json.loads(out)
    elapsed = time.monotonic() - started
    after = _cpu_by_part()
    cpu = {part: (after.get(part, 0.0) - before.get(part, 0.0)) / elapsed for part in after}
    return latencies, seconds, cpu


def _cpu_by_part() -> dict[str, float]:
    """CPU seconds used so far by PostgreSQL, the replicas and the workers."""
    tick = os.sysconf("SC_CLK_TCK")
    parts: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        part = ("postgres" if "postgres" in cmdline else
                "replicas" if "metadata serve" in cmdline else
                "agents" if "gasnap.bench.fleet" in cmdline else None)
        if part:
            parts[part] = parts.get(part, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return parts


def _bound(rate: float, tail_ms: float, cpu: dict[str, float]) -> str:
    busy = ", ".join(f"{part} {share * 100:.0f}%" for part, share in sorted(cpu.items()))
    cores = os.cpu_count() or 1
    if rate >= GOAL_RATE and tail_ms <= GOAL_P99_MS:
        return f"goals met; CPU: {busy} of {cores} cores"
    if sum(cpu.values()) > 0.85 * cores:
        top = max(cpu, key=lambda part: cpu[part])
        return (f"bound: the host's {cores} cores ({busy}); the most: {top}, of which the "
                "simulated agents are a part a real fleet keeps on its own hosts")
    return f"bound: not the CPU ({busy} of {cores} cores): commit latency (fsync) and queueing"


# --- the worker process ---------------------------------------------------------------


async def _agent(number: int, url: str, token: str, until: float,
                 interval: float) -> list[float]:
    """Snapshots recorded back to back (INTERVAL 0: as fast as the service
    answers), or one every INTERVAL seconds from a random phase on."""
    client = RemoteMetadata(url, token, deadline=30)
    latencies = []
    volume = f"fleet-host{number}:vm/vda"
    due = time.monotonic() + random.uniform(0, interval)  # noqa: S311 (a phase, not a secret)
    try:
        while time.monotonic() < until:
            if interval:
                if due >= until:
                    break
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                due += interval
            sid = str(uuid.uuid4())
            started = time.monotonic()
            await client.create_snapshot_metadata(NewSnapshot(
                sid, volume, "fleet", "", 1 << 30, "2026-11-26T00:00:00Z", f"vm{number}"))
            middle = time.monotonic()
            await client.finalize_snapshot_metadata(sid, Finalization(
                Status.AVAILABLE, f"/v/{sid}", "/v/base", Consistency.FILESYSTEM))
            latencies += [middle - started, time.monotonic() - middle]
    finally:
        await client.close()
    return latencies


async def _worker(spec: dict[str, Any]) -> list[float]:
    urls: list[str] = list(spec["urls"])
    token = os.environ["GASNAP_FLEET_TOKEN"]
    until = time.monotonic() + float(spec["seconds"])
    first, count = int(spec["first"]), int(spec["agents"])
    interval = float(spec["interval"])
    runs = await asyncio.gather(*(_agent(first + i, urls[(first + i) % len(urls)], token, until,
                                         interval) for i in range(count)))
    return [x for run in runs for x in run]


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_worker(json.loads(sys.argv[1])))))
