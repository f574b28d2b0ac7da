"""The hooks a minifs plugin can implement.

A plugin is any module named in the `minifs` entry-point group; the built-in
drivers are registered the same way, so a third-party driver is a peer of
overlay2, not a second-class extension.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("minifs")
hookimpl = pluggy.HookimplMarker("minifs")


@hookspec
def register_drivers(register: Callable[[type], None]) -> None:
    """Call `register(DriverClass)` for each storage driver the plugin provides."""
