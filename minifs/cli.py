"""The `minifs` command line.

argparse rather than click or typer, and every heavy import (pluggy, rich,
sqlite, drivers) inside the command that needs it: `minifs --help` and small
commands must start in the time peers like `ctr` or `crun` do. Errors a user
can act on print as one line and exit 2; there is never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from minifs.arguments import open_storage, pairs
from minifs.errors import MinifsError
from minifs.output import ago, emit, human_size, table

DEFAULT_DRIVER = "overlay2"


# -- commands ---------------------------------------------------------------


def cmd_drivers(args: argparse.Namespace) -> int:
    from minifs.errors import MinifsError as Unavailable
    from minifs.plugins import registered

    entries = []
    for name, reg in sorted(registered().items()):
        cls = reg.driver
        try:
            cls.probe()
            available, reason, version = True, None, cls.version()
        except Unavailable as exc:
            available, reason, version = False, str(exc), None
        entries.append(
            {
                "name": name,
                "kind": cls.kind.value,
                "available": available,
                "reason": reason,
                "backend": cls.backend,
                "version": version,
                "max_layers": cls.max_depth,
                "plugin": reg.plugin,
                "plugin_version": reg.plugin_version,
            }
        )
    emit(
        args,
        entries,
        lambda: table(
            ("DRIVER", "KIND", "AVAILABLE", "BACKEND", "VERSION", "PLUGIN", "REASON"),
            [
                (
                    e["name"],
                    e["kind"],
                    "yes" if e["available"] else "no",
                    e["backend"],
                    e["version"],
                    e["plugin"],
                    e["reason"],
                )
                for e in entries
            ],
        ),
    )
    return 0


def _print_info(args: argparse.Namespace, info: Any) -> None:
    emit(args, info.to_dict(), lambda: print(info.name))


def cmd_clone(args: argparse.Namespace) -> int:
    with open_storage(args) as storage, storage.changing():
        parent = args.parent
        if parent is not None:
            from minifs.images import resolve_layer

            parent = resolve_layer(storage, parent)  # a layer, or an image unpacked here
        info = storage.clone(args.name, parent, pairs(args.label, "--label"))
        _print_info(args, info)
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    with open_storage(args) as storage:
        info = storage.view(args.name, args.parent, pairs(args.label, "--label"))
        _print_info(args, info)
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    with open_storage(args) as storage:
        info = storage.snapshot(args.clone, args.layer, pairs(args.label, "--label"), args.keep)
        _print_info(args, info)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from minifs.state import StateDir
    from minifs.storage import matches, parse_filters
    from minifs.store import Store

    filters = parse_filters(args.filter or [])
    if args.driver:
        from minifs.plugins import get_driver

        get_driver(args.driver)
    state = StateDir(args.root)
    infos = []
    if state.db_path.exists():
        store = Store(state.db_path)
        infos = [i for i in store.list(args.driver) if matches(i, filters)]
        store.close()
    emit(
        args,
        [i.to_dict() for i in infos],
        lambda: table(
            ("NAME", "KIND", "DRIVER", "PARENT", "STATE", "CREATED", "ID"),
            [
                (
                    i.name,
                    i.kind.value,
                    i.driver,
                    i.parent,
                    i.state.value,
                    ago(i.created),
                    i.id[:12],
                )
                for i in infos
            ],
        ),
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from minifs.container.commands import inspect_container

    if inspect_container(args):
        return 0
    with open_storage(args) as storage:
        info = storage.stat(args.name)
        data = info.to_dict()
        data["mounts"] = [m.to_dict() for m in storage.mounts(args.name)]
        data["mounted_at"] = storage.store.mounts_of(info.id)
        data["depth"] = len(storage.store.chain(info.parent_id))
    emit(args, data, lambda: print(json.dumps(data, indent=2)))
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    with open_storage(args) as storage:
        usage = storage.usage(args.name)
    data = {"name": args.name, **usage.to_dict()}
    emit(
        args,
        data,
        lambda: table(
            ("NAME", "SIZE", "INODES"), [(args.name, human_size(usage.size), usage.inodes)]
        ),
    )
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from minifs.container.commands import remove_container

    with open_storage(args) as storage:
        for name in args.names:
            if not remove_container(args, name):
                storage.remove(name)
            print(name)
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    with open_storage(args) as storage:
        info = storage.set_labels(args.name, pairs(args.labels, "label"))
    emit(args, info.to_dict(), lambda: print(json.dumps(info.labels)))
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    with open_storage(args) as storage:
        print(storage.mount(args.name, args.dir))
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from minifs.state import StateDir
    from minifs.store import Store

    state = StateDir(args.root)
    target = os.path.realpath(args.dir)
    driver = args.driver
    if state.db_path.exists():
        store = Store(state.db_path)
        sid = store.mount_at(target)
        info = store.get_id(sid) if sid else None
        store.close()
        driver = info.driver if info else driver
    with open_storage(args, driver) as storage:
        storage.umount(target)
    return 0


def _storages_with_state(args: argparse.Namespace) -> Iterator[Any]:
    """The --driver given, else every driver that has a home in the state dir.

    Without --driver, one driver that cannot open here (uninstalled plugin,
    missing kernel feature) is reported and skipped so the others still run.
    """
    from minifs.state import StateDir

    if args.driver:
        with open_storage(args, args.driver) as storage:
            yield storage
        return
    try:
        names = sorted(os.listdir(StateDir(args.root).drivers_dir))
    except FileNotFoundError:
        names = []
    for name in names:
        try:
            storage = open_storage(args, name)
        except MinifsError as exc:
            print(f"minifs: warning: skipped {name}: {exc}", file=sys.stderr)
            continue
        with storage:
            yield storage


def cmd_gc(args: argparse.Namespace) -> int:
    from minifs.container.lifecycle import reclaim

    if not args.dry_run:  # containers whose monitor died first: they hold clones
        for line in reclaim(args.root):
            print(line, file=sys.stderr)
    from minifs.layers.scratch import sweep
    from minifs.state import StateDir

    # Spools, staging and mount points of crashed imports/applies, before the
    # drivers' gc removes clones one of them may still have mounted.
    for line in sweep(StateDir(args.root).root, args.dry_run):
        print(line, file=sys.stderr)
    reports = {}
    for storage in _storages_with_state(args):
        reports[storage.name] = storage.gc(args.dry_run).to_dict()

    def human() -> None:
        prefix = "would " if args.dry_run else ""
        for driver, report in reports.items():
            actions = [
                *report["recovered"],
                *(f"remove orphan {o}" for o in report["orphans"]),
                *(f"forget stale mount {m}" for m in report["stale_mounts"]),
            ]
            for action in actions:
                print(f"{driver}: {prefix}{action}")
            if not actions:
                print(f"{driver}: consistent, nothing to do")

    emit(args, reports, human)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stopped = {}
    for storage in _storages_with_state(args):
        stopped[storage.name] = storage.down()
    emit(
        args, stopped, lambda: [print(f"{d}: stopped {s}") for d, ss in stopped.items() for s in ss]
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from minifs_bench.runner import main as run_bench

    return run_bench(args)


# -- parser -------------------------------------------------------------------


class _Skipped:
    """Stands in for the parser of a subcommand this run will not use."""

    def __getattr__(self, name: str) -> Callable[..., _Skipped]:
        return lambda *args, **kwargs: self


class _OnlyCommand:
    """argparse's subparsers, adding only the subcommand on the command line.

    Each subparser costs about 1.5 ms to build (argparse looks up gettext
    catalogs for every help string), and minifs has a few dozen: building them
    all would add ~40 ms to every command, more than a whole `ctr` call. With no
    recognisable command (`minifs --help`, a typo), all are built, so help and
    "invalid choice" errors stay complete.
    """

    def __init__(self, real: Any, wanted: str | None) -> None:
        self.real = real
        self.wanted = wanted
        self.found = False

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        if self.wanted is None or name == self.wanted:
            self.found = True
            return self.real.add_parser(name, **kwargs)
        return _Skipped()


def _command_word(argv: Sequence[str]) -> str | None:
    """The subcommand in argv, skipping global options and their values."""
    it = iter(argv)
    for word in it:
        if word in ("--root", "--storage-opt"):
            next(it, None)
        elif word == "--":
            return next(it, None)
        elif not word.startswith("-"):
            return word
    return None


def build_parser(command_word: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minifs",
        description="Container storage drivers, side by side: clone, snapshot, mount, measure.",
    )
    parser.add_argument(
        "--root",
        metavar="DIR",
        default=None,
        help="state directory (env MINIFS_ROOT, default /var/lib/minifs)",
    )
    parser.add_argument(
        "--storage-opt",
        metavar="DRIVER.KEY=VALUE",
        action="append",
        help="driver option, e.g. overlay2.backing=loop (repeatable)",
    )
    sub = _OnlyCommand(
        parser.add_subparsers(dest="command", metavar="COMMAND", required=True), command_word
    )
    default_driver = os.environ.get("MINIFS_DRIVER", DEFAULT_DRIVER)

    def command(
        name: str,
        func: Callable[[argparse.Namespace], int],
        help: str,
        driver: bool = True,
        json_flag: bool = False,
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        if driver:
            p.add_argument(
                "--driver",
                "-d",
                default=default_driver,
                help=f"storage driver (env MINIFS_DRIVER, default {DEFAULT_DRIVER})",
            )
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON for scripts")
        return p

    p = command(
        "drivers",
        cmd_drivers,
        "list storage drivers and whether they run here",
        driver=False,
        json_flag=True,
    )

    p = command(
        "clone", cmd_clone, "create a writable clone (empty, or on a layer)", json_flag=True
    )
    p.add_argument("name")
    p.add_argument("--from", dest="parent", metavar="LAYER|IMAGE", help="layer or image to clone")
    p.add_argument("--label", action="append", metavar="KEY=VALUE")

    p = command("view", cmd_view, "create a read-only view of a layer", json_flag=True)
    p.add_argument("name")
    p.add_argument("--from", dest="parent", metavar="LAYER", required=True)
    p.add_argument("--label", action="append", metavar="KEY=VALUE")

    p = command(
        "snapshot",
        cmd_snapshot,
        "commit a clone as a new layer (the clone is consumed unless --keep)",
        json_flag=True,
    )
    p.add_argument("clone")
    p.add_argument("layer")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep working in a fresh clone of the same name on the new layer",
    )
    p.add_argument("--label", action="append", metavar="KEY=VALUE")

    p = command("ls", cmd_ls, "list layers, clones and views", driver=False, json_flag=True)
    p.add_argument("--driver", "-d", default=None, help="only this driver (default: all)")
    p.add_argument(
        "--filter",
        "-f",
        action="append",
        metavar="KEY=VALUE",
        help="kind=clone|view|layer, parent=NAME, name=NAME, label.KEY=VALUE",
    )

    p = command("inspect", cmd_inspect, "show one snapshot with its mount records", json_flag=True)
    p.add_argument("name")

    p = command("usage", cmd_usage, "bytes and inodes a snapshot holds itself", json_flag=True)
    p.add_argument("name")

    p = command("rm", cmd_rm, "remove clones, views or layers (children first)")
    p.add_argument("names", nargs="+", metavar="NAME")

    p = command("label", cmd_label, "set labels (KEY= deletes one)", json_flag=True)
    p.add_argument("name")
    p.add_argument("labels", nargs="+", metavar="KEY=VALUE")

    p = command("mount", cmd_mount, "mount a snapshot on an existing directory")
    p.add_argument("name")
    p.add_argument("dir")

    p = command("umount", cmd_umount, "unmount a directory mounted by 'minifs mount'")
    p.add_argument("dir")

    p = command(
        "gc",
        cmd_gc,
        "recover crashed operations and remove orphaned data",
        driver=False,
        json_flag=True,
    )
    p.add_argument("--driver", "-d", default=None, help="only this driver (default: all)")
    p.add_argument("--dry-run", action="store_true", help="say what would change")

    p = command(
        "down",
        cmd_down,
        "stop every backend minifs started (daemons, loops, mounts)",
        driver=False,
        json_flag=True,
    )
    p.add_argument("--driver", "-d", default=None, help="only this driver (default: all)")

    from minifs_bench.options import add_arguments as add_bench_arguments

    p = command(
        "bench",
        cmd_bench,
        "measure drivers: create/delete latency, write amplification, lookups, inodes",
        driver=False,
    )
    add_bench_arguments(p)

    from minifs.images.commands import add_image_parser

    add_image_parser(sub)

    from minifs.layers.commands import add_layer_parser

    add_layer_parser(sub, default_driver)

    from minifs.container.commands import add_container_parser

    add_container_parser(sub, default_driver)
    if not sub.found:
        return build_parser()  # not a command: build all, for help and the error
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command_word(argv)).parse_args(argv)
    try:
        return args.func(args)
    except MinifsError as exc:
        print(f"minifs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("minifs: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"minifs: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    finally:
        # The process ends next: with every object in the permanent generation
        # the interpreter's collections at exit skip them all, ~15 ms of a
        # `minifs run` spent proving garbage that dies with the process anyway.
        gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
