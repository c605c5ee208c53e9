"""Schedules: one group snapshot per run, tagged; retention through the
normal delete workflow, never touching another schedule's or a manual
snapshot; overlapping and failing runs refused with a non-zero exit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import Agent, chain_of, create_snapshots, delete_snapshot, gasnap, running_agent
from gasnap.client import ApiError
from gasnap.hypervisor import Domain
from gasnap.lab.workload import sh
from gasnap.virt import LibvirtHypervisor


@pytest.fixture(scope="module")
def sched_agent(tmp_path_factory: pytest.TempPathFactory, guest: Domain,
                merge_guest: Domain, noagent: Domain) -> Iterator[Agent]:
    config = f"""
[schedules.hourly]
domains = ["{guest.name}", "{merge_guest.name}"]
keep = 2
quiesce = "required"

[schedules.other]
domains = ["{guest.name}"]
keep = 1

[schedules.strict]
domains = ["{noagent.name}"]
keep = 1
quiesce = "required"
"""
    with running_agent(tmp_path_factory.mktemp("sched-agent"), config=config) as running:
        yield running


def run(agent: Agent, name: str, *extra: str, check: bool = True) -> Any:
    proc = gasnap("--api", agent.api, "schedule", "run", name, "--json", *extra, check=check)
    return json.loads(proc.stdout) if check else proc


def tagged(agent: Agent, schedule: str | None) -> dict[str, list[dict[str, Any]]]:
    """Available snapshots by volume, oldest first, of SCHEDULE (None: manual)."""
    by_volume: dict[str, list[dict[str, Any]]] = {}
    for record in agent.client.get("/v1/snapshots?status=available")["snapshots"]:
        if record["schedule"] == schedule:
            by_volume.setdefault(record["volume_id"], []).append(record)
    return by_volume


async def test_runs_keep_the_newest_per_volume(
    sched_agent: Agent, hv: LibvirtHypervisor, guest: Domain, merge_guest: Domain
) -> None:
    volumes = {v.volume_id for v in (*guest.volumes, *merge_guest.volumes)}
    first = run(sched_agent, "hourly")
    assert first["state"] == "succeeded" and first["result"]["deleted"] == []
    made = first["result"]["snapshots"]
    assert {s["volume_id"] for s in made} == volumes
    assert len({s["group_id"] for s in made}) == 1  # one freeze window for the group
    assert {s["consistency"] for s in made} == {"filesystem"}
    manual = create_snapshots(sched_agent, {"domains": [guest.name], "name": "manual"})
    other = run(sched_agent, "other")
    second = run(sched_agent, "hourly")
    assert second["result"]["deleted"] == []
    third = run(sched_agent, "hourly")
    # The oldest run's snapshots went, through the delete workflow, oldest first.
    assert sorted(third["result"]["deleted"]) == sorted(s["id"] for s in made)
    kept = tagged(sched_agent, "hourly")
    assert set(kept) == volumes
    for records in kept.values():
        assert len(records) == 2
    newest = {s["id"] for s in second["result"]["snapshots"] + third["result"]["snapshots"]}
    assert {r["id"] for records in kept.values() for r in records} == newest
    # Another schedule's and the manual snapshots are untouched.
    assert {r["id"] for rs in tagged(sched_agent, "other").values() for r in rs} == {
        s["id"] for s in other["result"]["snapshots"]}
    manual_ids = {s["id"] for s in manual["result"]["snapshots"]}
    assert manual_ids <= {r["id"] for rs in tagged(sched_agent, None).values() for r in rs}
    # The chains hold no file of a deleted snapshot.
    for dom in (guest, merge_guest):
        for vol in dom.volumes:
            chain = await chain_of(hv, dom.name, vol.target)
            assert not {s["file"] for s in made if s["volume_id"] == vol.volume_id} & set(chain)


async def test_overlapping_and_failing_runs_exit_non_zero(
    sched_agent: Agent, hv: LibvirtHypervisor, guest: Domain
) -> None:
    await sh(hv, guest.name, "echo 3 > /run/gasnap-hook-delay")  # keep the run going
    try:
        started = run(sched_agent, "other", "--no-wait")
        refused = run(sched_agent, "other", check=False)
        assert refused.returncode == 1
        assert "still running" in refused.stderr
        done = gasnap("--api", sched_agent.api, "task", "wait", started["id"], "--json")
        assert json.loads(done.stdout)["state"] == "succeeded"
    finally:
        await sh(hv, guest.name, "rm -f /run/gasnap-hook-delay")
    failed = run(sched_agent, "strict", check=False)  # quiesce required, no guest agent
    assert failed.returncode == 1 and "guest agent" in failed.stderr
    unknown = run(sched_agent, "nope", check=False)
    assert unknown.returncode == 1 and "no schedule nope" in unknown.stderr


def test_check_config_names_the_problem(tmp_path: Any, guest: Domain) -> None:
    cases = {
        '[schedules.x]\ndomains = ["no-such-domain"]\nkeep = 1\n': "schedules.x.domains",
        f'[schedules.x]\ndomains = ["{guest.name}"]\nkeep = "seven"\n': "schedules.x.keep",
        f'[schedules.x]\ndomains = ["{guest.name}"]\nkeep = 1\nretain = 2\n':
            "schedules.x.retain",
        '[agent]\nfreeze_timout = 3\n': "agent.freeze_timout",
    }
    for text, key in cases.items():
        path = tmp_path / "agent.toml"
        path.write_text(text)
        serving = ["serve", "--config", str(path), "--listen", f"unix:{tmp_path}/s"]
        # A missing domain stops --check-config only (see the test below).
        for args in (["serve", "--config", str(path), "--check-config"],
                     *([serving] if "no-such-domain" not in text else [])):
            proc = gasnap(*args, check=False, timeout=60)
            assert proc.returncode == 2, (text, proc.stderr)
            assert key in proc.stderr
    good = tmp_path / "good.toml"
    good.write_text(f'[schedules.x]\ndomains = ["{guest.name}"]\nkeep = 1\n')
    ok = gasnap("serve", "--config", str(good), "--check-config")
    assert "configuration OK" in ok.stdout


def test_a_schedule_whose_domain_is_gone_fails_alone(tmp_path: Any, guest: Domain) -> None:
    """A domain undefined since the configuration was written: the agent
    starts, says so, and only that schedule's runs fail."""
    config = (f'[schedules.gone]\ndomains = ["no-such-domain"]\nkeep = 1\n'
              f'[schedules.kept]\ndomains = ["{guest.name}"]\nkeep = 1\nquiesce = "off"\n')
    with running_agent(tmp_path, config=config) as agent:
        assert "schedules.gone.domains: no domain 'no-such-domain'" in agent.output()
        failed = run(agent, "gone", check=False)
        assert failed.returncode == 1 and "no-such-domain" in failed.stderr
        with pytest.raises(ApiError) as refused:
            agent.client.request("POST", "/v1/schedules/gone/run")
        assert (refused.value.details["status"], refused.value.code) == (404,
                                                                          "domain_not_found")
        listed = agent.client.get("/v1/schedules")["schedules"]
        assert {s["name"] for s in listed} == {"gone", "kept"}
        done = run(agent, "kept")
        assert done["state"] == "succeeded", done
        for record in done["result"]["snapshots"]:
            assert delete_snapshot(agent, record["id"])["state"] == "succeeded"

