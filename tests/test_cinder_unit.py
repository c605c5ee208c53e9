"""The Cinder reporter's rules without a Cinder: what each outcome becomes,
how an intent whose task died is resolved from its record, and which
failures are retried (real Cinder traffic: test_cinder.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cinderclient import exceptions as cinder_errors
from keystoneauth1 import exceptions as ks_errors

from gasnap import cinder
from gasnap.cinder import CinderReporter, CinderSettings
from gasnap.errors import ConfigError
from gasnap.metadata import SnapshotMeta, SnapshotNotFound, Status
from gasnap.tasks import Task, TaskState


class Records:
    """A metadata service that knows some snapshots' statuses."""

    def __init__(self, statuses: dict[str, Status]) -> None:
        self.statuses = statuses

    async def get_snapshot(self, snapshot_id: str) -> SnapshotMeta:
        if snapshot_id not in self.statuses:
            raise SnapshotNotFound(f"no snapshot {snapshot_id}")
        return SnapshotMeta(snapshot_id, "v", "n", "", 1, "t", "d", None, "vda",
                            self.statuses[snapshot_id])


@pytest.fixture
def settings(tmp_path: Path) -> CinderSettings:
    token = tmp_path / "token"
    token.write_text("t\n")
    token.chmod(0o600)
    return CinderSettings(url="http://cinder.invalid/v3/p", token_file=str(token))


async def delivered(reporter: CinderReporter, sent: list[tuple[str, str]], count: int) -> None:
    for _ in range(200):
        if len(sent) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"only {sent} were sent")


@pytest.mark.parametrize(("op", "ok", "record", "status"), [
    ("create", True, Status.AVAILABLE, "creating"), ("create", False, Status.ERROR, "error"),
    ("create", False, None, "error"),
    ("delete", True, None, "deleting"), ("delete", False, Status.ERROR_DELETING,
                                         "error_deleting"),
    # REVIEW-2 item 10: the task failed (a libvirt outage past its wait), and
    # the sweep finished the work afterwards: Cinder hears the record's end.
    ("create", False, Status.AVAILABLE, "creating"), ("delete", False, None, "deleting"),
])
async def test_a_followed_task_is_reported_as_its_record_ends(
    settings: CinderSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    op: str, ok: bool, record: Status | None, status: str,
) -> None:
    sent: list[tuple[str, str]] = []
    monkeypatch.setattr(CinderReporter, "_update",
                        lambda self, sid, st: sent.append((sid, st)))
    monkeypatch.setattr(cinder, "RESOLVE_INTERVAL", 0.05)
    in_flight = Status.CREATING if op == "create" else Status.DELETING
    records = Records({"s1": in_flight})
    reporter = CinderReporter(settings, tmp_path / "outbox.db", records)  # type: ignore[arg-type]
    reporter.start()
    try:
        task = Task("t1", "snapshot-" + op, frozenset())
        seq = await reporter.intend("s1", op)
        reporter.follow(seq, task)
        task.state = TaskState.SUCCEEDED if ok else TaskState.FAILED
        task.done.set()
        await asyncio.sleep(0.3)
        assert sent == []  # the task ended, the record did not yet: nothing said
        if record is None:
            del records.statuses["s1"]
        else:
            records.statuses["s1"] = record
        await delivered(reporter, sent, 1)
        assert sent == [("s1", status)]
    finally:
        await reporter.close()


@pytest.mark.parametrize(("op", "record", "status"), [
    ("create", Status.AVAILABLE, "creating"), ("create", Status.ERROR, "error"),
    ("create", None, "error"), ("delete", None, "deleting"),
    ("delete", Status.ERROR_DELETING, "error_deleting"),
    ("delete", Status.AVAILABLE, "error_deleting"),
])
async def test_an_intent_whose_task_died_follows_the_record(
    settings: CinderSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    op: str, record: Status | None, status: str,
) -> None:
    """Written by an agent that died: the next one resolves it from the
    record recovery settled, and waits while that is still in flight."""
    sent: list[tuple[str, str]] = []
    monkeypatch.setattr(CinderReporter, "_update",
                        lambda self, sid, st: sent.append((sid, st)))
    monkeypatch.setattr(cinder, "RESOLVE_INTERVAL", 0.05)
    earlier = CinderReporter(settings, tmp_path / "outbox.db", Records({}))  # type: ignore[arg-type]
    await earlier.intend("s1", op)
    await earlier.close()
    in_flight = Status.CREATING if op == "create" else Status.DELETING
    records = Records({"s1": in_flight})
    reporter = CinderReporter(settings, tmp_path / "outbox.db", records)  # type: ignore[arg-type]
    reporter.start()
    try:
        await asyncio.sleep(0.3)
        assert sent == []  # recovery has not settled it yet
        if record is None:
            del records.statuses["s1"]
        else:
            records.statuses["s1"] = record
        await delivered(reporter, sent, 1)
        assert sent == [("s1", status)]
    finally:
        await reporter.close()


def test_what_is_retried() -> None:
    assert cinder._transient(ks_errors.ConnectFailure("refused"))
    assert cinder._transient(cinder_errors.ClientException(503, "busy"))
    # REVIEW-2 item 11: an expired or rotated token is gasnap's to renew,
    # never Cinder refusing the report.
    for unauthorized in (cinder_errors.Unauthorized(401, "expired"),
                         cinder_errors.Forbidden(403, "rotated"),
                         ks_errors.Unauthorized(http_status=401)):
        assert cinder._transient(unauthorized) and not cinder._refused(unauthorized)
    assert not cinder._transient(cinder_errors.BadRequest(400, "not allowed"))
    assert not cinder._transient(cinder_errors.NotFound(404, "no snapshot"))
    assert not cinder._transient(ValueError("a bug"))
    assert cinder._refused(cinder_errors.BadRequest(400, "not allowed"))
    assert not cinder._refused(ValueError("a bug"))  # a bug is no refusal: sent again


def test_settings_are_one_auth_or_the_other(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        CinderSettings(url="http://c/v3/p").check()
    with pytest.raises(ConfigError):
        CinderSettings(url="http://c/v3/p", token_file="t", username="u").check()
    CinderSettings(url="http://c/v3/p", auth_url="http://k/v3", username="u",
                   password_file="p", project_name="s").check()


async def test_a_sender_that_fails_goes_on(
    settings: CinderSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected error in a round (a bug, the outbox unreadable a moment)
    is logged with its traceback, and the next round delivers."""
    sent: list[tuple[str, str]] = []
    failures = [RuntimeError("once")]

    def update(_self: CinderReporter, sid: str, status: str) -> None:
        if failures:
            raise failures.pop()
        sent.append((sid, status))

    monkeypatch.setattr(CinderReporter, "_update", update)
    monkeypatch.setattr(cinder, "RESOLVE_INTERVAL", 0.05)
    records = Records({"s1": Status.AVAILABLE})
    reporter = CinderReporter(settings, tmp_path / "outbox.db", records)  # type: ignore[arg-type]
    reporter.start()
    try:
        task = Task("t1", "snapshot-create", frozenset(), state=TaskState.SUCCEEDED)
        task.done.set()
        reporter.follow(await reporter.intend("s1", "create"), task)
        await delivered(reporter, sent, 1)
        assert sent == [("s1", "creating")]
        assert any("could not be sent" in r.getMessage() and r.exc_info for r in caplog.records)
    finally:
        await reporter.close()


async def test_a_401_reads_the_token_file_again_and_delivers(
    settings: CinderSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A token rotated under the agent: the cached client's 401 drops it, and
    the next try builds one from the token file as it is now."""
    sent: list[tuple[str, str]] = []
    built: list[str] = []

    class Client:
        def __init__(self, token: str) -> None:
            self.token = token
            self.volume_snapshots = self

        def update_snapshot_status(self, sid: str, doc: dict[str, str]) -> None:
            if self.token != "new":
                raise cinder_errors.Unauthorized(401, "token expired")
            sent.append((sid, doc["status"]))

    def client(given: CinderSettings) -> Client:
        built.append(Path(given.token_file).read_text().strip())
        return Client(built[-1])

    monkeypatch.setattr(cinder, "_client", client)
    monkeypatch.setattr(cinder, "RESOLVE_INTERVAL", 0.05)
    reporter = CinderReporter(settings, tmp_path / "outbox.db",
                              Records({"s1": Status.AVAILABLE}))  # type: ignore[arg-type]
    reporter._client = Client("t")  # built with the token before the rotation
    reporter.start()
    try:
        Path(settings.token_file).write_text("new\n")
        await reporter.intend("s1", "create")  # an orphan: resolved from its record
        await delivered(reporter, sent, 1)
        assert sent == [("s1", "creating")] and built == ["new"]
    finally:
        await reporter.close()
