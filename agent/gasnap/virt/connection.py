"""The one libvirt connection of the process, the one path every call takes.

libvirt API calls block, so each runs in a worker thread of the
connection's own pool; libvirt's events reach the asyncio loop through
``libvirtaio``, registered once, the first time a connection is opened from a
running loop.  When libvirtd goes away (restart, crash) the close callback
drops the connection and the next call opens a new one.
``libvirt.libvirtError`` never leaves the ``virt`` package: ``call`` maps it
to a ``VirtError`` (or, with another mapper, to a guest-agent error).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import libvirt
import libvirtaio

from .. import hypervisor
from ..errors import Conflict, GasnapError, NotFound

log = logging.getLogger(__name__)

T = TypeVar("T")

KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
LIBVIRT_THREADS = 32  # concurrent libvirt calls (a group of 32 guests freezes at once)

_CONNECTION_ERRORS = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_AUTH_FAILED,
}


# --- errors ----------------------------------------------------------------


class VirtError(GasnapError):
    code = "libvirt"


class LibvirtUnavailable(VirtError, hypervisor.HypervisorUnavailable):
    code = "libvirt_unavailable"


class DomainNotFound(VirtError, NotFound):
    code = "domain_not_found"


class DomainNotRunning(VirtError, Conflict):
    code = "domain_not_running"


class DomainChanged(VirtError, hypervisor.DomainChanged):
    code = "domain_changed"


ErrorMapper = Callable[[libvirt.libvirtError, str], GasnapError]


def is_connection_error(err: libvirt.libvirtError) -> bool:
    return err.get_error_code() in _CONNECTION_ERRORS or (
        err.get_error_domain() == libvirt.VIR_FROM_RPC
    )


def map_error(err: libvirt.libvirtError, what: str) -> GasnapError:
    code = err.get_error_code()
    message = f"{what}: {err.get_error_message()}"
    if is_connection_error(err):
        return LibvirtUnavailable(message)
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainNotFound(message)
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return DomainNotRunning(message)
    return VirtError(message)


# --- process-wide libvirt set-up -------------------------------------------


class _LoopThreadProxy:
    """The asyncio loop as libvirtaio sees it, safe to use from any thread.

    libvirt calls the event implementation from whatever thread is inside a
    libvirt API call, and gasnap makes those calls in worker threads.
    libvirtaio then touches the loop directly (``add_reader``, tasks for
    timers and free callbacks), which asyncio only allows on the loop's own
    thread.  This proxy hands such calls to the loop thread instead.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.get_ident()

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread

    def _defer(self, method: str, *args: Any) -> None:
        if self._loop.is_closed():
            return  # the process is exiting: nothing is watched any more
        if self._on_loop_thread():
            getattr(self._loop, method)(*args)
        else:
            self._loop.call_soon_threadsafe(getattr(self._loop, method), *args)

    def add_reader(self, fd: int, callback: Callable[..., None], *args: Any) -> None:
        self._defer("add_reader", fd, callback, *args)

    def remove_reader(self, fd: int) -> None:
        self._defer("remove_reader", fd)

    def add_writer(self, fd: int, callback: Callable[..., None], *args: Any) -> None:
        self._defer("add_writer", fd, callback, *args)

    def remove_writer(self, fd: int) -> None:
        self._defer("remove_writer", fd)

    def create_task(self, coro: Coroutine[Any, Any, Any], **kwargs: Any) -> Any:
        if self._loop.is_closed():
            coro.close()
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            done.cancel()
            return done
        if self._on_loop_thread():
            return self._loop.create_task(coro, **kwargs)
        # A concurrent future: libvirtaio only ever cancels what it gets back.
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


_event_loop: asyncio.AbstractEventLoop | None = None


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; gasnap reports its own."""


libvirt.registerErrorHandler(_ignore_libvirt_error, None)


def _register_event_loop() -> None:
    """libvirt accepts one event implementation per process, forever."""
    global _event_loop  # noqa: PLW0603 - process-wide by libvirt's design
    loop = asyncio.get_running_loop()
    if _event_loop is None:
        libvirtaio.virEventAsyncIOImpl(loop=_LoopThreadProxy(loop)).register()
        _event_loop = loop
    elif _event_loop is not loop:
        raise VirtError("libvirt events are already bound to another asyncio loop")


async def _settle() -> None:
    """Let the loop run what libvirt handed over while a connection closed
    (handle removals, free callbacks), so nothing is left for a closed loop."""
    for _ in range(4):
        await asyncio.sleep(0)


# --- the connection --------------------------------------------------------

# Called with each new virConnect, in a worker thread: event registrations
# are per connection, so after a reconnect the new one gets them again.
OnOpen = Callable[[libvirt.virConnect], None]


class Connection:
    """The process's connection to URI, reopened on demand."""

    def __init__(self, uri: str, on_open: OnOpen | None = None) -> None:
        self.uri = uri
        self._on_open = on_open
        # Its own threads: asyncio's default pool has cores + 4 of them (6
        # on a 2-core host), so the 7th guest of a group would wait for a
        # thread to freeze, inside the others' freeze window.  These threads
        # mostly wait on libvirtd (guest agents, block jobs), not on the CPU.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            LIBVIRT_THREADS, thread_name_prefix="libvirt")
        self._conn: libvirt.virConnect | None = None
        self._lock = asyncio.Lock()
        self.opened_at = -math.inf  # monotonic: when the connection was last (re)opened

    async def connect(self) -> None:
        await self._connection()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.to_thread(_close, conn)
            await _settle()

    @property
    def connected(self) -> bool:
        # isAlive reads the client's own socket state: no round trip.
        return self._conn is not None and bool(self._conn.isAlive())

    async def _connection(self) -> libvirt.virConnect:
        async with self._lock:
            if self._conn is None:
                _register_event_loop()
                self._conn = await asyncio.to_thread(self._open)
            return self._conn

    def _open(self) -> libvirt.virConnect:
        try:
            conn = libvirt.open(self.uri)
            conn.registerCloseCallback(self._on_close, None)
            conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            if self._on_open is not None:
                self._on_open(conn)
        except libvirt.libvirtError as err:
            raise LibvirtUnavailable(
                f"cannot connect to {self.uri}: {err.get_error_message()}"
            ) from err
        log.info("connected to %s", self.uri)
        self.opened_at = time.monotonic()
        return conn

    def _on_close(self, conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        log.warning("libvirt connection to %s closed (reason %d)", self.uri, reason)
        self._drop(conn)

    def _drop(self, conn: libvirt.virConnect) -> None:
        if self._conn is conn:
            self._conn = None

    async def call(
        self,
        fn: Callable[..., T],
        *args: Any,
        what: str,
        retry: bool = True,
        mapper: ErrorMapper = map_error,
    ) -> T:
        """Run ``fn(conn, *args)`` in a thread.  A connection error drops the
        connection; idempotent calls (``retry``) get one more try on a fresh one,
        which is what makes a libvirtd restart invisible to readers.  A
        connection found dead before the call was sent (libvirtd restarted
        while it sat idle) is replaced for every call: nothing was sent."""
        for attempt in (1, 2):
            conn = await self._connection()
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    self._pool, functools.partial(_alive_call, fn, conn, *args))
            except _Stale:
                self._drop(conn)
                if attempt == 1:
                    log.info("%s: connection found closed, reconnecting", what)
                    continue
                raise LibvirtUnavailable(f"{what}: the connection to libvirtd closed") from None
            except libvirt.libvirtError as err:
                if is_connection_error(err):
                    self._drop(conn)
                    if retry and attempt == 1:
                        log.info("%s: connection lost, reconnecting", what)
                        continue
                raise mapper(err, what) from err
            except SystemError as err:
                # libvirt-python's C layer returned while a Python callback it
                # ran inside the call (the event loop's, the error handler's)
                # had raised: the call failed, or may have, and its caller
                # must settle it as any libvirt failure, not crash past it.
                log.debug("%s: libvirt-python failed", what, exc_info=True)
                raise VirtError(f"{what}: libvirt-python failed ({err}; "
                                f"cause: {err.__cause__ or err.__context__!r})") from err
        raise AssertionError("unreachable")


class _Stale(Exception):
    """The connection was already closed: the call was never sent."""


def _alive_call(fn: Callable[..., T], conn: libvirt.virConnect, *args: Any) -> T:
    # isAlive looks at the client's own socket: no round trip to libvirtd.
    if not conn.isAlive():
        raise _Stale
    return fn(conn, *args)


def _close(conn: libvirt.virConnect) -> None:
    try:
        conn.unregisterCloseCallback()
    except libvirt.libvirtError:
        log.debug("unregisterCloseCallback failed", exc_info=True)
    conn.close()
