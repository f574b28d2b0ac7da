"""The contract every storage driver implements, built-in or third-party.

A driver turns snapshot ids into backend objects (directories, datasets, thin
volumes) and describes how to mount them; the core keeps names, parents, labels
and crash recovery. Every method that changes the backend must be idempotent:
after a crash the core calls it again (commit rolls forward, prepare and remove
roll back), so each must cope with half-done work of its own.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from minifs.errors import InvalidArgument
from minifs.model import DriverKind, Kind, Mount, Usage
from minifs.resources import Resources, run


class Driver(abc.ABC):
    """One storage backend, living in its own home under the state dir.

    `parents` arguments list the parent chain's ids nearest first, so a driver
    never needs to read the metadata store.
    """

    name: ClassVar[str]
    kind: ClassVar[DriverKind]
    backend: ClassVar[str]
    max_depth: ClassVar[int | None] = None
    """Most layers one clone may stack on, or None when the backend has no limit."""
    options_help: ClassVar[Mapping[str, str]] = {}
    """Storage options (`--storage-opt NAME.KEY=VALUE`) this driver understands."""
    disk_filesystem: ClassVar[str | None] = "ext4"
    """What to format a dedicated disk with (the benchmark's) before putting this
    driver's state dir on it; None when the driver takes the block device itself
    through its `device` storage option (a zpool, a thin pool)."""

    def __init__(self, home: Path, options: Mapping[str, str] | None = None) -> None:
        self.home = home
        self.options = dict(options or {})
        unknown = set(self.options) - set(self.options_help)
        if unknown:
            known = ", ".join(sorted(self.options_help)) or "none"
            raise InvalidArgument(
                f"{self.name} has no storage option {', '.join(sorted(unknown))}; known: {known}"
            )
        self.resources = Resources(home / "run")

    # -- can it run here ---------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def probe(cls) -> None:
        """Raise NotSupported or MissingPrerequisite when this machine cannot run it."""

    @classmethod
    @abc.abstractmethod
    def version(cls) -> str:
        """The backend's version, e.g. the kernel release for kernel overlayfs."""

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Bring the backend up, re-attaching to what a previous run left alive."""
        self.home.mkdir(parents=True, exist_ok=True)

    def stop(self) -> list[str]:
        """Stop what `start` brought up (and nothing else); returns what stopped."""
        return self.resources.down()

    # -- snapshots -------------------------------------------------------------

    @abc.abstractmethod
    def prepare(self, sid: str, parents: Sequence[str]) -> None:
        """Create a writable clone `sid` on top of `parents`."""

    def view(self, sid: str, parents: Sequence[str]) -> None:
        """Create a read-only view; by default the same object as a clone."""
        self.prepare(sid, parents)

    @abc.abstractmethod
    def commit(self, sid: str, parents: Sequence[str]) -> None:
        """Freeze clone `sid` into a layer (same id); must be safe to repeat."""

    @abc.abstractmethod
    def remove(self, sid: str) -> None:
        """Delete whatever exists of `sid`; must be safe on half-made objects."""

    @abc.abstractmethod
    def mounts(self, sid: str, kind: Kind, parents: Sequence[str]) -> list[Mount]:
        """Mount records that show `sid` (read-only unless it is a clone)."""

    def diff_dir(self, sid: str) -> Path | None:
        """The directory holding only `sid`'s own changes in overlayfs form
        (whiteouts as 0/0 character devices, opaque directories marked by the
        `trusted.overlay.opaque` xattr), for drivers that keep one. Layer tars
        are then applied and diffed there directly, as Docker's overlay2 does;
        drivers holding full trees return None and are diffed by comparing trees.
        """
        return None

    @abc.abstractmethod
    def usage(self, sid: str) -> Usage:
        """Bytes and inodes `sid` holds itself, parents excluded."""

    @abc.abstractmethod
    def ids(self) -> set[str]:
        """Ids that exist in the backend, for the garbage collector."""


def tree_usage(path: Path) -> Usage:
    """Disk bytes and inodes under `path` (itself included), each hard-linked
    inode counted once. GNU du walks by descriptors, so a layer's legal
    2,000-deep tree does not fail on PATH_MAX as a walk by path names would."""
    if not path.exists():
        return Usage(size=0, inodes=0)
    size = run(["du", "-s", "-B1", str(path)], f"du {path}").split()[0]
    inodes = run(["du", "-s", "--inodes", str(path)], f"du {path}").split()[0]
    return Usage(size=int(size), inodes=int(inodes))
