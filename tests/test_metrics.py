"""``GET /metrics``: Prometheus text that moves with what the agent does."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from conftest import Agent, create_snapshots, delete_snapshot
from gasnap.hypervisor import Domain


def samples(agent: Agent) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = agent.client.text("/metrics")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(snapshot: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return snapshot.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_follow_creates_and_deletes(agent: Agent, guest: Domain, noagent: Domain
                                            ) -> None:
    before = samples(agent)
    vol = guest.volumes[0]
    task = create_snapshots(agent, {"domains": [guest.name], "disks": {guest.name: [vol.target]}})
    assert task["state"] == "succeeded"
    crash = create_snapshots(agent, {"domains": [noagent.name], "quiesce": "preferred"})
    assert crash["state"] == "succeeded"
    snap = task["result"]["snapshots"][0]
    assert delete_snapshot(agent, snap["id"], "commit")["state"] == "succeeded"
    after = samples(agent)

    def grown(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Exactly what this test did: the session agent runs one request at a time.
    assert grown("gasnap_snapshots_total", status="available", consistency="filesystem") == 1
    assert grown("gasnap_snapshots_total", status="available", consistency="crash") == 1
    # Both windows tried a freeze and were timed, the one that failed too.
    assert grown("gasnap_freeze_duration_seconds_count") == 2
    assert grown("gasnap_merge_duration_seconds_count", method="active-commit") == 1
    assert grown("gasnap_merge_bytes_total", method="active-commit") > 0
    assert grown("gasnap_tasks", kind="snapshot-create", state="succeeded") == 2
    assert grown("gasnap_tasks", kind="snapshot-delete", state="succeeded") == 1
    # The guest without an agent: its failed freeze is counted by command and code.
    assert grown("gasnap_guest_agent_failures_total", command="guest-fsfreeze-freeze",
                 code="guest_agent_absent") == 1
