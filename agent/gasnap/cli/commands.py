"""One function per command: unpack the arguments, call the library, print.

Imports of the heavy parts (aiohttp, libvirt) stay inside the commands that
need them so that talking to the agent stays cheap.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from . import output

# typing for the type checker only, as in gasnap.errors (the CLI's imports stay light)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def _run(args: argparse.Namespace, coro: Any, *, daemon: bool = False) -> Any:
    """Run CORO in this process, with logging set up.  asyncio and logging are
    imported only by the commands that work in-process: they cost more than a
    whole snapshot request's client side otherwise would."""
    import asyncio
    import logging

    level = logging.WARNING - 10 * min(args.verbose, 2)
    if daemon:
        level = min(level, logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose < 3:
        # libvirtaio logs every handle and timer update at DEBUG.
        logging.getLogger("virEventAsyncIOImpl").setLevel(max(level, logging.INFO))
    return asyncio.run(coro)


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _show(args: argparse.Namespace, doc: Any, human: Callable[[Any], None]) -> None:
    """``--json``: the record as is; otherwise HUMAN's rendering of it."""
    if args.json:
        output.emit_json(doc)
    else:
        human(doc)


def _client(args: argparse.Namespace) -> Any:
    from ..client import DEFAULT_API, ApiClient

    # $GASNAP_API, $GASNAP_TOKEN(_FILE) and $GASNAP_CA_FILE stand in for the flags.
    token = args.token or os.environ.get("GASNAP_TOKEN")
    token_file = args.token_file or os.environ.get("GASNAP_TOKEN_FILE")
    if token_file and not token:
        from ..secretfile import read_secret

        token = read_secret(token_file, "--token-file")
    return ApiClient(args.api or os.environ.get("GASNAP_API") or DEFAULT_API, token,
                     ca_file=args.ca_file or os.environ.get("GASNAP_CA_FILE"))


# --- agent ------------------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .. import config
    from ..api.server import serve as run_server

    settings = config.load(
        Path(args.config) if args.config else None,
        {
            "listen": args.listen,
            "token": args.serve_token,
            "token_file": args.serve_token_file,
            "state_dir": args.state_dir,
            "libvirt_uri": args.libvirt_uri,
            "metadata_url": args.metadata_url,
        },
    )
    if args.check_config:
        from ..api.server import check_schedules

        _run(args, check_schedules(settings, strict=True))
        where = args.config or str(config.DEFAULT_CONFIG)
        print(f"gasnap: configuration OK ({where}; {len(settings.schedules)} schedule(s))")
        return 0
    _run(args, run_server(settings), daemon=True)
    return 0


def schedule_run(args: argparse.Namespace) -> int:
    client = _client(args)
    task = client.request("POST", f"/v1/schedules/{_quote(args.name)}/run")["task"]
    if not args.no_wait:
        task = client.wait_task(task)
    return _finish_task(args, task)


def metadata_serve(args: argparse.Namespace) -> int:
    from ..metaserver.app import ServiceSettings
    from ..metaserver.app import serve as run_service
    from ..secretfile import read_secret

    # The token may come from a root-only file or the environment, so that
    # it stays off argv.
    token = args.serve_token or os.environ.get("GASNAP_METADATA_TOKEN", "")
    if args.token_file:
        token = read_secret(args.token_file, "--token-file")
    settings = ServiceSettings(listen=args.listen, db_url=args.db, token=token,
                               tls_cert=args.tls_cert or "", tls_key=args.tls_key or "")
    _run(args, run_service(settings), daemon=True)
    return 0


def domain_list(args: argparse.Namespace) -> int:
    records = _client(args).get("/v1/domains")["domains"]
    _show(args, records, output.domains)
    return 0


# --- snapshots and tasks ---------------------------------------------------------


def _disks(domains: list[str], specs: list[str]) -> dict[str, list[str]]:
    disks: dict[str, list[str]] = {}
    for spec in specs:
        domain, sep, target = spec.rpartition(":")
        for name in [domain] if sep else domains:
            disks.setdefault(name, []).append(target)
    return disks


def _finish_task(args: argparse.Namespace, task: dict[str, Any]) -> int:
    _show(args, task, output.task)
    if task["state"] == "failed":
        print(f"gasnap: {task['error']['message']}", file=sys.stderr)
        return 1
    return 0


def snapshot_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"domains": args.domains, "quiesce": args.quiesce}
    if args.memory:
        body["memory"] = True
    if args.force:
        body["force"] = True
    if args.disk:
        body["disks"] = _disks(args.domains, args.disk)
    if args.name is not None:
        body["name"] = args.name
    if args.description is not None:
        body["description"] = args.description
    client = _client(args)
    task = client.request("POST", "/v1/snapshots", body)["task"]
    if not args.no_wait:
        task = client.wait_task(task)
    return _finish_task(args, task)


def snapshot_delete(args: argparse.Namespace) -> int:
    client = _client(args)
    force = "&force=true" if args.force else ""
    task = client.request(
        "DELETE", f"/v1/snapshots/{_quote(args.id)}?strategy={args.strategy}{force}")["task"]
    if not args.no_wait:
        task = _wait_with_bar(client, task) if sys.stderr.isatty() else client.wait_task(task)
    return _finish_task(args, task)


def snapshot_revert(args: argparse.Namespace) -> int:
    client = _client(args)
    body = {"scope": args.scope, "force": args.force, "start": args.start}
    task = client.request("POST", f"/v1/snapshots/{_quote(args.id)}/revert", body)["task"]
    if not args.no_wait:
        task = client.wait_task(task)
    return _finish_task(args, task)


def _wait_with_bar(client: Any, task: dict[str, Any], label: str = "merging"
                   ) -> dict[str, Any]:
    """Follow the task's progress with a bar on the terminal (stderr)."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    columns = (TextColumn(label), BarColumn(), TaskProgressColumn())
    with Progress(*columns, transient=True) as bar:
        line = bar.add_task("merge", total=100)
        while task["state"] in ("queued", "running"):
            bar.update(line, completed=task["progress"])
            task = client.get(f"/v1/tasks/{task['id']}?wait=0.5")
        bar.update(line, completed=task["progress"])
    return task


def snapshot_list(args: argparse.Namespace) -> int:
    query = {"domain": args.domain, "volume_id": args.volume, "status": args.status,
             "parent": args.parent, "roots": "true" if args.roots else None}
    path = "/v1/snapshots"
    if any(v is not None for v in query.values()):
        from urllib.parse import urlencode

        path += "?" + urlencode({k: v for k, v in query.items() if v is not None})
    records = _client(args).get(path)["snapshots"]
    _show(args, records, output.snapshots)
    return 0


def snapshot_info(args: argparse.Namespace) -> int:
    record = _client(args).get(f"/v1/snapshots/{_quote(args.id)}")
    _show(args, record, output.snapshot)
    return 0


def snapshot_rename(args: argparse.Namespace) -> int:
    record = _client(args).request("PATCH", f"/v1/snapshots/{_quote(args.id)}",
                                   {"name": args.name})
    _show(args, record, output.snapshot)
    return 0


def task_list(args: argparse.Namespace) -> int:
    _show(args, _client(args).get("/v1/tasks")["tasks"], output.tasks)
    return 0


def task_show(args: argparse.Namespace) -> int:
    task = _client(args).get(f"/v1/tasks/{_quote(args.id)}")
    _show(args, task, output.task)
    return 0


def task_wait(args: argparse.Namespace) -> int:
    client = _client(args)
    return _finish_task(args, client.wait_task(client.get(f"/v1/tasks/{_quote(args.id)}")))


# --- lab --------------------------------------------------------------------


def _lab_run(args: argparse.Namespace, coro_factory: Any,
             uri: str = "qemu:///system") -> Any:
    from ..lab.guests import Lab
    from ..virt import LibvirtHypervisor

    async def run() -> Any:
        hv = LibvirtHypervisor(uri)
        try:
            return await coro_factory(Lab(hv))
        finally:
            await hv.close()

    return _run(args, run())


def lab_up(args: argparse.Namespace) -> int:
    if args.backend == "qmp":
        from ..lab.bare import BareLab

        record = _run(args, BareLab().up(args.name, disks=args.disks, size_mib=args.size,
                                         disk_format=args.disk_format))
        _show(args, record, lambda r: print(f"{r['name']}  qmp {r['qmp']}  qga {r['qga']}"))
        return 0
    dom = _lab_run(args, lambda lab: lab.up(args.name, disks=args.disks, size_mib=args.size,
                                            disk_format=args.disk_format))
    _show(args, dom.to_record(), lambda record: output.domains([record]))
    return 0


def lab_down(args: argparse.Namespace) -> int:
    if args.backend == "qmp":
        from ..lab.bare import BareLab

        _run(args, BareLab().down(args.name))
    else:
        _lab_run(args, lambda lab: lab.down(args.name))
    if args.json:
        output.emit_json({"name": args.name, "removed": True})
    return 0


def lab_list(args: argparse.Namespace) -> int:
    records = [d.to_record() for d in _lab_run(args, lambda lab: lab.list())]
    _show(args, records, output.domains)
    return 0


def lab_image(args: argparse.Namespace) -> int:
    from ..lab.image import ensure_image

    image = _run(args, ensure_image(rebuild=args.rebuild))
    doc = {"kernel": str(image.kernel), "initrd": str(image.initrd)}
    _show(args, doc, lambda d: print(f"kernel {d['kernel']}\ninitrd {d['initrd']}"))
    return 0


# --- host -------------------------------------------------------------------


def doctor(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..doctor import CheckStatus, run_checks

    checks = _run(args, run_checks(args.libvirt_uri, Path(args.state_dir)))
    _show(args, [c.to_record() for c in checks], output.checks)
    return 1 if any(c.status is CheckStatus.FAIL for c in checks) else 0


def demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    summary = _run(args, run_demo(print if not args.json else _quiet))
    if args.json:
        output.emit_json(summary)
    return 0


def _quiet(*_args: Any) -> None:
    print(*_args, file=sys.stderr)
