"""Turning parsed command-line arguments into minifs objects.

Shared by every command module (storage, images, layers, containers), so none
of them has to import the CLI that imports them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from minifs.errors import InvalidArgument


def pairs(items: Sequence[str] | None, what: str) -> dict[str, str]:
    """`KEY=VALUE` words (labels, options) as a dict; a word without `=` is an error."""
    result = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"bad {what} {item!r}; write it as KEY=VALUE")
        result[key] = value
    return result


def storage_options(args: argparse.Namespace, driver: str) -> dict[str, str]:
    """`--storage-opt overlay2.backing=loop` -> {"backing": "loop"} for overlay2."""
    found = {}
    for key, value in pairs(args.storage_opt, "--storage-opt").items():
        owner, dot, option = key.partition(".")
        if not dot:
            raise InvalidArgument(
                f"--storage-opt {key}={value} names no driver; write DRIVER.{key}={value}"
            )
        if owner == driver:
            found[option] = value
    return found


def open_storage(args: argparse.Namespace, driver: str | None = None) -> Any:
    """The Storage of `driver` (default: --driver) in the --root state dir."""
    from minifs.storage import Storage

    name = driver or args.driver
    return Storage(name, args.root, storage_options(args, name))
