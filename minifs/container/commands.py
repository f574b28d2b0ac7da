"""`minifs run`, `ps`, `stop`, `exec`, `logs`, and the container side of
`inspect` and `rm`.

Only argparse is imported to build the parser; each command imports the
launcher when it runs, so `minifs --help` never loads pyroute2 or rich.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TYPE_CHECKING = False  # typing costs ~2 ms of every start; annotations only need it here
if TYPE_CHECKING:
    from typing import Any


def cmd_run(args: argparse.Namespace) -> int:
    from minifs.container.launch import run, run_detached
    from minifs.container.security import Security
    from minifs.container.spec import Limits, Spec, parse_env

    security, profile = Security.parse(
        cap_add=args.cap_add,
        cap_drop=args.cap_drop,
        privileged=args.privileged,
        security_opt=args.security_opt,
        read_only=args.read_only,
        tmpfs=args.tmpfs,
        user=args.user,
    )
    spec = Spec(
        image=args.image,
        command=list(args.command),
        name=args.name,
        driver=args.driver,
        hostname=args.hostname,
        limits=Limits.parse(args.memory, args.cpus, args.pids),
        net=args.net,
        ip=args.ip,
        masquerade=args.masquerade,
        size=args.size,
        env=parse_env(args.env),
        workdir=args.workdir,
        remove=args.rm,
        detach=args.detach,
        trace=args.trace,
        security=security,
        seccomp_profile=profile,
    )
    if args.detach:
        print(run_detached(spec, args.root))
        return 0
    return run(spec, args.root)


def cmd_ps(args: argparse.Namespace) -> int:
    from minifs.container.manage import listing
    from minifs.output import ago, emit, table

    rows = listing(args.root, args.all)
    emit(
        args,
        rows,
        lambda: table(
            ("CONTAINER ID", "NAME", "IMAGE", "COMMAND", "CREATED", "STATUS", "DRIVER", "IP"),
            [
                (
                    r["id"][:12],  # type: ignore[index]
                    r["name"],
                    r["image"],
                    _short(" ".join(r["command"])),  # type: ignore[arg-type]
                    ago(r["created"]),  # type: ignore[arg-type]
                    r["state"],
                    r["driver"],
                    r["ip"] or "",
                )
                for r in rows
            ],
        ),
    )
    return 0


def _short(text: str, width: int = 20) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_stop(args: argparse.Namespace) -> int:
    from minifs.container.manage import stop
    from minifs.output import each

    def one(name: str) -> None:
        stop(args.root, name, args.time)
        print(name)

    return each(args.names, one)


def cmd_exec(args: argparse.Namespace) -> int:
    from minifs.container.manage import exec_in
    from minifs.container.spec import parse_env
    from minifs.errors import InvalidArgument

    if not args.command:
        raise InvalidArgument("give the command to run after the container name")
    return exec_in(args.root, args.name, list(args.command), parse_env(args.env), args.workdir)


def cmd_logs(args: argparse.Namespace) -> int:
    from minifs.container.manage import logs

    sys.stdout.flush()
    os.write(1, logs(args.root, args.name))
    return 0


def inspect_container(args: argparse.Namespace) -> bool:
    """`minifs inspect NAME` for a container; False when NAME is none."""
    from minifs.container import records

    if records.find(args.root, args.name) is None:
        return False
    from minifs.container.manage import inspect

    data: Any = inspect(args.root, args.name)
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return True


def remove_container(args: argparse.Namespace, name: str) -> bool:
    """`minifs rm NAME` for a container (its record, log and clone); False when
    NAME is none, so the snapshot of that name is removed instead."""
    from minifs.container import records

    if records.find(args.root, name) is None:
        return False
    from minifs.container.manage import remove

    remove(args.root, name, force=args.force)
    return True


def add_container_parser(sub: argparse._SubParsersAction, default_driver: str) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "run",
        help="run a command in a new container (clone, namespaces, pivot_root, cgroups)",
        description="Clone IMAGE's layer on a driver and run CMD (or the image's own "
        "command) as PID 1 of new namespaces. Exit code: the command's; as docker, 126 "
        "when it cannot be run, 127 when it is not in the image, 125 when minifs itself "
        "failed.",
        error_exit=125,
    )
    p.set_defaults(func=cmd_run)
    p.add_argument("--driver", default=default_driver, help="storage driver for the clone")
    p.add_argument("--name", help="container name (default: the id's first 12 characters)")
    p.add_argument("--rm", action="store_true", help="remove the container when it ends")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background")
    p.add_argument("--hostname", help="hostname inside (default: the short id)")
    p.add_argument("--memory", "-m", metavar="SIZE", help="memory limit, e.g. 200M")
    p.add_argument("--cpus", type=float, help="CPU limit in cores, e.g. 0.2 for 20%% of one")
    p.add_argument("--pids", type=int, metavar="N", help="most processes at once")
    p.add_argument(
        "--net", default="none", choices=("none", "bridge"), help="network (default none)"
    )
    p.add_argument("--ip", metavar="ADDR", help="address on the bridge (default: next free)")
    p.add_argument(
        "--masquerade",
        action="store_true",
        help="let the bridge's containers reach beyond the host (nftables masquerade, "
        "kept until the bridge goes with its last container)",
    )
    p.add_argument(
        "--size", metavar="SIZE", help="cap the clone's size (zfs, btrfs; refused elsewhere)"
    )
    p.add_argument("-e", "--env", action="append", metavar="KEY=VALUE")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory inside")
    p.add_argument("--trace", action="store_true", help="print each launch step with its duration")
    p.add_argument(
        "--cap-add",
        action="append",
        metavar="CAP",
        help="add a capability (or ALL) to the default 14",
    )
    p.add_argument("--cap-drop", action="append", metavar="CAP", help="drop a capability (or ALL)")
    p.add_argument(
        "--privileged",
        action="store_true",
        help="DANGEROUS: every capability, all devices, writable /proc/sys and /sys, no "
        "seccomp; the container's root is the host's root",
    )
    p.add_argument(
        "--security-opt",
        action="append",
        metavar="OPT",
        help="no-new-privileges, seccomp=PROFILE.json (Docker's format) or seccomp=unconfined",
    )
    p.add_argument("--read-only", action="store_true", help="mount the root filesystem read-only")
    p.add_argument(
        "--tmpfs", action="append", metavar="DIR", help="a writable tmpfs on DIR, e.g. /tmp"
    )
    p.add_argument("-u", "--user", metavar="UID[:GID]", help="run the command as this user")
    p.add_argument("image", metavar="IMAGE", help="image or layer name")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD", help="command and args")

    p = sub.add_parser("ps", help="list containers", description="List running containers.")
    p.set_defaults(func=cmd_ps)
    p.add_argument("-a", "--all", action="store_true", help="include exited containers")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser(
        "stop", help="stop containers (SIGTERM, then SIGKILL)", description="Stop containers."
    )
    p.set_defaults(func=cmd_stop)
    p.add_argument("-t", "--time", type=float, default=10.0, help="seconds before SIGKILL")
    p.add_argument("names", nargs="+", metavar="NAME")

    p = sub.add_parser(
        "exec",
        help="run a command in a running container",
        description="Join a running container's cgroup and namespaces and run CMD there.",
    )
    p.set_defaults(func=cmd_exec)
    p.add_argument("-e", "--env", action="append", metavar="KEY=VALUE")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory inside")
    p.add_argument("name", metavar="NAME")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD")

    p = sub.add_parser(
        "logs", help="print a detached container's output", description="Print the log."
    )
    p.set_defaults(func=cmd_logs)
    p.add_argument("name", metavar="NAME")
