"""Medians, spreads and verdicts of benchmark samples.

Every figure is reported as its median with the p10-p90 range of its runs.
A comparison's verdict is drawn from the spread of its ratio (the p10-p90
of the ratio of medians over resampled runs), not from the ratio alone: a
target that falls inside that range is reported as "within spread", since
the runs cannot tell the difference being claimed from noise.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

RESAMPLES = 2000
WITHIN = "within spread"


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile Q (0-100]."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def p99(samples: list[float]) -> float:
    """Nearest-rank 99th percentile (with 10 samples: the largest)."""
    return percentile(samples, 99)


def spread(samples: list[float]) -> tuple[float, float]:
    """The p10-p90 range of SAMPLES."""
    return percentile(samples, 10), percentile(samples, 90)


def _ratio(a: list[float], b: list[float], higher_is_better: bool) -> float:
    ma, mb = statistics.median(a), statistics.median(b)
    return mb / ma if higher_is_better else ma / mb


@dataclass
class Comparison:
    """One figure: A (gasnap) against its baseline B, measured interleaved."""

    case: str
    what: str
    unit: str
    a_label: str
    b_label: str
    target: str  # e.g. "<= 1.2x"; "-": for reference, no target
    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    higher_is_better: bool = False
    note: str = ""

    @property
    def ratio(self) -> float:
        """median(A) / median(B); for throughput figures, B's time over A's."""
        return _ratio(self.a, self.b, self.higher_is_better)

    def ratio_spread(self) -> tuple[float, float]:
        """p10-p90 of the ratio over RESAMPLES resamplings of both sides'
        runs (seeded: the same samples always give the same range)."""
        rng = random.Random(f"{self.case} {self.what}")  # noqa: S311 (resampling, not secrets)
        ratios = [_ratio(rng.choices(self.a, k=len(self.a)), rng.choices(self.b, k=len(self.b)),
                         self.higher_is_better) for _ in range(RESAMPLES)]
        return spread(ratios)

    def _meets(self, ratio: float) -> bool:
        if self.target == "-":
            return True
        op, bound = self.target.split()
        value = float(bound.rstrip("x"))
        return ratio <= value if op == "<=" else ratio >= value

    def met(self) -> bool:
        return self._meets(self.ratio)

    def verdict(self) -> str:
        """"yes" or "NO" when the whole spread of the ratio says so, else WITHIN."""
        if self.target == "-":
            return "reference"
        low, high = self.ratio_spread()
        if self._meets(low) and self._meets(high):
            return "yes"
        if not self._meets(low) and not self._meets(high):
            return "NO"
        return WITHIN

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(ratio=self.ratio, ratio_spread=list(self.ratio_spread()), met=self.met(),
                   verdict=self.verdict())
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

    def verdict(self) -> str:
        if self.bound is None:
            return "reference"
        return "yes" if self.met() else "NO"

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(value=self.value, met=self.met() if self.bound is not None else None,
                   verdict=self.verdict())
        return doc


Result = Comparison | Figure

# A figure measured once has no spread of its own: it counts as moved when
# it changed by more than this fraction.
SINGLE_TOLERANCE = 0.10


def moved(before: Result, now: Result) -> str:
    """How NOW differs from BEFORE (the same figure in an earlier run): ""
    when the two runs' spreads overlap, else the change of the median (a
    comparison: of its ratio) as a factor."""
    if isinstance(before, Comparison) and isinstance(now, Comparison):
        old, new = before.ratio, now.ratio
        old_range, new_range = before.ratio_spread(), now.ratio_spread()
    elif isinstance(before, Figure) and isinstance(now, Figure):
        old, new = statistics.median(before.samples), statistics.median(now.samples)
        old_range, new_range = spread(before.samples), spread(now.samples)
        if len(before.samples) == 1 or len(now.samples) == 1:
            return "" if abs(new - old) <= SINGLE_TOLERANCE * abs(old) else _factor(old, new)
    else:
        return ""
    if old_range[0] <= new <= old_range[1] or new_range[0] <= old <= new_range[1]:
        return ""
    return _factor(old, new)


def _factor(old: float, new: float) -> str:
    return f"{new / old:.2f}x of last" if old else f"{old:g} -> {new:g}"
