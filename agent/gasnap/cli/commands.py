"""One function per command: unpack the arguments, call the library, print.

Imports of the heavy parts (aiohttp, libvirt) stay inside the commands that
need them so that talking to the agent stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from . import output


def _client(args: argparse.Namespace) -> Any:
    from ..client import DEFAULT_API, ApiClient

    return ApiClient(args.api or DEFAULT_API, args.token)


# --- agent ------------------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    from .. import config
    from ..api.server import serve as run_server

    settings = config.load(
        Path(args.config) if args.config else None,
        {
            "listen": args.listen,
            "token": args.serve_token,
            "state_dir": args.state_dir,
            "libvirt_uri": args.libvirt_uri,
            "metadata_url": args.metadata_url,
        },
    )
    asyncio.run(run_server(settings))
    return 0


def domain_list(args: argparse.Namespace) -> int:
    records = _client(args).get("/v1/domains")["domains"]
    if args.json:
        output.emit_json(records)
    else:
        output.domains(records)
    return 0


# --- lab --------------------------------------------------------------------


def _lab_run(coro_factory: Any, uri: str = "qemu:///system") -> Any:
    from ..lab.guests import Lab
    from ..virt import LibvirtHypervisor

    async def run() -> Any:
        hv = LibvirtHypervisor(uri)
        try:
            return await coro_factory(Lab(hv))
        finally:
            await hv.close()

    return asyncio.run(run())


def lab_up(args: argparse.Namespace) -> int:
    dom = _lab_run(lambda lab: lab.up(args.name, disks=args.disks, size_mib=args.size))
    if args.json:
        output.emit_json(dom.to_record())
    else:
        output.domains([dom.to_record()])
    return 0


def lab_down(args: argparse.Namespace) -> int:
    _lab_run(lambda lab: lab.down(args.name))
    if args.json:
        output.emit_json({"name": args.name, "removed": True})
    return 0


def lab_list(args: argparse.Namespace) -> int:
    records = [d.to_record() for d in _lab_run(lambda lab: lab.list())]
    if args.json:
        output.emit_json(records)
    else:
        output.domains(records)
    return 0


def lab_image(args: argparse.Namespace) -> int:
    from ..lab.image import ensure_image

    image = asyncio.run(ensure_image(rebuild=args.rebuild))
    doc = {"kernel": str(image.kernel), "initrd": str(image.initrd)}
    if args.json:
        output.emit_json(doc)
    else:
        print(f"kernel {doc['kernel']}\ninitrd {doc['initrd']}")
    return 0


# --- host -------------------------------------------------------------------


def doctor(args: argparse.Namespace) -> int:
    from ..doctor import Status, run_checks

    checks = asyncio.run(run_checks(args.libvirt_uri, Path(args.state_dir)))
    if args.json:
        output.emit_json([c.to_record() for c in checks])
    else:
        for check in checks:
            print(f"{check.status.value:<4}  {check.name}: {check.detail}")
    return 1 if any(c.status is Status.FAIL for c in checks) else 0


def demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    summary = asyncio.run(run_demo(print if not args.json else _quiet))
    if args.json:
        output.emit_json(summary)
    return 0


def _quiet(*_args: Any) -> None:
    print(*_args, file=sys.stderr)
