"""``gasnap``: argument parsing and dispatch only; the work is elsewhere."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from ..errors import BadRequest, ConfigError, GasnapError
from . import commands

Command = Callable[[argparse.Namespace], int]


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gasnap", description=__doc__)
    parser.add_argument("--api", help="agent API: unix:PATH or http://HOST:PORT "
                        "(default: $GASNAP_API, else unix:/run/gasnap/api.sock)")
    parser.add_argument("--token", help="API token for TCP (default: $GASNAP_TOKEN)")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the agent")
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument("--listen", help="unix:PATH or tcp:HOST:PORT")
    serve.add_argument("--token", dest="serve_token", help="token required on TCP")
    serve.add_argument("--state-dir")
    serve.add_argument("--libvirt-uri")
    serve.add_argument("--metadata-url")
    serve.add_argument("--check-config", action="store_true",
                       help="validate the configuration (and schedules' domains), then exit")
    serve.set_defaults(func=commands.serve)

    _schedule_parsers(sub)

    domain = sub.add_parser("domain", help="domains and their volumes").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    dlist = domain.add_parser("list", help="domains, volumes, chains, guest-agent state")
    _add_json(dlist)
    dlist.set_defaults(func=commands.domain_list)

    _snapshot_parsers(sub)
    _task_parsers(sub)

    _metadata_parsers(sub)

    _lab_parsers(sub)

    doctor = sub.add_parser("doctor", help="check the host")
    doctor.add_argument("--libvirt-uri", default="qemu:///system")
    doctor.add_argument("--state-dir", default="/var/lib/gasnap")
    _add_json(doctor)
    doctor.set_defaults(func=commands.doctor)

    demo = sub.add_parser("demo", help="the README's first command")
    _add_json(demo)
    demo.set_defaults(func=commands.demo)
    return parser


def _snapshot_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    snap = sub.add_parser("snapshot", help="create, list, rename snapshots").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    create = snap.add_parser("create", help="one snapshot per selected volume")
    create.add_argument("domains", nargs="+", metavar="DOMAIN")
    create.add_argument("--disk", action="append", default=[], metavar="[DOMAIN:]TARGET",
                        help="only these disks (repeatable; TARGET alone: of every domain)")
    create.add_argument("--name")
    create.add_argument("--description")
    create.add_argument("--quiesce", choices=("required", "preferred", "off"),
                        default="preferred")
    create.add_argument("--no-wait", action="store_true", help="print the task and return")
    _add_json(create)
    create.set_defaults(func=commands.snapshot_create)
    slist = snap.add_parser("list", help="snapshot records")
    slist.add_argument("--domain")
    slist.add_argument("--volume")
    slist.add_argument("--status")
    _add_json(slist)
    slist.set_defaults(func=commands.snapshot_list)
    info = snap.add_parser("info", help="one snapshot record")
    info.add_argument("id")
    _add_json(info)
    info.set_defaults(func=commands.snapshot_info)
    delete = snap.add_parser("delete", help="merge a snapshot out of its chain")
    delete.add_argument("id")
    delete.add_argument("--strategy", choices=("auto", "commit", "pull"), default="auto")
    delete.add_argument("--no-wait", action="store_true", help="print the task and return")
    _add_json(delete)
    delete.set_defaults(func=commands.snapshot_delete)
    rename = snap.add_parser("rename", help="change a snapshot's name")
    rename.add_argument("id")
    rename.add_argument("name")
    _add_json(rename)
    rename.set_defaults(func=commands.snapshot_rename)


def _metadata_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    metadata = sub.add_parser("metadata", help="the reference metadata service").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    mserve = metadata.add_parser("serve", help="run the metadata service")
    mserve.add_argument("--listen", default="unix:/run/gasnap/metadata.sock",
                        help="unix:PATH or tcp:HOST:PORT (TCP needs --token)")
    mserve.add_argument("--db", default="sqlite:////var/lib/gasnap/metadata-service.db",
                        help="sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
    mserve.add_argument("--token", dest="serve_token",
                        help="token callers must present (or $GASNAP_METADATA_TOKEN)")
    mserve.set_defaults(func=commands.metadata_serve)


def _lab_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lab = sub.add_parser("lab", help="disposable test guests").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    up = lab.add_parser("up", help="create and boot a lab guest")
    up.add_argument("name")
    up.add_argument("--disks", type=int, default=1)
    up.add_argument("--size", type=int, default=128, help="MiB per data disk")
    _add_json(up)
    up.set_defaults(func=commands.lab_up)
    down = lab.add_parser("down", help="destroy a lab guest and its files")
    down.add_argument("name")
    _add_json(down)
    down.set_defaults(func=commands.lab_down)
    llist = lab.add_parser("list", help="lab guests")
    _add_json(llist)
    llist.set_defaults(func=commands.lab_list)
    image = lab.add_parser("image", help="build the lab image (make setup does)")
    image.add_argument("--rebuild", action="store_true")
    _add_json(image)
    image.set_defaults(func=commands.lab_image)


def _schedule_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    schedule = sub.add_parser("schedule", help="configured schedules").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    srun = schedule.add_parser("run", help="run a schedule now (what its timer does)")
    srun.add_argument("name")
    srun.add_argument("--no-wait", action="store_true", help="print the task and return")
    _add_json(srun)
    srun.set_defaults(func=commands.schedule_run)


def _task_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    task = sub.add_parser("task", help="asynchronous tasks").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    tlist = task.add_parser("list")
    _add_json(tlist)
    tlist.set_defaults(func=commands.task_list)
    for action, func in (("show", commands.task_show), ("wait", commands.task_wait)):
        parser = task.add_parser(action)
        parser.add_argument("id")
        _add_json(parser)
        parser.set_defaults(func=func)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    if args.command == "serve" or (args.command, getattr(args, "action", "")) == (
            "metadata", "serve"):
        level = min(level, logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func: Command = args.func
    try:
        return func(args)
    except ConfigError as err:
        print(f"gasnap: {err.message}", file=sys.stderr)
        return 2
    except BadRequest as err:
        print(f"gasnap: {err.message}", file=sys.stderr)
        return 2
    except GasnapError as err:
        print(f"gasnap: {err.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
