"""``gasnap demo``, the README's first command, end to end."""

from __future__ import annotations

import json

from conftest import gasnap
from gasnap.demo import DEMO_GUEST
from gasnap.lab.guests import Lab


async def test_demo_boots_a_guest_and_shows_it(lab: Lab) -> None:
    existed = DEMO_GUEST in await lab.names()
    try:
        summary = json.loads(gasnap("demo", "--json").stdout)
        record = summary["domain"]
        assert record["name"] == DEMO_GUEST
        assert record["guest_agent"] == "connected"
        assert len(record["volumes"]) == 2
        human = gasnap("demo").stdout
        assert "guest agent: connected" in human
        assert "/data1 ext4" in human
    finally:
        if not existed:
            await lab.down(DEMO_GUEST)
