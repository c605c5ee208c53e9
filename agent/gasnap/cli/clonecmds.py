"""The clone commands: ``snapshot clone`` and ``clone list|info|attach|detach|
flatten|delete``.  Each is one API call (and a wait for its task)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import output
from .commands import _client, _finish_task, _quote, _show, _wait_with_bar


def _wait(args: argparse.Namespace, client: Any, task: dict[str, Any], label: str) -> int:
    if not args.no_wait:
        task = (_wait_with_bar(client, task, label) if sys.stderr.isatty()
                else client.wait_task(task))
    return _finish_task(args, task)


def _attach_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"domain": args.attach if "attach" in args else args.domain}
    if args.target is not None:
        body["target"] = args.target
    if args.readonly:
        body["readonly"] = True
    return body


def snapshot_clone(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"mode": "full" if args.full else "linked"}
    if args.name is not None:
        body["name"] = args.name
    if args.attach is not None:
        body["attach"] = _attach_body(args)
    elif args.target is not None or args.readonly:
        print("gasnap: --target and --readonly need --attach DOMAIN", file=sys.stderr)
        return 2
    client = _client(args)
    task = client.request("POST", f"/v1/snapshots/{_quote(args.id)}/clone", body)["task"]
    return _wait(args, client, task, "copying")


def clone_list(args: argparse.Namespace) -> int:
    path = "/v1/clones" + (f"?snapshot_id={_quote(args.snapshot)}" if args.snapshot else "")
    _show(args, _client(args).get(path)["clones"], output.clones)
    return 0


def clone_info(args: argparse.Namespace) -> int:
    _show(args, _client(args).get(f"/v1/clones/{_quote(args.id)}"), output.snapshot)
    return 0


def clone_attach(args: argparse.Namespace) -> int:
    doc = _client(args).request("POST", f"/v1/clones/{_quote(args.id)}/attach",
                                _attach_body(args))
    _show(args, doc["clone"], output.snapshot)
    return 0


def clone_detach(args: argparse.Namespace) -> int:
    doc = _client(args).request("POST", f"/v1/clones/{_quote(args.id)}/detach", {})
    _show(args, doc["clone"], output.snapshot)
    return 0


def clone_flatten(args: argparse.Namespace) -> int:
    client = _client(args)
    task = client.request("POST", f"/v1/clones/{_quote(args.id)}/flatten", {})["task"]
    return _wait(args, client, task, "flattening")


def clone_delete(args: argparse.Namespace) -> int:
    client = _client(args)
    task = client.request("DELETE", f"/v1/clones/{_quote(args.id)}")["task"]
    return _wait(args, client, task, "deleting")
