"""Find the `minifs` entry points without importlib.metadata.

importlib.metadata parses every installed distribution's metadata through the
email package, about 30 ms on every `minifs` start here — more than a whole
`crun run`. Entry points live in plain `entry_points.txt` files next to each
distribution's metadata, so reading those for one group is a directory listing
and a few small reads. Only distributions that declare the group have their
METADATA opened, for the name and version `minifs drivers` shows.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections import namedtuple
from types import ModuleType


class EntryPoint(namedtuple("EntryPoint", "name value dist version")):
    """One entry point of the group (a named tuple: dataclasses costs ~6 ms
    of every start, for `inspect`)."""

    __slots__ = ()
    name: str
    value: str
    dist: str
    version: str

    def load(self) -> ModuleType | object:
        module, _, attr = self.value.partition(":")
        loaded: object = importlib.import_module(module.strip())
        for part in filter(None, attr.strip().split(".")):
            loaded = getattr(loaded, part)
        return loaded


def _section(text: str, group: str) -> list[tuple[str, str]]:
    """`name = value` lines of one `[group]` section of an entry_points.txt."""
    found, inside = [], False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            inside = line == f"[{group}]"
        elif inside and "=" in line and not line.startswith(("#", ";")):
            name, _, value = line.partition("=")
            found.append((name.strip(), value.strip()))
    return found


def _name_and_version(meta_dir: str) -> tuple[str, str]:
    name = version = "?"
    try:
        headers = "PKG-INFO" if meta_dir.endswith(".egg-info") else "METADATA"
        with open(os.path.join(meta_dir, headers), encoding="utf-8") as f:
            for line in f:
                if line.startswith("Name:"):
                    name = line[5:].strip()
                elif line.startswith("Version:"):
                    version = line[8:].strip()
                elif not line.strip():
                    break  # headers end at the first blank line
    except OSError:
        pass
    return name, version


def entry_points(group: str) -> list[EntryPoint]:
    """Entry points of `group` in sys.path order; the first of a name wins."""
    seen: set[str] = set()
    found: list[EntryPoint] = []
    for path in sys.path:
        try:
            names = sorted(os.listdir(path or "."))
        except OSError:
            continue
        for meta in names:
            if not meta.endswith((".dist-info", ".egg-info")):
                continue
            meta_dir = os.path.join(path or ".", meta)
            try:
                with open(os.path.join(meta_dir, "entry_points.txt"), encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            if f"[{group}]" not in text:
                continue
            dist, version = _name_and_version(meta_dir)
            for name, value in _section(text, group):
                if name not in seen:
                    seen.add(name)
                    found.append(EntryPoint(name, value, dist, version))
    return found
