"""``gasnap metadata serve`` as operators run it: auth on TCP, replicas
sharing one PostgreSQL, volume ids with slashes, and no token in its log."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest
import requests
from aiohttp import web

from conftest import gasnap
from gasnap.metaclient import RemoteMetadata
from gasnap.metadata import Consistency, Finalization, InvalidMarker, NewSnapshot, Status
from metaservice import GASNAP, TOKEN, MetadataServer, free_port
from pgcluster import Cluster


def test_tcp_needs_a_token() -> None:
    refused = gasnap("metadata", "serve", "--listen", f"tcp:127.0.0.1:{free_port()}",
                     check=False, timeout=30)
    assert refused.returncode == 2
    assert "token" in refused.stderr


def test_token_checks_and_secrecy(tmp_path: Path) -> None:
    server = MetadataServer(f"sqlite:///{tmp_path}/m.db", tmp_path / "log").start()
    try:
        url = f"{server.url}/v1/snapshots"
        assert requests.get(url, timeout=5).status_code == 401
        assert requests.get(url, headers={"X-Auth-Token": "wrong"}, timeout=5).status_code == 401
        for headers in ({"X-Auth-Token": TOKEN}, {"Authorization": f"Bearer {TOKEN}"}):
            assert requests.get(url, headers=headers, timeout=5).status_code == 200
        assert requests.get(f"{server.url}/openapi.json", timeout=5).status_code == 200
    finally:
        server.stop()
    assert TOKEN not in server.output()


async def test_replicas_share_one_postgresql(postgres: Cluster, tmp_path: Path) -> None:
    """Two services on one database: what one records, the other serves and moves."""
    db = postgres.new_database()
    first = MetadataServer(db, tmp_path / "a.log").start()
    second = MetadataServer(db, tmp_path / "b.log").start()
    a = RemoteMetadata(first.url, TOKEN, deadline=5)
    b = RemoteMetadata(second.url, TOKEN, deadline=5)
    try:
        new = NewSnapshot("s1", "web1/vda", "n", "", 1 << 40, "2026-01-01T00:00:00Z", "web1")
        created = await a.create_snapshot_metadata(new)
        assert created.volume_id == "web1/vda" and created.size == 1 << 40
        assert await b.create_snapshot_metadata(new) == created  # idempotent across replicas
        final = Finalization(Status.AVAILABLE, "/v/f.s1", "/v/f", Consistency.FILESYSTEM)
        assert (await b.finalize_snapshot_metadata("s1", final)).status is Status.AVAILABLE
        assert [m.id for m in await a.list_snapshots(volume_id="web1/vda")] == ["s1"]
        # A volume's limits set through one replica hold through the other.
        await a.update_volume_limits("web1/vda", {"max_snapshots": 9})
        assert (await b.get_volume_limits("web1/vda")).max_snapshots == 9
    finally:
        await a.close()
        await b.close()
        first.stop()
        second.stop()


async def test_unix_socket_service(tmp_path: Path) -> None:
    """The default listen mode: a unix socket (0660), no token, same protocol."""
    sock = tmp_path / "meta.sock"
    proc = await asyncio.create_subprocess_exec(
        *GASNAP, "metadata", "serve", "--listen", f"unix:{sock}",
        "--db", f"sqlite:///{tmp_path}/m.db",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    client = RemoteMetadata(f"unix:{sock}", deadline=10)
    try:
        new = NewSnapshot("u1", "vol", "n", "", 1, "2026-01-01T00:00:00Z", "dom")
        # The first call also waits for the service to come up (client retries).
        assert (await client.create_snapshot_metadata(new)).status is Status.CREATING
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        assert (await client.get_snapshot("u1")).volume_id == "vol"
    finally:
        await client.close()
        proc.terminate()
        await proc.wait()


async def test_a_service_that_keeps_to_the_contract_alone() -> None:
    """Another implementation of the metadata protocol: its listing has no
    parents and ignores domain, limit and marker.  The agent works them out."""
    records = [{"id": sid, "volume_id": vol, "name": "", "description": "", "size": 1,
                "created_at": f"2026-01-01T00:00:0{i}Z", "domain": dom, "group_id": None,
                "target": "vda", "status": status, "file": None, "backing_file": None,
                "consistency": None, "error": None, "progress": None}
               for i, (sid, vol, dom, status) in enumerate([
                   ("a", "v1", "d1", "available"), ("b", "v2", "d2", "available"),
                   ("c", "v1", "d1", "error"), ("d", "v1", "d1", "available")])]

    async def listing(request: web.Request) -> web.Response:
        volume = request.query.get("volume_id")
        return web.json_response({"snapshots": [
            r for r in records if volume is None or r["volume_id"] == volume]})

    async def one(request: web.Request) -> web.Response:
        return web.json_response({"snapshot": next(
            r for r in records if r["id"] == request.match_info["id"])})

    app = web.Application()
    app.router.add_get("/v1/snapshots", listing)
    app.router.add_get("/v1/snapshots/{id}", one)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    client = RemoteMetadata(f"http://127.0.0.1:{port}", "", deadline=5)
    try:
        metas = await client.list_snapshots()
        assert {m.id: m.parent for m in metas} == {"a": None, "b": None, "c": "a", "d": "a"}
        assert [m.id for m in await client.list_snapshots(domain="d1", limit=2)] == ["a", "c"]
        page = await client.list_snapshots(domain="d1", limit=2, marker="c")
        assert [(m.id, m.parent) for m in page] == [("d", "a")]
        assert [m.id for m in await client.list_snapshots(status=Status.ERROR)] == ["c"]
        with pytest.raises(InvalidMarker):
            await client.list_snapshots(marker="zz")
        assert (await client.get_snapshot("d")).parent == "a"
    finally:
        await client.close()
        await runner.cleanup()
