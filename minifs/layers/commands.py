"""`minifs apply` and `minifs diff`: layer tars in and out of snapshots.

Only argparse is imported to build the parser; each command imports the layer
code when it runs. A diff goes to a temporary file beside `-o FILE` and is
renamed into place when whole, so a failed diff never leaves half a layer
under the name asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

TYPE_CHECKING = False  # typing costs ~2 ms of every start; annotations only need it here
if TYPE_CHECKING:
    from typing import Any, BinaryIO


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[BinaryIO]:
    """`path` written atomically, or stdout (never a terminal) when None."""
    from minifs.errors import InvalidArgument

    if path is None or path == "-":
        if sys.stdout.isatty():
            raise InvalidArgument(
                "refusing to write a layer tar to a terminal; pass -o FILE or redirect stdout"
            )
        sys.stdout.flush()
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    from minifs.errors import NotFound

    if not path:
        raise InvalidArgument("-o needs a file name")
    target = Path(path)
    if target.is_dir():
        raise InvalidArgument(f"{target} is a directory; give -o a file name")
    if target.exists() and not target.is_file():
        with open(target, "wb") as out:  # /dev/null, a fifo: write through, never replace
            yield out
        return
    if not target.parent.is_dir():
        raise NotFound(f"{target.parent} does not exist; create it or give -o another file")
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb") as out:
            yield out
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def cmd_diff(args: argparse.Namespace) -> int:
    import json

    from minifs.arguments import open_storage
    from minifs.layers.compression import Compressor
    from minifs.layers.snapshots import diff_of

    with open_storage(args, names=[args.name]) as storage, _output(args.output) as out:
        packed = Compressor(out, args.compress)
        stats = diff_of(storage, args.name, packed)  # type: ignore[arg-type]
        packed.finish()
    data: dict[str, Any] = {**stats.to_dict(), "compression": args.compress}
    if args.compress != "none":
        data["digest"] = "sha256:" + packed.digest.hexdigest()
        data["blob_size"] = packed.size
    to_stdout = args.output is not None and args.output != "-"
    stream = sys.stdout if to_stdout else sys.stderr
    print(json.dumps(data, indent=2) if args.json else stats.diff_id, file=stream)
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    import json

    from minifs.arguments import open_storage
    from minifs.errors import NotFound
    from minifs.layers.snapshots import apply_to

    source: Any
    if args.file == "-":
        source = sys.stdin.buffer
    else:
        source = Path(args.file)
        if not source.is_file():
            raise NotFound(f"{source} is not a file; give a layer tar (plain, gzip or zstd)")
    with open_storage(args, names=[args.clone]) as storage:
        stats = apply_to(
            storage,
            args.clone,
            source,
            expected_diff_id=args.diff_id,
            allow_devices=not args.no_devices,
        )
    print(json.dumps(stats.to_dict(), indent=2) if args.json else stats.diff_id)
    return 0


def add_layer_parser(sub: Any, default_driver: str) -> None:
    """Add `apply` and `diff` to the top-level subparsers `sub`."""

    def command(name: str, func: Any, help: str) -> Any:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument(
            "--driver", "-d", default=default_driver, help="storage driver (env MINIFS_DRIVER)"
        )
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        return p

    p = command(
        "diff",
        cmd_diff,
        "write what a clone (or layer) changed over its parent as an OCI layer tar; "
        "the same changes always give the same bytes",
    )
    p.add_argument("name")
    p.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    p.add_argument(
        "--compress",
        choices=("none", "gzip", "zstd"),
        default="none",
        help="compress the tar (the diff_id is always that of the plain tar)",
    )

    p = command(
        "apply",
        cmd_apply,
        "apply an OCI layer tar (plain, gzip or zstd; '-' for stdin) to a clone; "
        "a refused layer leaves the clone as it was",
    )
    p.add_argument("clone")
    p.add_argument("file")
    p.add_argument("--diff-id", help="refuse the layer unless its diff_id is this sha256:...")
    p.add_argument(
        "--no-devices", action="store_true", help="refuse layers that create device nodes"
    )
