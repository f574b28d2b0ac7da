"""`minifs image ...`: import, ls, inspect, rm, busybox.

Only argparse is imported to build the parser; each command imports what it
needs when it runs, like the rest of the CLI.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _short(digest: str) -> str:
    return digest[7:19]


def cmd_import(args: argparse.Namespace) -> int:
    from minifs.images.importer import import_path
    from minifs.output import emit

    done = import_path(args.root, args.path, args.name, allow_devices=not args.no_devices)
    emit(
        args,
        [d.to_dict() for d in done],
        lambda: [print(f"{d.name} {_short(d.digest)} ({d.layers} layers)") for d in done],
    )
    return 0


def _summary(record: Any, image: Any, catalog: Any) -> dict[str, Any]:
    return {
        "name": record.name,
        "digest": record.digest,
        "created": record.created,
        "layers": len(image.layers),
        "size": image.size,
        "unpacked_on": catalog.unpacked_on(image),
    }


def _damaged(record: Any, problem: str) -> dict[str, Any]:
    """The row of an image whose manifest or config cannot be read."""
    from minifs.output import shown

    print(
        f"minifs: warning: image {record.name} is damaged ({shown(problem)}); remove it "
        f"with 'minifs image rm {record.name}' and import it again",
        file=sys.stderr,
    )
    return {
        "name": record.name,
        "digest": record.digest,
        "created": record.created,
        "layers": None,
        "size": None,
        "unpacked_on": [],
        "error": problem,
    }


def cmd_ls(args: argparse.Namespace) -> int:
    from minifs.images.catalog import Catalog
    from minifs.output import ago, emit, human_size, table

    with Catalog.open(args.root) as catalog:
        rows = [
            _summary(r, i, catalog) if i is not None else _damaged(r, problem)
            for r, i, problem in catalog.list()
        ]
    emit(
        args,
        rows,
        lambda: table(
            ("NAME", "DIGEST", "LAYERS", "SIZE", "UNPACKED ON", "CREATED"),
            [
                (
                    r["name"],
                    _short(r["digest"]),
                    "?" if r["layers"] is None else r["layers"],
                    "?" if r["size"] is None else human_size(r["size"]),
                    "damaged" if r.get("error") else ",".join(r["unpacked_on"]) or "-",
                    ago(r["created"]),
                )
                for r in rows
            ],
        ),
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from minifs.images.catalog import Catalog
    from minifs.output import emit

    with Catalog.open(args.root) as catalog:
        record, image = catalog.get(args.image)
        data = _summary(record, image, catalog)
        data["config_digest"] = image.config_digest
        data["config"] = image.config.get("config") or {}
        data["architecture"] = image.config.get("architecture")
        data["os"] = image.config.get("os")
        data["layers"] = [
            {
                "digest": layer.digest,
                "media_type": layer.media_type,
                "size": layer.size,
                "diff_id": layer.diff_id,
                "chain_id": layer.chain_id,
            }
            for layer in image.layers
        ]
    emit(args, data, lambda: print(json.dumps(data, indent=2)))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from minifs.images.catalog import remove_image
    from minifs.output import each, emit

    reports: list[dict[str, object]] = []
    status = each(args.images, lambda ref: reports.append(remove_image(args.root, ref).to_dict()))
    emit(args, reports, lambda: [print(r["name"]) for r in reports])
    return status


def cmd_busybox(args: argparse.Namespace) -> int:
    from minifs.images import ensure_busybox

    print(ensure_busybox(args.root))
    return 0


def add_image_parser(sub: Any) -> None:
    """Add `image` and its subcommands to the top-level subparsers `sub`."""
    from minifs.arguments import path

    image = sub.add_parser(
        "image",
        help="import, list, inspect and remove images",
        description="Images live in a content store under the state dir and are unpacked "
        "into a driver when 'minifs clone NAME --from IMAGE' first asks for them.",
    )
    commands = image.add_subparsers(dest="image_command", metavar="COMMAND", required=True)

    def command(name: str, func: Any, help: str, json_flag: bool = True) -> Any:
        p = commands.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON for scripts")
        return p

    p = command(
        "import",
        cmd_import,
        "import a docker/podman save archive, an OCI layout (dir or tar) or a rootfs tar",
    )
    p.add_argument("path", type=path)
    p.add_argument("--name", help="name of the image (default: the archive's own tags)")
    p.add_argument(
        "--no-devices",
        action="store_true",
        help="refuse images whose layers create device nodes",
    )
    command("ls", cmd_ls, "list images")
    p = command("inspect", cmd_inspect, "show an image's config and layers")
    p.add_argument("image")
    p = command("rm", cmd_rm, "remove images (refused while a clone uses one)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    command("busybox", cmd_busybox, "build the built-in busybox image", json_flag=False)
