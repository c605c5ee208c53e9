"""How long each phase of a freeze window took, and which guest took longest.

A group's window is as long as its slowest guest at each phase: every
switch starts once the last freeze has answered, every thaw once the last
switch has.  The create task's result carries these figures (``window``), so
that the guest bounding a group's window is named, not guessed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

PHASES = ("arm", "freeze", "switch", "thaw")


@dataclass
class WindowTimes:
    phases: dict[str, float] = field(default_factory=dict)  # seconds: first call to last answer
    calls: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> domain -> s

    async def call(self, phase: str, domain: str, awaitable: Awaitable[T]) -> T:
        """AWAITABLE, its seconds noted as DOMAIN's share of PHASE (failed or not)."""
        started = time.monotonic()
        try:
            return await awaitable
        finally:
            self.calls.setdefault(phase, {})[domain] = time.monotonic() - started

    def to_result(self) -> dict[str, Any]:
        """``{"freeze_ms": ..., ..., "slowest": {"freeze": {"domain", "ms"}, ...}}``"""
        doc: dict[str, Any] = {f"{p}_ms": _ms(self.phases[p]) for p in PHASES
                               if p in self.phases}
        slowest = {}
        for phase in PHASES:
            calls = self.calls.get(phase)
            if calls:
                domain = max(calls, key=lambda d: calls[d])
                slowest[phase] = {"domain": domain, "ms": _ms(calls[domain])}
        doc["slowest"] = slowest
        return doc


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)
