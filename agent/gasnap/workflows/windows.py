"""One freeze window per domain at a time: who owns a guest's freeze.

qemu-ga knows one freeze per guest, not who asked for it.  Two creates on
two disks of one domain (Cinder snapshots each volume on its own) would
otherwise freeze the guest once and thaw it twice: the second thaw lands in
the first's window, which then records ``filesystem`` for an image taken
from a thawed guest.  So a window **queues** behind the one running on the
same domain: it starts when the other has thawed and disarmed, and owns its
freeze alone from freeze to thaw.  The wait is bounded by the other
window's own bound (``freeze_timeout``).  Queueing was chosen over joining
a running window because a joined request would change a switch that is
already under way, and the freeze hook's pairs in the guest stay readable.

A live merge starts its block job under the same lock, so a job never
starts inside somebody's window, and a clone's hot-plug or unplug runs under
it (an unplug waits up to ``detach_timeout`` for the guest), so a window's
domain keeps the disks its create named; the window checks them first.
Keys are domain UUIDs: a name can change hands, a UUID cannot.  Groups take
their domains' locks in one order (sorted), so two groups can never wait on
each other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator


class Windows:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def owning(self, domains: Iterable[str]) -> AsyncIterator[None]:
        """Own the freeze of DOMAINS (UUIDs) while the block runs."""
        async with contextlib.AsyncExitStack() as stack:
            for key in sorted(set(domains)):
                stack.enter_context(self._using(key))
                await stack.enter_async_context(self._locks[key])
            yield

    @contextlib.contextmanager
    def _using(self, key: str) -> Iterator[None]:
        # A lock lives while someone holds or waits for it: no entry per
        # domain ever seen.
        self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]
