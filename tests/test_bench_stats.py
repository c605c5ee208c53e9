"""The benchmark harness's arithmetic (the benchmarks themselves run in
``make bench``; their targets are goals, never assertions of the suite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gasnap.bench import report
from gasnap.bench.stats import Comparison, Figure, p99


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
        Comparison("P1", "create", "s", "gasnap", "virsh", "<= 1.2x", [0.2, 0.3], [0.2, 0.2]),
        Figure("P6", "rss", "MiB", [50.0], 60.0, use="max"),
    ]
    text = report.table(results)
    assert "P1" in text and "1.25x" in text and "NO" in text and "yes" in text
    docs = tmp_path
    report.write(results, {"mode": "quick"}, "## Analysis\n", docs)
    assert "| P6 | rss |" in (docs / "benchmarks.md").read_text()
    raw = json.loads((docs / "benchmarks.json").read_text())
    assert raw["results"][0]["a"] == [0.2, 0.3] and raw["results"][1]["met"] is True
