"""The `minifs` command line.

argparse rather than click or typer, and every heavy import (pluggy, rich,
sqlite, drivers) inside the command that needs it: `minifs --help` and small
commands must start in the time peers like `ctr` or `crun` do. Errors a user
can act on print as one line and exit 2; there is never a traceback.
"""

from __future__ import annotations

import sys


def _quiet_interrupt(kind: type[BaseException], value: BaseException, tb: object) -> None:
    """Ctrl-C before main() runs (while Python imports minifs) has changed
    nothing, so it ends the program with one line instead of a traceback."""
    if issubclass(kind, KeyboardInterrupt):
        print("minifs: interrupted", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, tb)  # type: ignore[arg-type]


if sys.excepthook is sys.__excepthook__:  # first, before the imports below take their time
    sys.excepthook = _quiet_interrupt

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

from minifs.arguments import DefaultDriver, open_storage, pairs, path, storage_options  # noqa: E402
from minifs.errors import MinifsError  # noqa: E402
from minifs.output import ago, each, emit, error, human_size, shown, table  # noqa: E402

TYPE_CHECKING = False  # typing costs ~2 ms of every start; annotations only need it here
if TYPE_CHECKING:
    from typing import Any, NoReturn

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
                "size_limit": cls.size_limit,
                "xattrs": cls.xattrs,
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
    with open_storage(args, names=[args.parent]) as storage:
        size = None
        if args.size is not None:
            from minifs.loopdisk import parse_size

            size = parse_size(args.size)
            storage.check_size(size)  # before an image is unpacked for nothing
        parent = args.parent
        if parent is not None:
            from minifs.images import resolve_layer

            parent = resolve_layer(storage, parent)  # a layer, or an image unpacked here
        info = storage.clone(args.name, parent, pairs(args.label, "--label"), size)
        _print_info(args, info)
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    from minifs.images import resolve_layer

    with open_storage(args, names=[args.parent]) as storage:
        parent = resolve_layer(storage, args.parent)  # as for clone: a layer or an image
        info = storage.view(args.name, parent, pairs(args.label, "--label"))
        _print_info(args, info)
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    with open_storage(args, names=[args.clone]) as storage:
        info = storage.snapshot(args.clone, args.layer, pairs(args.label, "--label"), args.keep)
        _print_info(args, info)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from minifs.filters import matches, parse_filters
    from minifs.state import StateDir
    from minifs.store import Store

    filters = parse_filters(args.filter or [])
    if args.driver:
        from minifs.plugins import get_driver

        get_driver(args.driver)
    infos = []
    store = Store.existing(StateDir(args.root))
    if store is not None:
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
    if _any_containers(args):
        from minifs.container.commands import inspect_container

        if inspect_container(args):
            return 0
    with open_storage(args, names=[args.name]) as storage:
        info = _stat_either(storage, args.name)
        data = info.to_dict()
        data["mounts"] = [m.to_dict() for m in storage.mounts(args.name)]
        data["mounted_at"] = storage.mounted_at(info)
        data["depth"] = len(storage.chain(info))
    emit(args, data, lambda: print(json.dumps(data, indent=2)))
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    with open_storage(args, names=[args.name]) as storage:
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


def _any_containers(args: argparse.Namespace) -> bool:
    """Whether the state dir has a container at all: only then is a name
    looked up among them (the container modules cost ~14 ms to load)."""
    from minifs.state import resolve_root

    try:
        with os.scandir(resolve_root(args.root) / "containers") as entries:
            return next(entries, None) is not None
    except (FileNotFoundError, NotADirectoryError):
        return False


def _stat_either(storage: Any, name: str) -> Any:
    """`storage.stat`, whose NotFound names both kinds `rm` and `inspect` take."""
    from minifs.errors import NotFound

    try:
        return storage.stat(name)
    except NotFound:
        raise NotFound(
            f"no container, nor snapshot on driver {storage.name}, named {name!r}; "
            "see 'minifs ps -a' and 'minifs ls' (or pass --driver)"
        ) from None


def cmd_rm(args: argparse.Namespace) -> int:
    containers = _any_containers(args)
    if containers:
        from minifs.container.commands import remove_container

    def remove(name: str) -> None:
        if not (containers and remove_container(args, name)):
            with open_storage(args, names=[name]) as storage:  # each on its own driver
                _stat_either(storage, name)
                storage.remove(name)
        print(name)

    return each(args.names, remove)


def cmd_label(args: argparse.Namespace) -> int:
    with open_storage(args, names=[args.name]) as storage:
        info = storage.set_labels(args.name, pairs(args.labels, "label"))
    emit(args, info.to_dict(), lambda: print(json.dumps(info.labels)))
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    with open_storage(args, names=[args.name]) as storage:
        print(storage.mount(args.name, args.dir))
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from minifs.state import StateDir
    from minifs.store import Store

    target = os.path.realpath(args.dir)
    driver = args.driver
    store = Store.existing(StateDir(args.root))
    if store is not None:
        sid = store.mount_at(target)
        info = store.get_id(sid) if sid else None
        store.close()
        driver = info.driver if info else driver
    with open_storage(args, driver) as storage:
        storage.umount(target)
    return 0


def _each_driver(
    args: argparse.Namespace, action: Callable[[Any], Any]
) -> tuple[dict[str, Any], int]:
    """`action(storage)` on the --driver given, else on every driver that has a
    home in the state dir; returns the results by driver and an exit status.

    Without --driver, one driver that cannot open here (uninstalled plugin,
    missing kernel feature) is reported and skipped so the others still run,
    and so is one whose action fails (a damaged home): then the status says so.
    A store that cannot be used stops everything: no driver can be judged
    without it.
    """
    from minifs.errors import StateDirError
    from minifs.state import StateDir
    from minifs.store import Store

    store = Store.existing(StateDir(args.root))  # a lost or damaged store: one error
    if store is not None:
        store.close()
    if args.driver:
        with open_storage(args, args.driver) as storage:
            return {storage.name: action(storage)}, 0
    try:
        names = sorted(os.listdir(StateDir(args.root).drivers_dir))
    except FileNotFoundError:
        names = []
    results, status = {}, 0
    for name in names:
        try:
            storage = open_storage(args, name)
        except StateDirError:
            raise
        except MinifsError as exc:
            print(f"minifs: warning: skipped {name}: {shown(str(exc))}", file=sys.stderr)
            status = 1  # its data went unchecked: not a clean run
            continue
        with storage:
            try:
                results[name] = action(storage)
            except MinifsError as exc:
                error(f"{name}: {exc}")
                status = status or exc.exit_code
    return results, status


def cmd_gc(args: argparse.Namespace) -> int:
    from minifs.container.lifecycle import reclaim
    from minifs.state import StateDir
    from minifs.store import Store

    store = Store.existing(StateDir(args.root))  # refuse a lost store before anything
    if store is not None:
        store.close()
    if not args.dry_run:  # containers whose monitor died first: they hold clones
        for line in reclaim(args.root):
            print(line, file=sys.stderr)
    from minifs.layers.scratch import sweep

    # Spools, staging and mount points of crashed imports/applies, before the
    # drivers' gc removes clones one of them may still have mounted.
    for line in sweep(StateDir(args.root).root, args.dry_run):
        print(line, file=sys.stderr)
    found, status = _each_driver(args, lambda storage: storage.gc(args.dry_run))
    reports = {driver: report.to_dict() for driver, report in found.items()}

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
            for problem in [*report["damaged"], *report["partial"]]:
                print(f"{driver}: cannot fix: {problem}")
            if not actions and not report["damaged"] and not report["partial"]:
                print(f"{driver}: consistent, nothing to do")

    emit(args, reports, human)
    # What gc cannot fix leaves the store inconsistent: say so in the status.
    return status or (1 if any(r.unresolved for r in found.values()) else 0)


def cmd_check(args: argparse.Namespace) -> int:
    if args.rebuild:
        from minifs.rebuild import rebuild

        report = rebuild(args.root)

        def said() -> None:
            if report.moved_aside:
                print(f"the old store is kept as {report.moved_aside}")
            for driver, count in sorted(report.restored.items()):
                print(f"{driver}: restored {count} snapshot(s)")
            print(f"images: restored {report.images} name(s)")
            for skipped in report.skipped:
                print(f"skipped: {skipped}")
            print("now run 'minifs check' and 'minifs gc --dry-run' to see the rest")

        emit(args, report.to_dict(), said)
        return 0
    found, status = _each_driver(args, lambda storage: storage.check_snapshots())
    reports = {driver: report.to_dict() for driver, report in found.items()}

    def human() -> None:
        for driver, report in found.items():
            for problem in report.problems:
                print(f"{driver}: {problem}")
            if not report.problems:
                print(f"{driver}: consistent")

    emit(args, reports, human)
    return status or (1 if any(r.problems for r in found.values()) else 0)


def cmd_down(args: argparse.Namespace) -> int:
    stopped, status = _each_driver(args, lambda storage: storage.down())
    emit(
        args, stopped, lambda: [print(f"{d}: stopped {s}") for d, ss in stopped.items() for s in ss]
    )
    return status


def cmd_bench(args: argparse.Namespace) -> int:
    from minifs_bench.runner import main as run_bench

    return run_bench(args)


# -- parser -------------------------------------------------------------------


class _Skipped:
    """Stands in for the parser of a subcommand this run will not use."""

    def __getattr__(self, name: str) -> Callable[..., _Skipped]:
        return lambda *args, **kwargs: self


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, sized without importing shutil (with bz2 and lzma,
    ~1.7 ms of every start: argparse makes a formatter for each option it
    adds, to check its help). The same width shutil.get_terminal_size gives."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        if "width" not in kwargs:
            try:
                columns = int(os.environ["COLUMNS"])
            except (KeyError, ValueError):
                try:
                    columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
                except (AttributeError, ValueError, OSError):
                    columns = 80
            kwargs["width"] = (columns or 80) - 2
        super().__init__(prog, **kwargs)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in minifs's form: one line, what was wrong and
    where to look, no usage block (which runs to five lines for `run` and
    buried the error under it).

    Each parser reports its own leftovers: argparse hands a subcommand's
    unknown words up to the top-level parser, which then blamed `minifs`, not
    `minifs clone`, and showed the wrong usage. `error_exit` is the status of a
    usage error: 2, or 125 for `run`, whose own errors must not look like the
    container's exit code (as with `docker run`).
    """

    def __init__(self, *args: Any, error_exit: int = 2, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)
        self.error_exit = error_exit
        self.set_defaults(error_exit=error_exit)
        self._words: list[str] = []

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._words = list(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def _unknown_option(self) -> str | None:
        """The first word that looks like an option this parser does not have:
        argparse reports a missing argument instead when `-x` stands where a
        name should be."""
        for word in self._words:
            if word == "--":
                return None
            if not word.startswith("-") or word == "-" or word[1:2].isdigit():
                continue
            name = word.partition("=")[0]
            known = self._option_string_actions
            if name not in known and not (
                name.startswith("--") and any(o.startswith(name) for o in known)
            ):
                return word
        return None

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        import re

        unknown = self._unknown_option()
        choice = re.fullmatch(
            r"argument COMMAND: invalid choice: '(.*)' \(choose from (.*)\)", message
        )
        if choice:
            import difflib

            word, choices = choice[1], re.findall(r"'([^']*)'", choice[2])
            close = difflib.get_close_matches(word, choices, n=1)
            message = f"unknown command {word!r}" + (
                f" (did you mean {close[0]!r}?)" if close else ""
            )
        elif unknown is not None and message.startswith("the following arguments are required"):
            message = f"unknown option {unknown}"
        elif message == "the following arguments are required: COMMAND":
            message = "no command given"
        elif message.startswith("the following arguments are required: "):
            message = "missing " + message.partition(": ")[2]
        elif message.startswith("unrecognized arguments: "):
            extra = message.partition(": ")[2]
            first = extra.split(" ", 1)[0]
            message = f"unknown option {first}" if first[:1] == "-" else f"unexpected {extra}"
            if first.partition("=")[0] in GLOBAL_OPTIONS:
                message += " (for run and exec, global options go before the image)"
        where = self.prog.removeprefix("minifs").strip()
        text = f"{where}: {message}" if where else message
        self.exit(self.error_exit, f"minifs: error: {shown(text)}; see '{self.prog} --help'\n")


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

    def wants(self, name: str) -> bool:
        """Whether subcommand `name` is to be built (to skip importing its module)."""
        return self.wanted is None or name == self.wanted

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        if self.wants(name):
            self.found = True
            return self.real.add_parser(name, **kwargs)
        return _Skipped()


GLOBAL_OPTIONS = ("--root", "--storage-opt")
PASSTHROUGH = ("run", "exec")
"""Commands whose words after the first plain one (the image, the container)
are the container's own command: global options are not looked for there."""


def _hoisted(argv: Sequence[str]) -> list[str]:
    """argv with global options moved where argparse reads them, so they may
    stand before or after the command: --root and --storage-opt before it,
    --driver/-d (each command's own option) after it. Words after `--`, and
    for run and exec after the image or container, are left alone."""
    words, front, moved, tail = list(argv), [], [], []
    i = 0
    command = None
    while i < len(words):
        word = words[i]
        option, eq, _ = word.partition("=")
        take = 1 if eq else 2
        if option in GLOBAL_OPTIONS or (command is None and option in ("--driver", "-d")):
            (front if option in GLOBAL_OPTIONS else moved).extend(words[i : i + take])
            i += take
            continue
        if word == "--" or (command in PASSTHROUGH and not word.startswith("-")):
            tail.extend(words[i:])
            break
        if command is None and not word.startswith("-"):
            command = word
        else:
            (front if command is None else tail).append(word)
        i += 1
    if command is None:
        return front + moved + tail
    return [*front, command, *moved, *tail]


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
    parser = Parser(
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
    default_driver = _from_environment()

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
    p.add_argument(
        "--size",
        metavar="SIZE",
        help="cap what the clone may hold, e.g. 100M (zfs refquota, btrfs qgroup; "
        "refused by drivers that cannot)",
    )

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

    p = command("rm", cmd_rm, "remove containers, clones, views or layers (children first)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("-f", "--force", action="store_true", help="stop a running container first")

    p = command("label", cmd_label, "set labels (KEY= deletes one)", json_flag=True)
    p.add_argument("name")
    p.add_argument("labels", nargs="+", metavar="KEY=VALUE")

    p = command("mount", cmd_mount, "mount a snapshot on an existing empty directory")
    p.add_argument("name")
    p.add_argument("dir", type=path)

    p = command("umount", cmd_umount, "unmount a directory mounted by 'minifs mount'")
    p.add_argument("dir", type=path)

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
        "check",
        cmd_check,
        "check (read-only) that every snapshot has its backend object and every object "
        "its snapshot; exit 1 if not",
        driver=False,
        json_flag=True,
    )
    p.add_argument("--driver", "-d", default=None, help="only this driver (default: all)")
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="rebuild a lost or damaged metadata store from the drivers' own records "
        "(the old one is kept aside)",
    )

    p = command(
        "down",
        cmd_down,
        "stop every backend minifs started (daemons, loops, mounts)",
        driver=False,
        json_flag=True,
    )
    p.add_argument("--driver", "-d", default=None, help="only this driver (default: all)")

    if sub.wants("bench"):  # its module and the image's are only loaded for their command
        from minifs_bench.options import add_arguments as add_bench_arguments

        p = command(
            "bench",
            cmd_bench,
            "measure drivers: create/delete latency, write amplification, lookups, inodes",
            driver=False,
        )
        add_bench_arguments(p)

    if sub.wants("image"):
        from minifs.images.commands import add_image_parser

        add_image_parser(sub)

    if sub.wants("apply") or sub.wants("diff"):
        from minifs.layers.commands import add_layer_parser

        add_layer_parser(sub, default_driver)

    if any(sub.wants(name) for name in ("run", "ps", "stop", "exec", "logs")):
        from minifs.container.commands import add_container_parser

        add_container_parser(sub, default_driver)

    if sub.wants("snapshotter"):
        from minifs.snapshotter.commands import add_snapshotter_parser

        add_snapshotter_parser(sub, default_driver)

    if sub.wants("report"):
        from minifs.report.commands import add_report_parser

        add_report_parser(sub)
    if command_word is None or not sub.found:
        from minifs.plugins import add_commands

        add_commands(sub.add_parser)  # a plugin's own command (`minifs thin`)
    if not sub.found:
        return build_parser()  # not a command: build all, for help and the error
    return parser


def _from_environment() -> str:
    """The default driver: MINIFS_DRIVER (empty counts as unset), else overlay2."""
    chosen = os.environ.get("MINIFS_DRIVER")
    return chosen if chosen else DefaultDriver(DEFAULT_DRIVER)


def _check_common(args: argparse.Namespace) -> None:
    """What every command relies on, checked before any command runs so each
    fails the same way: a usable --root, a MINIFS_DRIVER that names a driver
    (also for commands that take none: a typo there must not pass until the
    next command that does), and well-formed --storage-opt values."""
    if args.command != "drivers":
        from minifs.state import StateDir

        StateDir(args.root).check()
    chosen = os.environ.get("MINIFS_DRIVER")
    if chosen:
        from minifs.errors import NotFound
        from minifs.plugins import get_driver, registered

        try:
            get_driver(chosen)
        except NotFound:
            raise NotFound(
                f"MINIFS_DRIVER={chosen!r} names no driver; set it to one of "
                f"{', '.join(sorted(registered()))} or unset it (see 'minifs drivers')"
            ) from None
    if args.storage_opt:
        storage_options(args, "")  # each names a driver and one of its options


def _interrupted(exc: BaseException) -> bool:
    """Whether `exc` was raised while unwinding from Ctrl-C: a cleanup that
    failed because the interrupted work still held what it cleans (a mount
    kept busy by a file it had open) must not pass for the real error."""
    seen = exc.__context__
    for _ in range(100):  # a chain is short; the bound only guards a cycle
        if seen is None:
            return False
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__context__
    return False


def _os_error(exc: OSError) -> str:
    """An OSError nobody turned into a MinifsError, as one line with a way out."""
    import errno

    full = "free some space there ('minifs gc' removes what crashes left)"
    hints = {
        errno.ENOSPC: full if exc.filename else None,  # else the output the user chose
        errno.EDQUOT: full if exc.filename else None,
        errno.EROFS: "remount it read-write, or pass --root DIR on a writable filesystem",
        errno.EACCES: "run as root or fix its permissions",
        errno.EPERM: "run as root or fix its permissions",
        errno.EMFILE: "raise the open-files limit (ulimit -n)",
        errno.ENAMETOOLONG: "use a shorter path",
    }
    what = exc.strerror or str(exc)
    where = f"{os.fsdecode(exc.filename)}: " if exc.filename else ""
    hint = hints.get(exc.errno or 0)
    return f"{where}{what}" + (f"; {hint}" if hint else "")


def _standard_streams() -> None:
    """Open /dev/null on a closed stdin, stdout or stderr (`minifs ls >&-`).
    Otherwise the next file minifs opens (the metadata store) would get that
    descriptor, and output meant for the terminal would be written into it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def main(argv: Sequence[str] | None = None) -> int:
    _standard_streams()
    argv = _hoisted(sys.argv[1:] if argv is None else argv)
    args: argparse.Namespace | None = None
    try:
        args = build_parser(_command_word(argv)).parse_args(argv)
        _check_common(args)
        status = args.func(args)
        sys.stdout.flush()  # here, where a failure is reported, not at exit
        return status
    except BrokenPipeError:
        # The reader went away (`minifs ls | head -1`): stop quietly, as a tool
        # killed by SIGPIPE would, and keep the exit's own flush from failing.
        import signal

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except MinifsError as exc:
        if _interrupted(exc):
            print(
                f"minifs: interrupted; cleaning up failed too ({shown(str(exc))}); "
                "run 'minifs gc' to finish it",
                file=sys.stderr,
            )
            return 130
        error(str(exc))
        return max(exc.exit_code, getattr(args, "error_exit", 2))
    except KeyboardInterrupt:
        print("minifs: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        error(_os_error(exc))
        return getattr(args, "error_exit", 2)
    finally:
        # The process ends next: with every object in the permanent generation
        # the interpreter's collections at exit skip them all, ~15 ms of a
        # `minifs run` spent proving garbage that dies with the process anyway.
        gc.freeze()
