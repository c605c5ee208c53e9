"""The bench's outputs: a table on stdout, docs/benchmarks.md, raw samples in JSON."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .stats import Comparison, Figure, p99

Result = Comparison | Figure


def _row(result: Result) -> list[str]:
    if isinstance(result, Comparison):
        return [result.case, result.what,
                f"{statistics.median(result.a):.3f} / {p99(result.a):.3f} {result.unit}",
                f"{statistics.median(result.b):.3f} / {p99(result.b):.3f} {result.unit}",
                f"{result.ratio:.2f}x", result.target, "yes" if result.met() else "NO",
                str(len(result.a))]
    if result.bound is None:
        target, met = "-", "reference"
    else:
        target, met = f"<= {result.bound:g} {result.unit}", "yes" if result.met() else "NO"
    return [result.case, result.what,
            f"{statistics.median(result.samples):.1f} / {result.value:.1f} {result.unit}", "-",
            "-", target, met, str(len(result.samples))]


HEAD = ["case", "what", "gasnap median / p99", "baseline median / p99", "ratio", "target",
        "met", "runs"]


def table(results: list[Result]) -> str:
    rows = [HEAD, *(_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEAD))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     for row in rows)


def markdown(results: list[Result], context: dict[str, Any], analysis: str) -> str:
    lines = ["# Benchmarks", "",
             "Measured by `make bench` (`python -m gasnap.bench`); every comparison runs "
             "gasnap (A) and its baseline (B) interleaved in the same run, on lab guests "
             "(TCG). Ratios are of medians; for throughput (P4) the baseline's time over "
             "gasnap's, so higher is better. Raw samples: "
             "[benchmarks.json](benchmarks.json).", "",
             "Run: " + ", ".join(f"{k} {v}" for k, v in context.items()) + ".", "",
             "| " + " | ".join(HEAD) + " |", "|" + " --- |" * len(HEAD)]
    for result in results:
        lines.append("| " + " | ".join(_row(result)) + " |")
    lines += [""]
    for result in results:
        parts = [f"{result.a_label} vs {result.b_label}"] if isinstance(
            result, Comparison) else []
        parts += [result.note] if result.note else []
        if parts:
            lines.append(f"* {result.case}, {result.what}: {'; '.join(parts)}.")
    return "\n".join([*lines, "", analysis.strip(), ""])


def load(path: Path) -> tuple[list[Result], dict[str, Any]]:
    """Results and context back from a benchmarks.json (to re-render the page)."""
    raw = json.loads(path.read_text())
    results: list[Result] = []
    for doc in raw["results"]:
        fields = {k: v for k, v in doc.items() if k not in ("ratio", "met", "value")}
        results.append(Figure(**fields) if "samples" in fields else Comparison(**fields))
    return results, raw["context"]


def write(results: list[Result], context: dict[str, Any], analysis: str, docs: Path) -> None:
    (docs / "benchmarks.md").write_text(markdown(results, context, analysis))
    raw = {"context": context, "results": [r.to_dict() for r in results]}
    (docs / "benchmarks.json").write_text(json.dumps(raw, indent=1) + "\n")
