"""The HTTP layer's own rules, without a hypervisor behind it: error mapping
and token checks (libvirt's real answers are covered in test_agent.py)."""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gasnap import httpkit
from gasnap.api import app as app_module
from gasnap.config import Settings
from gasnap.errors import BadRequest, Conflict, GasnapError, NotFound, NotSupported, Unavailable


def make_app(error: Exception) -> web.Application:
    async def boom(_request: web.Request) -> web.Response:
        raise error

    app = web.Application(middlewares=[httpkit.errors_middleware])
    app.router.add_get("/boom", boom)
    return app


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (BadRequest("bad name"), 400, "bad_request"),
        (NotFound("no such domain", code="domain_not_found"), 404, "domain_not_found"),
        (Conflict("volume busy"), 409, "conflict"),
        (Unavailable("libvirtd down"), 503, "unavailable"),
        (GasnapError("odd"), 500, "internal"),
        (RuntimeError("secret detail"), 500, "internal"),
        (OSError(errno.ENAMETOOLONG, "File name too long", "/v/x"), 500, "name_too_long"),
        (OSError(errno.ENOSPC, "No space left on device", "/v/x"), 507,
         "insufficient_space"),
        (PermissionError(errno.EACCES, "Permission denied", "/v/x"), 500, "host_io"),
        (NotSupported("no RAM to restore"), 501, "not_supported_on_backend"),
    ],
)
async def test_errors_become_json(error: Exception, status: int, code: str) -> None:
    async with TestClient(TestServer(make_app(error))) as client:
        resp = await client.get("/boom")
        assert resp.status == status
        body = await resp.json()
        assert body["error"]["code"] == code
        assert "secret detail" not in body["error"]["message"]
        missing = await client.get("/nope")
        assert missing.status == 404
        assert (await missing.json())["error"]["code"] == "not_found"


async def test_an_os_error_is_named_not_bare() -> None:
    error = OSError(errno.ENAMETOOLONG, "File name too long", "/v/volume-x.y")
    async with TestClient(TestServer(make_app(error))) as client:
        body = await (await client.get("/boom")).json()
    assert body["error"]["message"] == "File name too long (ENAMETOOLONG): /v/volume-x.y"


@pytest.mark.parametrize("error", [GasnapError("odd"), OSError(errno.EIO, "I/O error")])
async def test_every_500_is_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    with caplog.at_level(logging.ERROR, logger="gasnap.httpkit"):
        async with TestClient(TestServer(make_app(error))) as client:
            assert (await client.get("/boom")).status == 500
    (record,) = [r for r in caplog.records if r.name == "gasnap.httpkit"]
    assert record.levelno == logging.ERROR and record.exc_info is not None


async def test_a_bug_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """The caller sees no detail; the operator's log has the whole traceback
    at ERROR (REVIEW item 17: it used to be at DEBUG only)."""
    with caplog.at_level(logging.ERROR, logger="gasnap.httpkit"):
        async with TestClient(TestServer(make_app(RuntimeError("secret detail")))) as client:
            assert (await client.get("/boom")).status == 500
    (record,) = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info is not None


@pytest.fixture
async def tcp_client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    settings = Settings(listen="tcp:127.0.0.1:0", token="t0ken",
                        libvirt_uri="test:///default")
    async with TestClient(TestServer(app_module.create_app(settings))) as client:
        yield client


async def test_tcp_needs_the_token(tcp_client: TestClient[web.Request, web.Application]) -> None:
    assert (await tcp_client.get("/v1/health")).status == 401
    bad = await tcp_client.get("/v1/health", headers={"Authorization": "Bearer nope"})
    assert bad.status == 401
    for headers in ({"Authorization": "Bearer t0ken"}, {"X-Auth-Token": "t0ken"}):
        resp = await tcp_client.get("/v1/health", headers=headers)
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"


@pytest.mark.parametrize("wait", ["nan", "inf", "-inf", "soon"])
async def test_a_wait_that_is_not_a_finite_number_is_refused(
    tcp_client: TestClient[web.Request, web.Application], wait: str
) -> None:
    """REVIEW-2 item 13: nan passes every bound and breaks the loop's timers."""
    resp = await tcp_client.get(f"/v1/tasks/any?wait={wait}",
                                headers={"Authorization": "Bearer t0ken"})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_request"
