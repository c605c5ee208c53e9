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


@pytest.mark.parametrize(("op", "ok", "status"), [
    ("create", True, "creating"), ("create", False, "error"),
    ("delete", True, "deleting"), ("delete", False, "error_deleting"),
])
async def test_each_outcome_is_what_nova_would_say(
    settings: CinderSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    op: str, ok: bool, status: str,
) -> None:
    sent: list[tuple[str, str]] = []
    monkeypatch.setattr(CinderReporter, "_update",
                        lambda self, sid, st: sent.append((sid, st)))
    reporter = CinderReporter(settings, tmp_path / "outbox.db", Records({}))  # type: ignore[arg-type]
    reporter.start()
    try:
        task = Task("t1", "snapshot-" + op, frozenset())
        seq = await reporter.intend("s1", op)
        reporter.follow(seq, task)
        task.state = TaskState.SUCCEEDED if ok else TaskState.FAILED
        task.done.set()
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
    reporter = CinderReporter(settings, tmp_path / "outbox.db", Records({}))  # type: ignore[arg-type]
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
