"""A delete plan never takes another snapshot's overlay off its image.

The soak found it: after a revert the reverted-to snapshot's image is also
the overlay of the snapshot below, and committing that one removed the file
a whole branch backed onto.  ``left_broken`` reads the tree after the merge
(the pointers ``merging`` rewrites, the relinks applied); these cases are
the chains of the soak, on paths alone.  tests/test_revert.py runs them on
lab guests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gasnap.blockjobs import JobInfo
from gasnap.hypervisor import AgentState, Domain, DomainState, Layer, Volume
from gasnap.journal import Journal
from gasnap.metadata import (
    CloneMeta,
    CloneMode,
    CloneStatus,
    SnapshotMeta,
    Status,
    WrongStatus,
)
from gasnap.workflows import Context, delete, merging, no_progress, tree
from gasnap.workflows.deleteplan import DeletePlan, Method, Relink, drop_of, left_broken


def meta(sid: str, file: str, image: str) -> SnapshotMeta:
    return SnapshotMeta(sid, "v", sid, "", 1, "t", "d", None, "vda", Status.AVAILABLE,
                        file=file, backing_file=image)


def nodes(backing: dict[str, str | None]) -> tree.Tree:
    return tree.Tree({p: tree.Node(p, "qcow2", b, "qcow2" if b else None)
                      for p, b in backing.items()}, [])


def plan(method: Method, **fields: object) -> DeletePlan:
    base: dict[str, object] = {
        "snapshot_id": "a", "domain": "d", "target": "vda", "volume_id": "v",
        "method": method, "top": "", "base": "", "remove": "", "pull_base": None,
        "above": None, "base_format": "qcow2", "moved_bytes": 0, "chain": []}
    return DeletePlan(**{**base, **fields})  # type: ignore[arg-type]


# base <- FA (A) <- FB (B), reverted to B: N on FA; the branch FB <- OBV.
REVERTED = nodes({"base": None, "FA": "base", "FB": "FA", "OBV": "FB", "N": "FA"})
B, BV = meta("b", "FB", "FA"), meta("bv", "OBV", "FB")


def test_a_commit_that_removes_a_branch_base_is_broken() -> None:
    commit = plan(Method.COMMIT, top="FA", base="base", remove="FA", above="N",
                  chain=["N", "FA", "base"], relinks=[Relink("b", backing_file="base")])
    assert left_broken(commit, REVERTED, [B, BV]) == ["b", "bv"]  # BV's image reads FA


def test_a_branch_pull_that_keeps_the_branch_base_is_whole() -> None:
    pull = plan(Method.BRANCH_PULL, top="N", base="base", remove="base", pull_base=None,
                dependents=["FA"], pull_active=True, chain=["N", "FA", "base"],
                after=["N"])
    assert left_broken(pull, REVERTED, [B, BV]) == []


def test_a_pull_through_a_snapshot_overlay_is_broken() -> None:
    """Once the guest took C on N, pulling everything into C's overlay would
    take it off N, C's image: refused (delete C first)."""
    taken = nodes({**{n.path: n.backing for n in REVERTED.nodes.values()}, "FC": "N"})
    c = meta("c", "FC", "N")
    pull = plan(Method.BRANCH_PULL, top="FC", base="base", remove="base", pull_base=None,
                dependents=["FA"], pull_active=True, chain=["FC", "N", "FA", "base"],
                after=["FC"])
    assert left_broken(pull, taken, [B, BV, c]) == ["c"]


def test_plain_merges_keep_every_other_record() -> None:
    linear = nodes({"base": None, "F1": "base", "F2": "F1", "F3": "F2"})
    one, two, three = meta("1", "F1", "base"), meta("2", "F2", "F1"), meta("3", "F3", "F2")
    inner = plan(Method.COMMIT, top="F2", base="F1", remove="F2", above="F3",
                 relinks=[Relink("3", backing_file="F1")])
    assert left_broken(inner, linear, [one, three]) == []
    active = plan(Method.PULL, top="F3", base="F2", remove="F2", pull_base="F1",
                  relinks=[Relink("2", file="F3")])
    assert left_broken(active, linear, [one, two]) == []
    # Without its relink the record would name a removed file.
    assert left_broken(plan(Method.PULL, top="F3", base="F2", remove="F2", pull_base="F1"),
                       linear, [one, two]) == ["2"]


def test_a_record_already_off_its_image_is_not_this_merges_doing() -> None:
    linear = nodes({"base": None, "F1": "base", "F2": "F1", "X": None})
    stray = meta("x", "X", "F1")  # a chain changed by hand
    commit = plan(Method.ACTIVE_COMMIT, top="F2", base="F1", remove="F2")
    assert left_broken(commit, linear, [stray]) == []


def test_an_image_whose_own_backing_goes_is_broken() -> None:
    """The soak's second run: the record of the snapshot whose overlay FA is
    was gone, so no record named FA as its file; FA was still the image of
    B, left on a branch, and committing base's upper layer (S, file FS)
    away from under FA broke B's image although B's own pointer held."""
    tree_ = nodes({"base": None, "FS": "base", "FA": "FS", "FB": "FA", "N": "FS"})
    b = meta("b", "FB", "FA")
    commit = plan(Method.COMMIT, top="FS", base="base", remove="FS", above="N",
                  chain=["N", "FS", "base"])
    assert left_broken(commit, tree_, [b]) == ["b"]
    pull = plan(Method.BRANCH_PULL, top="N", base="base", remove="base", pull_base=None,
                dependents=["FS"], pull_active=True, chain=["N", "FS", "base"], after=["N"])
    assert left_broken(pull, tree_, [b]) == []


# --- drop: a leaf of a branch a revert left --------------------------------------
#
# A on base (overlay FA), reverted to A: the before-revert snapshot R keeps
# FA (its image) under its overlay OR, and the domain runs N on base.

LEFT = nodes({"base": None, "FA": "base", "OR": "FA", "N": "base"})
A, R = meta("a", "FA", "base"), meta("r", "OR", "FA")
RUNNING = Volume("v", "vda", None, "file", (Layer("N", "qcow2"), Layer("base", "raw")))


def drop(target: SnapshotMeta, tree_: tree.Tree, others: list[SnapshotMeta],
         *, own: CloneMeta | None = None) -> DeletePlan | None:
    dom = Domain("d", "u", DomainState.RUNNING, AgentState.CONNECTED, (RUNNING,))
    return drop_of(target, dom, RUNNING, nodes=tree_, others=others, own=own,
                   in_chain=str(target.file) in ("N", "base"))


def test_the_state_a_revert_left_is_dropped_unmerged() -> None:
    """Merging R's image into its overlay (a branch pull) left OR behind
    once A went too: a file nothing names (the soak's orphans)."""
    first = drop(R, LEFT, [A])
    assert first is not None
    assert (first.removed, first.chain, first.expected_chain) == (["OR"], ["N", "base"],
                                                                  ["N", "base"])
    assert left_broken(first, LEFT, [A]) == []
    then = drop(A, nodes({"base": None, "FA": "base", "N": "base"}), [])
    assert then is not None and then.removed == ["FA"]  # base runs


def test_a_drop_takes_the_image_only_when_nothing_else_holds_it() -> None:
    alone = drop(R, LEFT, [])  # A's record is gone
    assert alone is not None and alone.removed == ["OR", "FA"]
    shared = nodes({**{n.path: n.backing for n in LEFT.nodes.values()}, "OX": "FA"})
    kept = drop(R, shared, [meta("x", "OX", "FA")])
    assert kept is not None and kept.removed == ["OR"]
    clone = CloneMeta("c", "c", "s", "w", CloneMode.FULL, "FA", None, 1, CloneStatus.AVAILABLE,
                      "t")
    kept = drop(R, LEFT, [], own=clone)
    assert kept is not None and kept.removed == ["OR"]


def test_only_a_leaf_nothing_else_names_is_dropped() -> None:
    assert drop(A, LEFT, [R]) is None  # OR backs onto FA
    assert drop(meta("n", "N", "base"), LEFT, []) is None  # the running layer
    named = meta("y", "OR", "FA")
    assert drop(R, LEFT, [named]) is None


class Refusing:
    """A metadata service whose store refuses the deleting transition."""

    async def update_snapshot_status(self, snapshot_id: str, status: Any, progress: str
                                     ) -> None:
        raise WrongStatus(f"snapshot {snapshot_id} is deleting already")


async def test_a_refused_deleting_write_leaves_no_journal_entry(tmp_path: Path) -> None:
    """REVIEW-2 item 14: nothing happened, so nothing may stay for recovery
    (the entry held the volume until the agent restarted)."""
    journal = Journal(tmp_path / "journal.db")
    ctx = Context(None, None, Refusing(), journal, None, 10.0)  # type: ignore[arg-type]
    plan = DeletePlan(snapshot_id="s", domain="d", target="vda", volume_id="v",
                      method=Method.COMMIT, top="/v/a.s", base="/v/a", remove="/v/a.s",
                      pull_base=None, above="/v/a.t", base_format="qcow2", moved_bytes=0,
                      chain=["/v/a.t", "/v/a.s", "/v/a"])
    outcome = await delete.execute(ctx, plan, no_progress)
    assert isinstance(outcome.failure, WrongStatus)
    assert await journal.unfinished() == [] and journal.holder("v") is None
    journal.close()


def test_an_active_commit_must_keep_reaching_new_lows(monkeypatch: pytest.MonkeyPatch) -> None:
    """merging.Convergence: the bytes an active commit has left must make a
    new low within its timeout; a slow but steady copy does, a guest that
    writes faster than the copy does not.  An unsized job is not judged."""
    now = [100.0]
    monkeypatch.setattr(merging.time, "monotonic", lambda: now[0])
    steady = merging.Convergence(5)
    for step in range(20):  # 1 byte closer every 4 s: slow, but it gets there
        now[0] += 4
        steady.observe(JobInfo(cur=step, end=100))
    outrun = merging.Convergence(5)
    outrun.observe(JobInfo(cur=0, end=0))  # not sized yet
    now[0] += 60
    outrun.observe(JobInfo(cur=10, end=50))  # 40 left: the first low
    now[0] += 3
    outrun.observe(JobInfo(cur=30, end=75))  # 45 left, within the timeout
    now[0] += 2
    with pytest.raises(merging.NotConverging) as err:
        outrun.observe(JobInfo(cur=60, end=102))  # 42 left: no new low in 5 s
    assert err.value.code == "merge_not_converging"


async def test_a_ready_mirror_whose_event_was_missed_is_never_given_up() -> None:
    """Outside review: the agent restarted after QEMU's READY event, and the
    guest keeps the mirror busy (cur never equals end).  The XML says ready:
    the follow ends READY before any progress is judged, so the convergence
    check cannot cancel a commit that could pivot."""
    from gasnap.blockjobs import BlockJobEvents, JobEnd, follow  # noqa: PLC0415

    judged: list[JobInfo] = []

    async def check() -> JobInfo:
        return JobInfo(cur=5, end=10, kind="active-commit")

    async def ready() -> bool:
        return True

    async def progress(info: JobInfo) -> None:
        judged.append(info)

    end = await follow(BlockJobEvents(), "d", "vda", check=check, mirror_ready=ready,
                       progress=progress, want_ready=True, check_interval=0.01)
    assert end is JobEnd.READY and judged == []
