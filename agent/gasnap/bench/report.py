"""The bench's outputs: a table on stdout, docs/benchmarks.md, raw samples in
JSON, and what moved since the last committed run."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from .stats import Comparison, Figure, Result, moved, spread

__all__ = ["Result", "load", "markdown", "moves", "parse", "table", "write"]


def _median(samples: list[float], unit: str) -> str:
    """Median (p10-p90)."""
    digits = 3 if unit == "s" else 1
    low, high = spread(samples)
    return f"{statistics.median(samples):.{digits}f} ({low:.{digits}f}-{high:.{digits}f}) {unit}"


def _row(result: Result, last: dict[tuple[str, str], str]) -> list[str]:
    change = last.get((result.case, result.what), "")
    if isinstance(result, Comparison):
        low, high = result.ratio_spread()
        return [result.case, result.what, _median(result.a, result.unit),
                _median(result.b, result.unit),
                f"{result.ratio:.2f}x ({low:.2f}-{high:.2f})", result.target,
                result.verdict(), str(len(result.a)), change]
    target = "-" if result.bound is None else f"{result.use} <= {result.bound:g} {result.unit}"
    shown = _median(result.samples, result.unit)
    if result.bound is not None:
        shown += f", {result.use} {result.value:.1f}"
    return [result.case, result.what, shown, "-", "-", target, result.verdict(),
            str(len(result.samples)), change]


HEAD = ["case", "what", "gasnap median (p10-p90)", "baseline median (p10-p90)",
        "ratio (p10-p90)", "target", "met", "runs", "vs last"]


def table(results: list[Result], last: dict[tuple[str, str], str] | None = None) -> str:
    rows = [HEAD, *(_row(r, last or {}) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEAD))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     for row in rows)


def moves(before: list[Result], now: list[Result]) -> dict[tuple[str, str], str]:
    """Each figure of NOW that moved past its spread since BEFORE (a figure
    new in NOW has nothing to move from)."""
    earlier = {(r.case, r.what): r for r in before}
    found = {}
    for result in now:
        old = earlier.get((result.case, result.what))
        change = moved(old, result) if old is not None else ""
        if change:
            found[(result.case, result.what)] = change
    return found


INTRO = (
    "Measured by `make bench` (`python -m gasnap.bench`); every comparison runs gasnap (A) "
    "and its baseline (B) interleaved in the same run, on lab guests (TCG), once the host "
    "has settled (see each case's \"host CPU busy when timing began\"). Each figure is its "
    "median with the p10-p90 range of its runs. Ratios are of medians; for throughput (P4) "
    "the baseline's time over gasnap's, so higher is better; the range after a ratio is "
    "its p10-p90 over resampled runs. A target inside that range is reported as *within "
    "spread*: the runs cannot tell the difference from noise. \"vs last\" names the "
    "figures (a comparison: its ratio) that moved past both runs' spreads since the last "
    "committed run. Raw samples: [benchmarks.json](benchmarks.json).")


def markdown(results: list[Result], context: dict[str, Any], analysis: str,
             last: dict[tuple[str, str], str] | None = None) -> str:
    lines = ["# Benchmarks", "", INTRO, "",
             "Run: " + ", ".join(f"{k} {v}" for k, v in context.items()) + ".", "",
             "| " + " | ".join(HEAD) + " |", "|" + " --- |" * len(HEAD)]
    for result in results:
        lines.append("| " + " | ".join(_row(result, last or {})) + " |")
    lines += [""]
    for result in results:
        parts = [f"{result.a_label} vs {result.b_label}"] if isinstance(
            result, Comparison) else []
        parts += [result.note] if result.note else []
        if parts:
            lines.append(f"* {result.case}, {result.what}: {'; '.join(parts)}.")
    return "\n".join([*lines, "", analysis.strip(), ""])


def load(path: Path) -> tuple[list[Result], dict[str, Any]]:
    """Results and context back from a benchmarks.json (to re-render the page,
    or to compare with); keys an earlier release wrote or derived are skipped."""
    return parse(path.read_text())


def parse(text: str) -> tuple[list[Result], dict[str, Any]]:
    """``load`` from the JSON text itself."""
    raw = json.loads(text)
    results: list[Result] = []
    for doc in raw["results"]:
        kind: type[Figure] | type[Comparison] = Figure if "samples" in doc else Comparison
        names = {f.name for f in dataclasses.fields(kind)}
        results.append(kind(**{k: v for k, v in doc.items() if k in names}))
    return results, raw["context"]


def write(results: list[Result], context: dict[str, Any], analysis: str, docs: Path,
          last: dict[tuple[str, str], str] | None = None) -> None:
    (docs / "benchmarks.md").write_text(markdown(results, context, analysis, last))
    # One result per line: P11 alone has 22,000 samples, one per line would
    # bury every diff.
    lines = ",\n".join(json.dumps(r.to_dict()) for r in results)
    (docs / "benchmarks.json").write_text(
        f'{{"context": {json.dumps(context)},\n"results": [\n{lines}\n]}}\n')
