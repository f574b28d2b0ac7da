"""Load plugins from the `minifs` entry-point group and collect their drivers.

`MINIFS_LOAD_PLUGINS` (comma-separated entry-point names) restricts which are
loaded; empty means none. Built-in drivers come in through the same group.
"""

from __future__ import annotations

import functools
import os
from collections import namedtuple

from minifs import hookspecs
from minifs.driver import Driver
from minifs.entrypoints import entry_points
from minifs.errors import InvalidArgument, NotFound

TYPE_CHECKING = False  # pluggy (~9 ms) is loaded only when every plugin is
if TYPE_CHECKING:
    from collections.abc import Callable

    import pluggy

GROUP = "minifs"


class Registered(namedtuple("Registered", "driver plugin plugin_version")):
    """A driver class with the distribution that provided it. (Named tuples
    here, not dataclasses: those cost ~6 ms of every start, for `inspect`.)"""

    __slots__ = ()
    driver: type[Driver]
    plugin: str
    plugin_version: str


class Plugins(namedtuple("Plugins", "manager dists")):
    """The plugin manager, and which distribution gave each plugin."""

    __slots__ = ()
    manager: pluggy.PluginManager
    dists: dict[str, tuple[str, str]]
    """Entry-point name -> (distribution, version), for `minifs drivers`."""


@functools.cache
def load() -> Plugins:
    import pluggy

    pluggy.HookspecMarker(GROUP)(hookspecs.register_drivers)
    pluggy.HookspecMarker(GROUP)(hookspecs.register_commands)
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


@functools.cache
def _named(name: str) -> type[Driver] | None:
    """Driver `name` from the one plugin whose entry point has that name (as
    every built-in's has), loading no other: each driver module brings its
    own imports, and a command that names its driver needs none of them.
    None when that plugin does not register it: then every plugin is asked."""
    allowed = os.environ.get("MINIFS_LOAD_PLUGINS")
    if allowed is not None and name not in {n.strip() for n in allowed.split(",")}:
        return None
    for ep in entry_points(group=GROUP):
        if ep.name != name:
            continue
        hook = getattr(ep.load(), "register_drivers", None)
        classes: list[type] = []
        if callable(hook):
            hook(register=classes.append)
        for cls in classes:
            if isinstance(cls, type) and issubclass(cls, Driver) and cls.name == name:
                return cls
    return None


def add_commands(add_command: Callable[..., object]) -> None:
    """Let every loaded plugin add its own top-level commands (the CLI asks;
    the plugins are loaded only when the command word is none of minifs's own)."""
    load().manager.hook.register_commands(add_command=add_command)


def get_driver(name: str) -> type[Driver]:
    found = _named(name)
    if found is not None:
        return found
    drivers = registered()
    if name not in drivers:
        known = ", ".join(sorted(drivers)) or "none are installed"
        raise NotFound(f"unknown driver {name!r}; choose one of: {known} (see 'minifs drivers')")
    return drivers[name].driver
