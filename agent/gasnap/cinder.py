"""Cinder, for which gasnap plays Nova: ``os-update_snapshot_status``.

Real Nova reports every assisted snapshot back to Cinder: ``creating`` with
progress ``90%`` once the overlay is live, ``deleting`` + ``90%`` once a
merge is done, ``error`` / ``error_deleting`` when the work failed.
Cinder's remotefs drivers wait for exactly that (about 10 minutes, then
they mark the snapshot ``error``).  With ``[cinder] url`` set, gasnap does
the same for every create and delete that came through
``os-assisted-volume-snapshots``:

  accepted → an intent in the outbox (SQLite, in the state directory)
  task ends → the intent gets its status
  sender   → python-cinderclient on a keystoneauth1 session, in order,
             retried through Cinder outages; delivered → gone

An intent whose task died with the agent is resolved from the snapshot's
record once recovery has settled it; an update not yet delivered is sent
after a restart.  Cinder's refusals (4xx) are its word: logged, counted,
not retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tenacity import AsyncRetrying, retry_if_exception, wait_exponential, wait_random

from . import metrics
from .errors import ConfigError, GasnapError, Unavailable
from .metadata import MetadataService, SnapshotNotFound, Status
from .secretfile import read_secret
from .sqlitedb import SqliteDB

if TYPE_CHECKING:
    from .tasks import Task

log = logging.getLogger(__name__)

PROGRESS = "90%"  # Nova's word for "my part is done"
RESOLVE_INTERVAL = 5.0  # seconds between looks at intents whose task died
_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    snapshot_id TEXT NOT NULL,
    op TEXT NOT NULL,        -- create | delete
    status TEXT,             -- NULL: the work's outcome is not known yet
    created REAL NOT NULL
);
"""


class CinderError(GasnapError):
    code = "cinder"


class CinderUnavailable(CinderError, Unavailable):
    code = "cinder_unavailable"


@dataclass(frozen=True)
class CinderSettings:
    """``[cinder]``: Cinder's endpoint and how to authenticate to it."""

    url: str  # Cinder's endpoint with the project: http://cinder:8776/v3/PROJECT_ID
    token_file: str = ""  # a static token (keystoneauth1's token_endpoint)
    auth_url: str = ""  # or a Keystone session: these, as Nova's [cinder] section has them
    username: str = ""
    password_file: str = ""
    project_name: str = ""
    user_domain_name: str = "Default"
    project_domain_name: str = "Default"
    ca_file: str = ""

    def check(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"cinder.url must be http(s)://HOST:PORT/v3/PROJECT, not "
                              f"{self.url!r}")
        keystone = (self.auth_url, self.username, self.password_file, self.project_name)
        if bool(self.token_file) == any(keystone):
            raise ConfigError("[cinder] takes token_file, or auth_url, username, "
                              "password_file and project_name: one of the two")
        if not self.token_file and not all(keystone):
            raise ConfigError("[cinder] auth_url, username, password_file and project_name "
                              "go together")


def _client(settings: CinderSettings) -> Any:
    """A cinderclient on a keystoneauth1 session (imported here: only hosts
    that play Nova need them).  Secrets are read now, from their files."""
    from cinderclient import client as cinder_client  # noqa: PLC0415
    from keystoneauth1 import session, token_endpoint  # noqa: PLC0415
    from keystoneauth1.identity import v3  # noqa: PLC0415

    auth: Any
    if settings.token_file:
        auth = token_endpoint.Token(settings.url, read_secret(settings.token_file,
                                                              "cinder.token_file"))
    else:
        auth = v3.Password(auth_url=settings.auth_url, username=settings.username,
                           password=read_secret(settings.password_file, "cinder.password_file"),
                           project_name=settings.project_name,
                           user_domain_name=settings.user_domain_name,
                           project_domain_name=settings.project_domain_name)
    sess = session.Session(auth=auth, verify=settings.ca_file or True, timeout=30)
    return cinder_client.Client("3", session=sess, endpoint_override=settings.url)


_AUTH = (401, 403)  # gasnap's credentials, not the report: authenticate again


def _http_status(err: BaseException) -> int | None:
    from cinderclient import exceptions as cinder_errors  # noqa: PLC0415
    from keystoneauth1 import exceptions as ks_errors  # noqa: PLC0415

    if isinstance(err, cinder_errors.ClientException):
        return int(err.code) if err.code is not None else None
    if isinstance(err, ks_errors.HttpError):
        return err.http_status
    return None


def _unauthorized(err: BaseException) -> bool:
    """An expired or rotated token (or a password changed): the report is
    fine, gasnap's credentials are not."""
    return _http_status(err) in _AUTH


def _transient(err: BaseException) -> bool:
    """Worth another try: Cinder or Keystone away or failing (5xx), or
    credentials to take again (401/403)."""
    from cinderclient import exceptions as cinder_errors  # noqa: PLC0415
    from keystoneauth1 import exceptions as ks_errors  # noqa: PLC0415

    if isinstance(err, (cinder_errors.ClientException, ks_errors.HttpError)):
        status = _http_status(err)
        return status is None or status >= 500 or status in _AUTH
    return isinstance(err, (ks_errors.ConnectionError, ks_errors.AuthorizationFailure,
                            OSError))


def _refused(err: BaseException) -> bool:
    """Cinder's word on the report itself: a 4xx other than 401/403."""
    status = _http_status(err)
    return status is not None and 400 <= status < 500 and status not in _AUTH


class CinderReporter:
    def __init__(self, settings: CinderSettings, path: Path,
                 metadata: MetadataService) -> None:
        settings.check()
        self.settings = settings
        self._db = SqliteDB(path, _SCHEMA)
        self._metadata = metadata
        self._wake = asyncio.Event()
        self._followed: set[int] = set()  # intents a running task will resolve
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: Any = None

    # --- the workflow's side ----------------------------------------------------

    async def intend(self, snapshot_id: str, op: str) -> int:
        """Record, before the work is accepted, that Cinder will hear of it."""
        return await self._db.run(lambda c: int(c.execute(
            "INSERT INTO reports (snapshot_id, op, created) VALUES (?, ?, ?)",
            (snapshot_id, op, time.time())).lastrowid or 0))

    async def forget(self, seq: int) -> None:
        """The work was refused up front: the caller heard it, Cinder need not."""
        await self._db.run(lambda c: c.execute("DELETE FROM reports WHERE seq = ?", (seq,)))

    def follow(self, seq: int, task: Task) -> None:
        """Resolve intent SEQ with TASK's outcome when it ends."""
        self._followed.add(seq)
        self._spawn(self._await_task(seq, task))

    async def _await_task(self, seq: int, task: Task) -> None:
        """Once TASK ends, its intent is resolved as an orphan's is: from the
        snapshot's record, not from the task.  A task can fail while the
        work goes on (a libvirt outage past its wait hands a finalize or a
        merge to the sweep): Cinder hears how the record ends, and only then."""
        await task.done.wait()
        self._followed.discard(seq)
        self._wake.set()

    async def _resolve(self, seq: int, status: str) -> None:
        await self._db.run(lambda c: c.execute(
            "UPDATE reports SET status = ? WHERE seq = ?", (status, seq)))
        self._wake.set()

    # --- running ------------------------------------------------------------------

    def start(self) -> None:
        self._spawn(self._send_forever())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._db.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_forever(self) -> None:
        """Never ends on an error: the outbox keeps what is not delivered,
        and the next round tries again."""
        while True:
            try:
                await self._send_round()
            except Exception as err:
                log.error("cinder: the outbox could not be sent (%s); trying again", err,
                          exc_info=True)
                await asyncio.sleep(RESOLVE_INTERVAL)

    async def _send_round(self) -> None:
        """Send every resolved report in order; resolve orphans; then wait
        for a task's end (or look at the orphans again)."""
        self._wake.clear()
        rows = await self._db.run(lambda c: c.execute(
            "SELECT seq, snapshot_id, op, status FROM reports ORDER BY seq").fetchall())
        metrics.CINDER_PENDING.set(len(rows))
        for row in rows:
            if row["status"] is None:
                if row["seq"] not in self._followed:
                    await self._resolve_orphan(row["seq"], row["snapshot_id"], row["op"])
                continue
            await self._deliver(row["snapshot_id"], row["status"])
            await self._delivered(int(row["seq"]))
        if not rows or all(r["status"] is None for r in rows):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RESOLVE_INTERVAL)

    async def _delivered(self, seq: int) -> None:
        await self._db.run(lambda c: c.execute("DELETE FROM reports WHERE seq = ?", (seq,)))

    async def _resolve_orphan(self, seq: int, snapshot_id: str, op: str) -> None:
        """An intent whose task died with an earlier agent: its snapshot's
        record says how the work ended, once recovery has settled it."""
        try:
            meta = await self._metadata.get_snapshot(snapshot_id)
            status: Status | None = meta.status
        except SnapshotNotFound:
            status = None  # never recorded (create), or merged away (delete)
        except GasnapError as err:
            log.debug("cinder: %s not resolved yet: %s", snapshot_id, err.message)
            return
        if status in (Status.CREATING, Status.DELETING):
            return  # still being settled
        if op == "create":
            await self._resolve(seq, _status(op, status is Status.AVAILABLE))
        else:
            await self._resolve(seq, _status(op, status is None))

    async def _deliver(self, snapshot_id: str, status: str) -> None:
        async for attempt in AsyncRetrying(
            wait=wait_exponential(multiplier=0.5, max=30) + wait_random(0, 1),
            retry=retry_if_exception(_transient), before_sleep=self._retrying,
            reraise=True,
        ):
            with attempt:
                try:
                    await asyncio.to_thread(self._update, snapshot_id, status)
                except Exception as err:
                    if _unauthorized(err):
                        # The next try builds a new client: the token file is
                        # read again, a Keystone session logs in again.
                        log.warning("cinder: %s; authenticating again", err)
                        self._client = None
                    if not _refused(err):
                        raise  # retried here when transient, else by the next round
                    log.error("cinder refused %s of snapshot %s: %s", status, snapshot_id, err)
                    metrics.CINDER_UPDATES.labels(status, "refused").inc()
                    return
        metrics.CINDER_UPDATES.labels(status, "delivered").inc()
        log.info("cinder: snapshot %s is %s (%s)", snapshot_id, status, PROGRESS)

    def _update(self, snapshot_id: str, status: str) -> None:
        if self._client is None:
            self._client = _client(self.settings)
        self._client.volume_snapshots.update_snapshot_status(
            snapshot_id, {"status": status, "progress": PROGRESS})

    @staticmethod
    def _retrying(state: Any) -> None:
        failure = state.outcome.exception() if state.outcome else None
        log.warning("cinder unreachable (%s); the update waits (attempt %d)", failure,
                    state.attempt_number)


def _status(op: str, succeeded: bool) -> str:
    if op == "create":
        return "creating" if succeeded else "error"
    return "deleting" if succeeded else "error_deleting"
