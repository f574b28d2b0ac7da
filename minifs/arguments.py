"""Turning parsed command-line arguments into minifs objects.

Shared by every command module (storage, images, layers, containers), so none
of them has to import the CLI that imports them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from minifs.errors import InvalidArgument

TYPE_CHECKING = False  # typing costs ~2 ms of every start; annotations only need it here
if TYPE_CHECKING:
    from typing import Any


def pairs(items: Sequence[str] | None, what: str) -> dict[str, str]:
    """`KEY=VALUE` words (labels, options) as a dict; a word without `=` is an error."""
    result = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"bad {what} {item!r}; write it as KEY=VALUE")
        result[key] = value
    return result


def path(text: str) -> str:
    """An argparse `type` for paths: the empty string is refused, where every
    later step would take it for the current directory."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path names nothing; give a path")
    return text


def storage_options(args: argparse.Namespace, driver: str) -> dict[str, str]:
    """`--storage-opt overlay2.backing=loop` -> {"backing": "loop"} for overlay2.

    Options for other drivers are not used but still checked: a typo in one
    (`overlay.backing`, `vfs.sise`) must not pass silently because the driver
    it names happens not to be the one in use.
    """
    found = {}
    for key, value in pairs(args.storage_opt, "--storage-opt").items():
        owner, dot, option = key.partition(".")
        if not (dot and owner and option):
            raise InvalidArgument(
                f"--storage-opt {key}={value} names no driver option; write "
                "DRIVER.OPTION=VALUE, e.g. overlay2.backing=loop"
            )
        if owner == driver:
            found[option] = value  # the driver checks its own options
            continue
        from minifs.plugins import registered

        drivers = registered()
        if owner not in drivers:
            raise InvalidArgument(
                f"--storage-opt {key}={value}: there is no driver {owner!r}; "
                f"choose one of: {', '.join(sorted(drivers))}"
            )
        known = drivers[owner].driver.options_help
        if option not in known:
            raise InvalidArgument(
                f"--storage-opt {key}={value}: {owner} has no option {option!r}; "
                f"known: {', '.join(sorted(known)) or 'none'}"
            )
    return found


class DefaultDriver(str):
    """The --driver nobody chose (neither the option nor MINIFS_DRIVER): a
    snapshot that exists on exactly one other driver is found there."""


def open_storage(
    args: argparse.Namespace, driver: str | None = None, names: Sequence[str | None] = ()
) -> Any:
    """The Storage of `driver` (default: --driver) in the --root state dir;
    `names` are the snapshots the command is about, looked up on every driver
    when the driver was not chosen."""
    from minifs.storage import Storage

    name = driver or _holder(args, [n for n in names if n])
    return Storage(name, args.root, storage_options(args, name))


def _holder(args: argparse.Namespace, names: list[str]) -> str:
    """--driver, or, when it is only the default, the one driver holding `names`."""
    chosen = args.driver
    if not isinstance(chosen, DefaultDriver) or not names:
        return chosen
    from minifs.state import StateDir
    from minifs.store import Store

    store = Store.existing(StateDir(args.root))
    if store is None:
        return chosen
    try:
        holders = store.drivers_of(names)
    finally:
        store.close()
    if len(holders) > 1:
        raise InvalidArgument(
            f"{', '.join(names)}: on drivers {', '.join(holders)}; pass --driver to say which"
        )
    return holders[0] if holders else chosen
