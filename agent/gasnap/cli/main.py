"""``gasnap``: argument parsing and dispatch only; the work is elsewhere."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from ..errors import BadRequest, ConfigError, GasnapError
from ..quiesce import VALUES as QUIESCE_VALUES
from ..quiesce import Quiesce
from . import clonecmds, commands, managecmds, volumecmds

# typing for the type checker only, as in gasnap.errors (the CLI's imports stay light)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

Command = Callable[[argparse.Namespace], int]


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, minus its import of shutil (and of bz2 and lzma
    with it) just to learn the terminal's width: 4 ms of every command."""

    def __init__(self, prog: str) -> None:
        try:
            columns = int(os.environ.get("COLUMNS", "0")) or os.get_terminal_size(
                sys.__stdout__.fileno() if sys.__stdout__ else 1).columns
        except (OSError, ValueError):
            columns = 80
        super().__init__(prog, width=max(columns, 40) - 2)


class _Parser(argparse.ArgumentParser):
    """Every parser, subparsers included (argparse makes them of the root's
    class), formats with ``_Formatter``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


# Only the command groups argv names are built: building every parser (25 of
# them) costs more than the rest of a snapshot request's client side.

GroupBuilder = Callable[[argparse.ArgumentParser], None]


def _build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gasnap", description="Consistent live snapshots of libvirt/QEMU guests.")
    parser.add_argument("--api", help="agent API: unix:PATH or http://HOST:PORT "
                        "(default: $GASNAP_API, else unix:/run/gasnap/api.sock)")
    parser.add_argument("--token", help="API token for TCP (default: $GASNAP_TOKEN)")
    parser.add_argument("--token-file", metavar="FILE", help="read the API token from FILE "
                        "(default: $GASNAP_TOKEN_FILE)")
    parser.add_argument("--ca-file", metavar="PEM", help="CAs an https:// agent's "
                        "certificate is checked against (default: $GASNAP_CA_FILE, else "
                        "the system's)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output from commands that run in this process "
                        "(serve, lab, doctor, demo; -vvv: libvirt's event loop too)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    named = [name for name in GROUPS if name in argv]
    if not named or "-h" in argv or "--help" in argv:
        named = list(GROUPS)  # the full list: for help, and for argparse's "invalid choice"
    for name in named:
        help_text, build = GROUPS[name]
        build(sub.add_parser(name, help=help_text))
    return parser


def _serve_parser(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument("--listen", action="append", metavar="ADDRESS",
                       help="unix:PATH or tcp:HOST:PORT (repeatable: every one is served)")
    serve.add_argument("--token", dest="serve_token", help="token required on TCP "
                       "(better: --token-file)")
    serve.add_argument("--token-file", dest="serve_token_file", metavar="FILE",
                       help="read the TCP token from FILE (mode 0600)")
    serve.add_argument("--state-dir")
    serve.add_argument("--libvirt-uri")
    serve.add_argument("--metadata-url")
    serve.add_argument("--check-config", action="store_true",
                       help="validate the configuration (and schedules' domains), then exit")
    serve.set_defaults(func=commands.serve)


def _domain_parsers(group: argparse.ArgumentParser) -> None:
    domain = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    dlist = domain.add_parser("list", help="domains, volumes, chains, guest-agent state")
    _add_json(dlist)
    dlist.set_defaults(func=commands.domain_list)


def _doctor_parser(doctor: argparse.ArgumentParser) -> None:
    doctor.add_argument("--libvirt-uri", default="qemu:///system")
    doctor.add_argument("--state-dir", default="/var/lib/gasnap")
    _add_json(doctor)
    doctor.set_defaults(func=commands.doctor)


def _demo_parser(demo: argparse.ArgumentParser) -> None:
    _add_json(demo)
    demo.set_defaults(func=commands.demo)


def _snapshot_parsers(group: argparse.ArgumentParser) -> None:
    snap = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = snap.add_parser("create", help="one snapshot per selected volume")
    create.add_argument("domains", nargs="+", metavar="DOMAIN")
    create.add_argument("--disk", action="append", default=[], metavar="[DOMAIN:]TARGET",
                        help="only these disks (repeatable; TARGET alone: of every domain)")
    create.add_argument("--name")
    create.add_argument("--description")
    create.add_argument("--quiesce", choices=QUIESCE_VALUES, default=Quiesce.PREFERRED.value)
    create.add_argument("--memory", action="store_true",
                        help="running domains: save their RAM and device state too")
    create.add_argument("--force", action="store_true",
                        help="also volumes Cinder keeps snapshots of (behind Cinder's back)")
    create.add_argument("--no-wait", action="store_true", help="print the task and return")
    _add_json(create)
    create.set_defaults(func=commands.snapshot_create)
    slist = snap.add_parser("list", help="snapshot records")
    slist.add_argument("--domain")
    slist.add_argument("--volume")
    slist.add_argument("--status")
    slist.add_argument("--parent", metavar="ID", help="only the children of snapshot ID")
    slist.add_argument("--roots", action="store_true", help="only snapshots without parent")
    _add_json(slist)
    slist.set_defaults(func=commands.snapshot_list)
    info = snap.add_parser("info", help="one snapshot record")
    info.add_argument("id")
    _add_json(info)
    info.set_defaults(func=commands.snapshot_info)
    delete = snap.add_parser("delete", help="merge a snapshot out of its chain")
    delete.add_argument("id")
    delete.add_argument("--strategy", choices=("auto", "commit", "pull"), default="auto")
    delete.add_argument("--force", action="store_true",
                        help="delete a snapshot Cinder keeps (taken through Nova) anyway")
    delete.add_argument("--no-wait", action="store_true", help="print the task and return")
    _add_json(delete)
    delete.set_defaults(func=commands.snapshot_delete)
    revert = snap.add_parser("revert", help="go back to a snapshot (its whole group)")
    revert.add_argument("id")
    revert.add_argument("--scope", choices=("group", "volume"), default="group")
    revert.add_argument("--force", action="store_true",
                        help="shut running domains down first (started again after)")
    start = revert.add_mutually_exclusive_group()
    start.add_argument("--no-start", dest="start", action="store_false", default=None,
                       help="leave the domains shut off afterwards")
    start.add_argument("--start", dest="start", action="store_true",
                       help="start the domains afterwards, even those that were off")
    revert.add_argument("--no-wait", action="store_true", help="print the task and return")
    _add_json(revert)
    revert.set_defaults(func=commands.snapshot_revert)
    _snapshot_clone_parser(snap.add_parser(
        "clone", help="a new volume from a snapshot (linked or full)"))
    _snapshot_manage_parsers(snap)
    rename = snap.add_parser("rename", help="change a snapshot's name")
    rename.add_argument("id")
    rename.add_argument("name")
    _add_json(rename)
    rename.set_defaults(func=commands.snapshot_rename)


def _snapshot_manage_parsers(snap: Any) -> None:
    manageable = snap.add_parser("manageable", help="the layers of a volume's live chain")
    manageable.add_argument("volume")
    _add_json(manageable)
    manageable.set_defaults(func=managecmds.snapshot_manageable)
    manage = snap.add_parser("manage", help="adopt a layer of a volume's chain as a snapshot")
    manage.add_argument("volume")
    manage.add_argument("file", help="the layer's file name, in the volume's directory")
    manage.add_argument("--name")
    _add_json(manage)
    manage.set_defaults(func=managecmds.snapshot_manage)
    unmanage = snap.add_parser("unmanage", help="forget a snapshot record; files stay")
    unmanage.add_argument("id")
    _add_json(unmanage)
    unmanage.set_defaults(func=managecmds.snapshot_unmanage)


def _snapshot_clone_parser(clone: argparse.ArgumentParser) -> None:
    clone.add_argument("id")
    clone.add_argument("--full", action="store_true", help="an independent copy")
    clone.add_argument("--name")
    clone.add_argument("--attach", metavar="DOMAIN", help="hot-plug it into DOMAIN")
    _attach_options(clone)
    clone.add_argument("--no-wait", action="store_true", help="print the task and return")
    _add_json(clone)
    clone.set_defaults(func=clonecmds.snapshot_clone)


def _attach_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", metavar="vdX", help="the disk's name in the domain "
                        "(default: the first free one)")
    parser.add_argument("--readonly", action="store_true", help="the guest may not write it")


def _clone_parsers(group: argparse.ArgumentParser) -> None:
    clone = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    clist = clone.add_parser("list", help="clone records")
    clist.add_argument("--snapshot", metavar="ID", help="only clones of snapshot ID")
    _add_json(clist)
    clist.set_defaults(func=clonecmds.clone_list)
    for action, func, text in (("info", clonecmds.clone_info, "one clone record"),
                               ("detach", clonecmds.clone_detach, "unplug a clone")):
        parser = clone.add_parser(action, help=text)
        parser.add_argument("id")
        _add_json(parser)
        parser.set_defaults(func=func)
    attach = clone.add_parser("attach", help="hot-plug a clone into a domain")
    attach.add_argument("id")
    attach.add_argument("domain")
    _attach_options(attach)
    _add_json(attach)
    attach.set_defaults(func=clonecmds.clone_attach)
    for action, func, text in (
            ("flatten", clonecmds.clone_flatten, "make a linked clone independent"),
            ("delete", clonecmds.clone_delete, "delete a clone and its file")):
        parser = clone.add_parser(action, help=text)
        parser.add_argument("id")
        parser.add_argument("--no-wait", action="store_true",
                            help="print the task and return")
        _add_json(parser)
        parser.set_defaults(func=func)


def _volume_parsers(group: argparse.ArgumentParser) -> None:
    volume = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    limits = volume.add_parser("limits", help="a volume's snapshot limits; with flags, "
                               "change them ('default': back to [limits])")
    limits.add_argument("volume", metavar="VOLUME")
    unset = volumecmds.UNSET
    limits.add_argument("--max", type=volumecmds.limit_number, default=unset, metavar="N",
                        help="max_snapshots: a create past it is refused")
    limits.add_argument("--soft", type=volumecmds.limit_number, default=unset,
                        metavar="PERCENT", help="soft_limit_percent of each hard limit")
    limits.add_argument("--auto-delete", type=volumecmds.limit_switch, default=unset,
                        metavar="on|off", help="merge the oldest snapshots away past the "
                        "soft limit")
    limits.add_argument("--max-depth", type=volumecmds.limit_number, default=unset,
                        metavar="N", help="max_chain_depth: files in the chain, active "
                        "included")
    _add_json(limits)
    limits.set_defaults(func=volumecmds.volume_limits)


def _metadata_parsers(group: argparse.ArgumentParser) -> None:
    metadata = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    mserve = metadata.add_parser("serve", help="run the metadata service")
    mserve.add_argument("--listen", default="unix:/run/gasnap/metadata.sock",
                        help="unix:PATH or tcp:HOST:PORT (TCP needs --token)")
    mserve.add_argument("--db", default="sqlite:////var/lib/gasnap/metadata-service.db",
                        help="sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
    mserve.add_argument("--token", dest="serve_token",
                        help="token callers must present (or $GASNAP_METADATA_TOKEN; "
                        "better: --token-file)")
    mserve.add_argument("--token-file", metavar="FILE",
                        help="read the token from FILE (mode 0600)")
    mserve.add_argument("--tls-cert", metavar="PEM", help="TCP speaks TLS with this "
                        "certificate (and --tls-key)")
    mserve.add_argument("--tls-key", metavar="PEM")
    mserve.set_defaults(func=commands.metadata_serve)


def _lab_parsers(group: argparse.ArgumentParser) -> None:
    lab = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = lab.add_parser("up", help="create and boot a lab guest")
    up.add_argument("name")
    up.add_argument("--disks", type=int, default=1)
    up.add_argument("--size", type=int, default=128, help="MiB per data disk")
    _add_json(up)
    up.add_argument("--disk-format", choices=("qcow2", "raw"), default="qcow2",
                    help="format of the data disks (default qcow2)")
    up.set_defaults(func=commands.lab_up)
    down = lab.add_parser("down", help="destroy a lab guest and its files")
    down.add_argument("name")
    for parser in (up, down):
        parser.add_argument("--backend", choices=("libvirt", "qmp"), default="libvirt",
                            help="qmp: a bare QEMU process with NAME.qmp and NAME.qga "
                            "sockets in $GASNAP_QMP_RUN_DIR (default /run/gasnap/qemu)")
    _add_json(down)
    down.set_defaults(func=commands.lab_down)
    llist = lab.add_parser("list", help="lab guests")
    _add_json(llist)
    llist.set_defaults(func=commands.lab_list)
    image = lab.add_parser("image", help="build the lab image (make setup does)")
    image.add_argument("--rebuild", action="store_true")
    _add_json(image)
    image.set_defaults(func=commands.lab_image)


def _schedule_parsers(group: argparse.ArgumentParser) -> None:
    schedule = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    srun = schedule.add_parser("run", help="run a schedule now (what its timer does)")
    srun.add_argument("name")
    srun.add_argument("--no-wait", action="store_true", help="print the task and return")
    _add_json(srun)
    srun.set_defaults(func=commands.schedule_run)


def _task_parsers(group: argparse.ArgumentParser) -> None:
    task = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    tlist = task.add_parser("list")
    _add_json(tlist)
    tlist.set_defaults(func=commands.task_list)
    for action, func in (("show", commands.task_show), ("wait", commands.task_wait)):
        parser = task.add_parser(action)
        parser.add_argument("id")
        _add_json(parser)
        parser.set_defaults(func=func)


GROUPS: dict[str, tuple[str, GroupBuilder]] = {
    "serve": ("run the agent", _serve_parser),
    "schedule": ("configured schedules", _schedule_parsers),
    "domain": ("domains and their volumes", _domain_parsers),
    "snapshot": ("create, list, revert, clone snapshots", _snapshot_parsers),
    "clone": ("volumes made from snapshots", _clone_parsers),
    "volume": ("a volume's limits", _volume_parsers),
    "task": ("asynchronous tasks", _task_parsers),
    "metadata": ("the reference metadata service", _metadata_parsers),
    "lab": ("disposable test guests", _lab_parsers),
    "doctor": ("check the host", _doctor_parser),
    "demo": ("the README's first command", _demo_parser),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _build_parser(argv).parse_args(argv)
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
