"""Load plugins from the `minifs` entry-point group and collect their drivers.

`MINIFS_LOAD_PLUGINS` (comma-separated entry-point names) restricts which are
loaded; empty means none. Built-in drivers come in through the same group.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import pluggy

from minifs import hookspecs
from minifs.driver import Driver
from minifs.entrypoints import entry_points
from minifs.errors import InvalidArgument, NotFound

GROUP = "minifs"


@dataclass(frozen=True)
class Registered:
    """A driver class with the distribution that provided it."""

    driver: type[Driver]
    plugin: str
    plugin_version: str


@dataclass
class Plugins:
    manager: pluggy.PluginManager
    dists: dict[str, tuple[str, str]]
    """Entry-point name -> (distribution, version), for `minifs drivers`."""


@functools.cache
def load() -> Plugins:
    manager = pluggy.PluginManager(GROUP)
    manager.add_hookspecs(hookspecs)
    allowed = os.environ.get("MINIFS_LOAD_PLUGINS")
    names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    dists: dict[str, tuple[str, str]] = {}
    for ep in entry_points(group=GROUP):
        if (names is not None and ep.name not in names) or manager.has_plugin(ep.name):
            continue
        manager.register(ep.load(), name=ep.name)
        dists[ep.name] = (ep.dist, ep.version)
    return Plugins(manager, dists)


@functools.cache
def registered() -> dict[str, Registered]:
    """Every driver that a loaded plugin registers, by driver name."""
    plugins = load()
    found: dict[str, Registered] = {}
    # Call each plugin's hook on its own so every driver is credited to its plugin.
    for impl in plugins.manager.hook.register_drivers.get_hookimpls():
        dist, version = plugins.dists.get(impl.plugin_name, (impl.plugin_name, "?"))
        classes: list[type] = []
        impl.function(register=classes.append)
        for cls in classes:
            if not (isinstance(cls, type) and issubclass(cls, Driver)):
                raise InvalidArgument(f"plugin {dist} registered {cls!r}, which is not a Driver")
            if cls.name in found:
                raise InvalidArgument(
                    f"driver {cls.name} is registered by both {found[cls.name].plugin} and "
                    f"{dist}; uninstall one or restrict MINIFS_LOAD_PLUGINS"
                )
            found[cls.name] = Registered(cls, dist, version)
    return found


def get_driver(name: str) -> type[Driver]:
    drivers = registered()
    if name not in drivers:
        known = ", ".join(sorted(drivers)) or "none are installed"
        raise NotFound(f"unknown driver {name!r}; choose one of: {known} (see 'minifs drivers')")
    return drivers[name].driver
