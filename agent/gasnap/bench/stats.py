"""Medians, p99 and ratios of benchmark samples."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


def p99(samples: list[float]) -> float:
    """Nearest-rank 99th percentile (with 10 samples: the largest)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass
class Comparison:
    """One figure: A (gasnap) against its baseline B, measured interleaved."""

    case: str
    what: str
    unit: str
    a_label: str
    b_label: str
    target: str  # e.g. "<= 1.2x"
    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    higher_is_better: bool = False
    note: str = ""

    @property
    def ratio(self) -> float:
        """median(A) / median(B); for throughput figures, B's time over A's."""
        a, b = statistics.median(self.a), statistics.median(self.b)
        return b / a if self.higher_is_better else a / b

    def met(self) -> bool:
        op, bound = self.target.split()
        value = float(bound.rstrip("x"))
        return self.ratio <= value if op == "<=" else self.ratio >= value

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(ratio=self.ratio, met=self.met())
        return doc


@dataclass
class Figure:
    """A single measured figure against an absolute bound (no baseline)."""

    case: str
    what: str
    unit: str
    samples: list[float]
    bound: float | None  # the figure's p99 (or value) must stay at or under it; None: reference
    use: str = "p99"  # "p99" or "max"
    note: str = ""

    @property
    def value(self) -> float:
        return p99(self.samples) if self.use == "p99" else max(self.samples)

    def met(self) -> bool:
        return self.bound is None or self.value <= self.bound

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(value=self.value, met=self.met() if self.bound is not None else None)
        return doc
