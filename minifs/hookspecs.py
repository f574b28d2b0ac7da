"""The hooks a minifs plugin can implement.

A plugin is any module named in the `minifs` entry-point group; the built-in
drivers are registered the same way, so a third-party driver is a peer of
overlay2, not a second-class extension.

Nothing here imports pluggy (~9 ms with the `inspect` it loads): a command
that names its driver calls that one plugin's hook itself (see
minifs.plugins), and only listing every driver starts pluggy's manager, which
reads the marks set here as its own markers set them.
"""

from __future__ import annotations

from collections.abc import Callable

TYPE_CHECKING = False  # typing costs ~2 ms of every start; annotations only need it here
if TYPE_CHECKING:
    from typing import TypeVar

    F = TypeVar("F", bound=Callable[..., object])


def hookimpl(function: F) -> F:
    """Mark a hook implementation: what `pluggy.HookimplMarker("minifs")`
    does with its default options (tests/test_plugins.py holds the two equal),
    so plugins may use either."""
    function.minifs_impl = {  # type: ignore[attr-defined]
        "wrapper": False,
        "hookwrapper": False,
        "optionalhook": False,
        "tryfirst": False,
        "trylast": False,
        "specname": None,
    }
    return function


def register_drivers(register: Callable[[type], None]) -> None:
    """Call `register(DriverClass)` for each storage driver the plugin provides."""


def register_commands(add_command: Callable[..., object]) -> None:
    """Add top-level commands of the plugin's own (the devicemapper driver's
    `minifs thin`): `add_command(name, help=...)` returns an argparse parser;
    set its `func(args) -> int` with `set_defaults`. Drivers reach the store
    through `minifs.arguments.open_storage(args, driver)`, never the CLI."""
