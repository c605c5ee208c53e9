"""The CLI's socket-level HTTP client, against a real aiohttp server, and the
command line's lazily built parsers.  The client is also what every
agent test talks through."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from conftest import gasnap
from gasnap.client import AgentUnreachable, ApiClient, ApiError, MalformedAnswer, _host_port


async def _chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    for part in (b'{"parts": ', b'[1, 2, ', b"3]}"):
        await response.write(part)
    await response.write_eof()
    return response


async def _echo(request: web.Request) -> web.Response:
    return web.json_response({"method": request.method, "path": request.path_qs,
                              "body": await request.json() if request.can_read_body else None,
                              "auth": request.headers.get("Authorization")})


async def _fail(_request: web.Request) -> web.Response:
    return web.json_response({"error": {"code": "snapshot_not_found", "message": "gone"}},
                             status=404)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real aiohttp server on a unix socket, in a thread of its own."""
    path = tmp_path_factory.mktemp("client") / "api.sock"
    app = web.Application()
    app.router.add_get("/chunked", _chunked)
    app.router.add_route("*", "/echo", _echo)
    app.router.add_get("/fail", _fail)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.UnixSite(runner, str(path)).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"unix:{path}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.run_until_complete(runner.cleanup())
    loop.close()


def test_json_both_ways_with_a_token(server: str) -> None:
    doc = ApiClient(server, token="t0k").request("POST", "/echo?x=1", {"a": [1, "é"]})
    assert doc == {"method": "POST", "path": "/echo?x=1", "body": {"a": [1, "é"]},
                   "auth": "Bearer t0k"}


def test_a_chunked_answer(server: str) -> None:
    assert ApiClient(server).get("/chunked") == {"parts": [1, 2, 3]}


def test_an_error_answer_keeps_the_agents_code(server: str) -> None:
    with pytest.raises(ApiError) as info:
        ApiClient(server).get("/fail")
    assert (info.value.code, info.value.message, info.value.details["status"]) == (
        "snapshot_not_found", "gone", 404)


def test_nobody_listening(tmp_path: Path) -> None:
    with pytest.raises(AgentUnreachable):
        ApiClient(f"unix:{tmp_path}/none.sock").get("/v1/health")


def test_not_http_at_all(tmp_path: Path) -> None:
    path = tmp_path / "liar.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def answer() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"SSH-2.0-OpenSSH\r\n")
        conn.close()

    thread = threading.Thread(target=answer)
    thread.start()
    with pytest.raises(MalformedAnswer):
        ApiClient(f"unix:{path}").get("/v1/health")
    thread.join()
    listener.close()


@pytest.mark.parametrize(("netloc", "expected"), [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)), ("agent", ("agent", 80)),
    ("[::1]:9", ("::1", 9)), ("[::1]", ("::1", 80)),
])
def test_host_and_port(netloc: str, expected: tuple[str, int]) -> None:
    assert _host_port(netloc, 80) == expected


# --- the command line's parsers ---------------------------------------------------


def test_help_lists_every_command() -> None:
    out = gasnap("--help").stdout
    for command in ("serve", "schedule", "domain", "snapshot", "task", "metadata", "lab",
                    "doctor", "demo"):
        assert f"\n    {command} " in out


def test_a_group_and_its_actions_parse() -> None:
    assert "--quiesce {required,preferred,off}" in gasnap("snapshot", "create", "--help").stdout
    wrong = gasnap("snapshot", "create", check=False)
    assert wrong.returncode == 2 and "DOMAIN" in wrong.stderr
    unknown = gasnap("frobnicate", check=False)
    assert unknown.returncode == 2 and "invalid choice: 'frobnicate'" in unknown.stderr
