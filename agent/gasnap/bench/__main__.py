"""``python -m gasnap.bench [--quick] [--only P9 ...] [--docs DIR]``: run
P1-P11, print the table, write DIR/benchmarks.md and DIR/benchmarks.json,
and name every figure that moved past its spread since the last committed
docs/benchmarks.json (``--against`` another).

Targets are goals: a missed one is reported, never an error.  The full run
takes about a quarter of an hour on 2 cores; ``--quick`` (fewer runs, a
smaller group) is for development.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..virt import LibvirtHypervisor
from . import cases, clones, depth, fleet, memory, qmpcase, report, revert
from .rig import URI, Agent, reap, scratch

ANALYSIS = Path(__file__).with_name("analysis.md")
ROOT = Path(__file__).resolve().parents[3]
COMMITTED = "docs/benchmarks.json"


def _versions() -> dict[str, str]:
    def first_line(argv: list[str], having: str) -> str:
        out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
        lines = [line.strip() for line in out.splitlines() if having in line]
        return lines[0] if lines else "?"

    return {"host": f"{platform.node()}, {os.cpu_count()} cores",
            "libvirt": first_line(["virsh", "-c", URI, "version", "--daemon"], "daemon"),
            "qemu": first_line(["qemu-system-x86_64", "--version"], "version"),
            "python": platform.python_version()}


def _byte_compile() -> None:
    """An installed package has its bytecode compiled (pip does it); a source
    tree under PYTHONDONTWRITEBYTECODE would recompile every module of every
    CLI run and bill the compiler to P1."""
    compileall.compile_dir(Path(__file__).parents[1], quiet=1)


def _last_committed() -> list[report.Result]:
    """The figures of the last committed run (none outside a checkout)."""
    out = subprocess.run(["git", "-C", str(ROOT), "show", f"HEAD:{COMMITTED}"],
                         capture_output=True, text=True, check=False)
    return report.parse(out.stdout)[0] if out.returncode == 0 else []


def _moves_line(before: list[report.Result], last: dict[tuple[str, str], str]) -> str:
    if not before:
        return "no committed run to compare with"
    named = "; ".join(f"{case} {what}: {change}" for (case, what), change in last.items())
    return f"moved past its spread since the last committed run: {named or 'nothing'}"


async def run(quick: bool, only: frozenset[str] = frozenset()
              ) -> tuple[list[report.Result], dict[str, str]]:
    """Every case, or those ONLY names (P1 and P2 run together)."""
    runs, group, merges = (3, 3, 1) if quick else (10, 8, 10)

    def wanted(*names: str) -> bool:
        return not only or bool(only & set(names))

    hv = LibvirtHypervisor(URI)
    base = scratch()
    agent = Agent(base / "agent")
    agent.base.mkdir(parents=True)
    results: list[report.Result] = []
    started = time.monotonic()
    try:
        _byte_compile()
        await reap(hv)
        await asyncio.to_thread(agent.start)
        # Twice the runs: P2's windows vary by +-15 ms on TCG guests.
        if wanted("P1", "P2"):
            results += await cases.create_vs_virsh(hv, agent, 2 * runs)
            results += await qmpcase.create_on_qmp(hv, 2 * runs, base)
        if wanted("P5"):
            results += await cases.size_independence(hv, agent, runs)
        if wanted("P3"):
            results += await cases.group(hv, agent, runs, group)
        if wanted("P4"):
            results += await cases.merge(hv, agent, merges, base)
        if wanted("P7"):
            results += await revert.revert(hv, agent, 2 if quick else 5, base)
        if wanted("P8"):
            results += await memory.memory(hv, agent, 2 if quick else 5, base)
        if wanted("P9"):
            results += await clones.clones(hv, agent, 4 if quick else 8, base)
        if wanted("P10"):
            results += await depth.depth(hv, agent, 3 if quick else 5)
        agent.stop()
        if wanted("P11"):
            sizes = (10, 100) if quick else (10, 100, 1000)
            results += await asyncio.to_thread(fleet.fleet, sizes, 5 if quick else 15, base)
        if wanted("P6"):
            results += await cases.footprint(base, 30 if quick else 100)
    finally:
        agent.stop()
        await reap(hv)
        await hv.close()
        shutil.rmtree(base, ignore_errors=True)
    context = {**_versions(), "mode": "quick" if quick else "full",
               "duration": f"{time.monotonic() - started:.0f} s"}
    return results, context


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m gasnap.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", default=[], metavar="P",
                        help="run these cases only (P1 ... P11)")
    parser.add_argument("--docs", type=Path, help="write benchmarks.md/.json here")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="no run: render the page again from a benchmarks.json")
    parser.add_argument("--against", type=Path, metavar="JSON",
                        help=f"compare with this run (default: the last committed {COMMITTED})")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    before = report.load(args.against)[0] if args.against else _last_committed()
    if args.render is not None:
        results, context = report.load(args.render)
    else:
        results, context = asyncio.run(run(args.quick, frozenset(args.only)))
    last = report.moves(before, results)
    print(report.table(results, last))
    print(f"\n{context}")
    print(f"\n{_moves_line(before, last)}")
    if args.docs is not None:
        report.write(results, context, ANALYSIS.read_text(), args.docs, last)
        print(f"wrote {args.docs / 'benchmarks.md'} and benchmarks.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
