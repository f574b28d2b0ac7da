"""`minifs snapshotter`: the containerd proxy snapshotter's command.

Only argparse is imported to build the parser: grpc and the generated API
modules load when the command runs, so `minifs --help` stays fast.
"""

from __future__ import annotations

import argparse

TYPE_CHECKING = False  # typing costs ~2 ms of every start; annotations only need it here
if TYPE_CHECKING:
    from typing import Any

DEFAULT_ADDRESS = "/run/minifs/snapshotter.sock"


def cmd_snapshotter(args: argparse.Namespace) -> int:
    from minifs.arguments import open_storage
    from minifs.snapshotter.server import serve

    return serve(args.address, lambda: open_storage(args))


def add_snapshotter_parser(sub: Any, default_driver: str) -> None:
    from minifs.arguments import path

    about = (
        "serve containerd's Snapshots API on a unix socket (a proxy snapshotter: "
        '[proxy_plugins.minifs] type = "snapshot" in containerd\'s config.toml)'
    )
    p = sub.add_parser("snapshotter", help=about, description=about)
    p.set_defaults(func=cmd_snapshotter)
    p.add_argument(
        "--address",
        metavar="SOCKET",
        type=path,
        default=DEFAULT_ADDRESS,
        help=f"unix socket to serve on (default {DEFAULT_ADDRESS}; its directory must exist)",
    )
    p.add_argument(
        "--driver",
        "-d",
        default=default_driver,
        help="storage driver the snapshots live on (env MINIFS_DRIVER, default overlay2)",
    )
    # Here as well as before the command, as the other minifs commands take it.
    p.add_argument(
        "--root",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="state directory (env MINIFS_ROOT, default /var/lib/minifs)",
    )
