"""``gasnap demo``, the README's first command, end to end."""

from __future__ import annotations

import json

from conftest import gasnap
from gasnap.demo import DEMO_GUEST
from gasnap.lab.guests import Lab


async def test_demo_takes_a_clean_quiesced_snapshot_under_load(lab: Lab) -> None:
    existed = DEMO_GUEST in await lab.names()
    try:
        summary = json.loads(gasnap("demo", "--json").stdout)
        assert summary["domain"] == DEMO_GUEST
        snaps = summary["task"]["result"]["snapshots"]
        assert [s["target"] for s in snaps] == ["vda", "vdb"]
        assert {(s["status"], s["consistency"]) for s in snaps} == {("available", "filesystem")}
        assert all(c["e2fsck_exit"] == 0 and not c["journal_recovery"]
                   for c in summary["fsck"])
        assert summary["freeze_window_ms"] > 0
        deleted = summary["delete"]
        assert (deleted["state"], deleted["result"]["snapshot"]) == ("succeeded", snaps[0]["id"])
        human = gasnap("demo").stdout
        assert human.count("clean (exit 0)") == 2
        assert "freeze window seen inside the guest" in human
        assert "deleted " in human
    finally:
        if not existed:
            await lab.down(DEMO_GUEST)
