"""What both HTTP services share: the JSON error document, the token check,
and request parsing helpers that raise ``BadRequest``."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import signal
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from . import sdnotify
from .errors import (
    BadRequest,
    ConfigError,
    Conflict,
    GasnapError,
    InsufficientStorage,
    NotFound,
    NotSupported,
    Unavailable,
    from_os_error,
)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_STATUS: list[tuple[type[GasnapError], int]] = [
    (BadRequest, 400),
    (NotFound, 404),
    (Conflict, 409),
    (Unavailable, 503),
    (InsufficientStorage, 507),
    (NotSupported, 501),
]


def status_for(err: GasnapError) -> int:
    for category, status in _STATUS:
        if isinstance(err, category):
            return status
    return 500


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _check_text(value: str, what: str) -> None:
    """Text that every store and log can hold: valid UTF-8, no NUL."""
    try:
        value.encode()
    except UnicodeEncodeError as err:
        raise BadRequest(f"{what} is not valid UTF-8", code="invalid_request") from err
    if "\x00" in value:
        raise BadRequest(f"{what} contains a NUL character", code="invalid_request")


def _check_tree(doc: Any, what: str) -> None:
    if isinstance(doc, str):
        _check_text(doc, what)
    elif isinstance(doc, dict):
        for key, value in doc.items():
            _check_text(key, what)
            _check_tree(value, f"{what}.{key}")
    elif isinstance(doc, list):
        for item in doc:
            _check_tree(item, what)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as the contract's JSON error document."""
    try:
        _check_tree(dict(request.match_info), "the path")
        _check_tree(dict(request.query), "the query")
        return await handler(request)
    except GasnapError as err:
        status = status_for(err)
        if status == 500:  # no category: the operator's report needs where it came from
            log.error("%s %s: %s", request.method, request.path, err, exc_info=True)
        elif status > 500:
            log.error("%s %s: %s", request.method, request.path, err)
            log.debug("traceback", exc_info=True)  # a known outage: its cause is the message
        return error_response(status, err.code, err.message)
    except OSError as exc:
        # The host refused something no handler expected: named, errno and
        # file, never a bare errno text; where from is in the log.
        mapped = from_os_error(exc)
        log.error("%s %s: %s", request.method, request.path, mapped.message, exc_info=True)
        return error_response(status_for(mapped), mapped.code, mapped.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason)
    except Exception as exc:
        # A bug: its traceback is what the operator's report needs.
        log.error("%s %s: internal error: %s", request.method, request.path, exc,
                  exc_info=True)
        return error_response(500, "internal", "internal error (see the service's log)")


def _on_unix_socket(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family == socket.AF_UNIX


def token_middleware(token: str, open_paths: frozenset[str] = frozenset(), *,
                     tcp_only: bool = False,
                     also: Callable[[str], bool] | None = None) -> Middleware:
    """``Authorization: Bearer T`` or OpenStack's ``X-Auth-Token: T``, compared in
    constant time; OPEN_PATHS (the spec, metrics) need none, nor (TCP_ONLY)
    requests on a unix socket, which its file mode guards.  ALSO: whether
    another token is good now (one a stand-in Keystone issued)."""
    expected = token.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in open_paths or (tcp_only and _on_unix_socket(request)):
            return await handler(request)
        auth = request.headers.get("Authorization", "")
        given = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        given = given or request.headers.get("X-Auth-Token", "")
        if not hmac.compare_digest(given.encode(), expected) and not (
                also is not None and given and also(given)):
            return error_response(401, "unauthorized", "missing or wrong token")
        return await handler(request)

    return check


# --- request parsing ----------------------------------------------------------


async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        doc = await request.json()
    except ValueError as err:
        raise BadRequest("the body is not valid JSON", code="invalid_json") from err
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_json")
    _check_tree(doc, "the body")
    return doc


def get_string(doc: dict[str, Any], key: str, default: str | None = None) -> str | None:
    value = doc.get(key, default)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{key} must be a string", code="invalid_request")
    return value


def roots_query(request: web.Request) -> bool:
    """``?roots=true|false`` (absent: false)."""
    value = request.query.get("roots", "false")
    if value not in ("true", "false"):
        raise BadRequest("roots must be true or false", code="invalid_request")
    return value == "true"


def get_object(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise BadRequest(f"{key} must be an object", code="invalid_request")
    return value


def one_action(doc: dict[str, Any], allowed: Sequence[str], code: str = "invalid_request"
               ) -> tuple[str, dict[str, Any]]:
    """An action body in Cinder's style: one key, one of ALLOWED, naming an object."""
    if len(doc) != 1 or next(iter(doc)) not in allowed:
        raise BadRequest(f"the body must hold exactly one of {list(allowed)}", code=code)
    name = next(iter(doc))
    value = doc[name]
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be an object", code=code)
    return name, value


def only_keys(doc: dict[str, Any], allowed: set[str], where: str = "the body") -> None:
    unknown = set(doc) - allowed
    if unknown:
        raise BadRequest(f"unknown fields in {where}: {sorted(unknown)}",
                         code="invalid_request")


# --- running ------------------------------------------------------------------


MAX_LIMIT = 1000  # Cinder's osapi_max_limit: the largest page a caller may ask for


def page_query(request: web.Request) -> tuple[int | None, str | None]:
    """``?limit=N&marker=ID`` of a listing: no limit means every record."""
    raw = request.query.get("limit")
    limit = None
    if raw is not None:
        # isascii: "²".isdigit() is true and int("²") raises
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
            raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}",
                             code="invalid_limit")
        limit = int(raw)
    marker = request.query.get("marker")
    if marker is not None:
        _check_text(marker, "marker")
    return limit, marker


def page_answer(key: str, items: list[dict[str, Any]], limit: int | None) -> dict[str, Any]:
    """ITEMS were read with LIMIT + 1: the extra one only tells that there is
    a next page, whose marker is the last id of this one."""
    if limit is None or len(items) <= limit:
        return {key: items}
    return {key: items[:limit], "next_marker": str(items[limit - 1]["id"])}


def _prepare_socket(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise ConfigError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # stale: nobody listens
    else:
        raise ConfigError(f"another service already listens on {path}")
    finally:
        probe.close()


def server_tls(cert: str, key: str) -> ssl.SSLContext:
    """A server's TLS context from PEM files (TLS 1.2 at least)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"TLS: cannot load {cert} and {key}: {err}") from err
    return context


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def warn_plain_tokens(listen: Sequence[str], tls: bool, what: str) -> None:
    """A token sent over plain TCP beyond this host can be read on the way."""
    if tls:
        return
    for address in listen:
        if address.startswith("tcp:"):
            host = address.removeprefix("tcp:").rpartition(":")[0] or "127.0.0.1"
            if not _loopback(host):
                log.warning("%s: tokens reach %s over plain TCP, readable on the way; "
                            "configure TLS (tls_cert, tls_key)", what, address)


async def _start_site(runner: web.AppRunner, address: str,
                      tls: ssl.SSLContext | None) -> None:
    if address.startswith("unix:"):
        path = Path(address.removeprefix("unix:"))
        _prepare_socket(path)
        await web.UnixSite(runner, str(path)).start()
        os.chmod(path, 0o660)
    else:
        host, _, port = address.removeprefix("tcp:").rpartition(":")
        await web.TCPSite(runner, host or "127.0.0.1", int(port), ssl_context=tls).start()


async def run_app(app: web.Application, listen: Sequence[str], what: str,
                  ready: Callable[[], Awaitable[object]] | None = None,
                  tls: ssl.SSLContext | None = None) -> None:
    """Serve APP on every address of LISTEN (``unix:PATH``, mode 0660, or
    ``tcp:HOST:PORT``, with TLS when given) until SIGTERM or SIGINT.  Tells
    systemd READY=1 once it listens everywhere and READY (if given) has
    returned."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    announce: asyncio.Task[None] | None = None
    shown = ", ".join(a.replace("tcp:", "tls:") if tls and a.startswith("tcp:") else a
                      for a in listen)
    try:
        for address in listen:
            await _start_site(runner, address, tls)
        log.info("%s listening on %s", what, shown)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        async def announce_ready() -> None:
            if ready is not None:
                await ready()
            sdnotify.notify(f"READY=1\nSTATUS={what} ready on {shown}")
            log.info("%s ready", what)

        announce = asyncio.create_task(announce_ready())
        await stop.wait()
    finally:
        log.info("%s stopping", what)
        sdnotify.notify("STOPPING=1")
        if announce is not None:
            announce.cancel()
        await runner.cleanup()
