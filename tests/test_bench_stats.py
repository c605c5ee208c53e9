"""The benchmark harness's arithmetic (the benchmarks themselves run in
``make bench``; their targets are goals, never assertions of the suite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gasnap.bench import report
from gasnap.bench.rig import Settled, settled_figure
from gasnap.bench.stats import WITHIN, Comparison, Figure, p99


def test_p99_is_nearest_rank() -> None:
    assert p99([5.0, 1.0, 3.0]) == 5.0
    assert p99([float(n) for n in range(1, 201)]) == 198.0


@pytest.mark.parametrize(
    ("a", "b", "target", "higher", "ratio", "met"),
    [
        ([1.1, 1.2, 1.3], [1.0, 1.0, 1.0], "<= 1.2x", False, 1.2, True),
        ([2.0, 2.0, 2.0], [1.0, 1.0, 1.0], "<= 1.2x", False, 2.0, False),
        # Throughput: the baseline's time over gasnap's.
        ([5.0, 5.0], [4.0, 4.0], ">= 0.8x", True, 0.8, True),
        ([5.0, 5.0], [3.5, 3.5], ">= 0.8x", True, 0.7, False),
    ],
)
def test_comparisons(a: list[float], b: list[float], target: str, higher: bool,
                     ratio: float, met: bool) -> None:
    result = Comparison("P", "w", "s", "A", "B", target, a, b, higher_is_better=higher)
    assert result.ratio == pytest.approx(ratio)
    assert result.met() is met


def test_report_writes_table_markdown_and_raw_samples(tmp_path: Path) -> None:
    results: list[report.Result] = [
        Comparison("P1", "create", "s", "gasnap", "virsh", "<= 1.2x", [0.3, 0.3, 0.31],
                   [0.2, 0.2, 0.21]),
        Figure("P6", "rss", "MiB", [50.0], 60.0, use="max"),
    ]
    text = report.table(results)
    assert "P1" in text and "1.50x" in text and "NO" in text and "yes" in text
    assert "0.300 (0.300-0.310) s" in text  # the median with its p10-p90
    docs = tmp_path
    report.write(results, {"mode": "quick"}, "## Analysis\n", docs)
    assert "| P6 | rss |" in (docs / "benchmarks.md").read_text()
    raw = json.loads((docs / "benchmarks.json").read_text())
    assert raw["results"][0]["a"] == [0.3, 0.3, 0.31] and raw["results"][1]["met"] is True
    assert raw["results"][0]["verdict"] == "NO"
    # What was written reads back as it was, derived keys and all.
    again, context = report.load(docs / "benchmarks.json")
    assert again == results and context == {"mode": "quick"}


def test_a_target_inside_the_spread_gets_no_verdict() -> None:
    # Medians 1.0 vs 0.95: 1.05x, under the 1.1x target, but the runs swing
    # by +-20 %: the ratio's spread straddles the target.
    noisy = Comparison("P", "w", "s", "A", "B", "<= 1.1x", [0.8, 1.0, 1.2, 0.9, 1.1],
                       [0.76, 0.95, 1.14, 0.85, 1.05])
    low, high = noisy.ratio_spread()
    assert low < 1.1 < high
    assert noisy.met() and noisy.verdict() == WITHIN
    assert noisy.ratio_spread() == (low, high)  # seeded: the page does not change on render
    steady = Comparison("P", "w", "s", "A", "B", "<= 1.1x", [1.0, 1.01, 0.99, 1.0, 1.0],
                        [0.95, 0.96, 0.94, 0.95, 0.95])
    assert steady.verdict() == "yes"
    slow = Comparison("P", "w", "s", "A", "B", "<= 1.1x", [2.0, 2.1, 1.9], [1.0, 1.0, 1.0])
    assert slow.verdict() == "NO"
    reference = Comparison("P", "w", "ms", "A", "B", "-", [1.0], [2.0])
    assert reference.verdict() == "reference" and reference.met()


def test_moves_are_named_only_past_both_spreads() -> None:
    before: list[report.Result] = [
        Figure("P3", "window", "ms", [270.0, 280.0, 290.0, 300.0, 310.0], 250.0),
        Figure("P3", "noisy", "ms", [100.0, 200.0, 300.0, 400.0, 500.0], None),
        Figure("P6", "rss", "MiB", [55.0], 60.0, use="max"),
        Comparison("P4", "merge", "s", "A", "B", ">= 0.8x", [1.0, 1.0, 1.1], [1.0, 1.0, 1.1],
                   higher_is_better=True),
    ]
    now: list[report.Result] = [
        Figure("P3", "window", "ms", [1100.0, 1180.0, 1200.0, 1250.0, 1300.0], 250.0),
        Figure("P3", "noisy", "ms", [150.0, 250.0, 350.0, 450.0, 550.0], None),
        Figure("P6", "rss", "MiB", [56.0], 60.0, use="max"),
        # Both sides slower (the host): the ratio held.
        Comparison("P4", "merge", "s", "A", "B", ">= 0.8x", [2.0, 2.0, 2.2], [2.0, 2.0, 2.2],
                   higher_is_better=True),
        Figure("P9", "new", "s", [1.0], None),
    ]
    moved = report.moves(before, now)
    assert set(moved) == {("P3", "window")}
    assert moved[("P3", "window")] == "4.14x of last"
    assert "4.14x of last" in report.table(now, moved)
    bigger_rss = Figure("P6", "rss", "MiB", [70.0], 60.0, use="max")
    assert report.moves(before, [bigger_rss]) == {("P6", "rss"): "1.27x of last"}


def test_an_older_json_still_loads(tmp_path: Path) -> None:
    """The committed page of an earlier release has no spreads or verdicts."""
    old = {"context": {}, "results": [
        {"case": "P1", "what": "c", "unit": "s", "a_label": "A", "b_label": "B",
         "target": "<= 1.2x", "a": [1.0], "b": [1.0], "higher_is_better": False, "note": "",
         "ratio": 1.0, "met": True},
        {"case": "P6", "what": "r", "unit": "MiB", "samples": [5.0], "bound": 6.0,
         "use": "max", "note": "", "value": 5.0, "met": True}]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    results, _ = report.load(path)
    assert [r.verdict() for r in results] == ["yes", "yes"]


def test_the_settled_figure_says_when_the_host_did_not_settle() -> None:
    settled = settled_figure("P3", [Settled(12.0, 3.1, True), Settled(20.0, 9.0, True)])
    assert settled.samples == [12.0, 20.0] and "NOT" not in settled.note
    missed = settled_figure("P3", [Settled(12.0, 3.1, True), Settled(40.0, 181.0, False)])
    assert "NOT SETTLED in 1 of 2" in missed.note
