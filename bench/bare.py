"""The bare kernel operation each driver's clone+mount stands for, done by hand.

minifs's overhead is the ratio of its clone+mount to this in the same run, on
the same disk, with the same mount options: for overlay2 `mkdir` of an upper
and a work dir and one overlay mount (mount(2), or fsconfig past a page of
options, exactly as the mounter would pick); for vfs `cp -a` of the layer and a
bind mount with the clone's flags. What is left is minifs's own cost: Python, the metadata store and
its lock, the crash-safe ordering.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from minifs import linux, mounter
from minifs.model import Mount
from minifs.resources import run


class Bare:
    """A clone+mount done by hand; `delete` is the same for every one."""

    what: str

    def create(
        self, clone: Sequence[Mount], layer: Sequence[Mount], scratch: Path, target: Path
    ) -> None:
        """Make what a clone of the layer needs under `scratch` and mount it at `target`,
        given the clone's and the layer's mount records."""
        raise NotImplementedError

    def delete(self, scratch: Path, target: Path) -> None:
        """Unmount `target` and delete `scratch`."""
        linux.umount(target)
        shutil.rmtree(scratch)


class BareOverlay(Bare):
    what = "mkdir upper+work, mount -t overlay with the clone's options"

    def create(
        self, clone: Sequence[Mount], layer: Sequence[Mount], scratch: Path, target: Path
    ) -> None:
        (record,) = clone
        upper, work = scratch / "upper", scratch / "work"
        scratch.mkdir()
        upper.mkdir()
        work.mkdir()
        options = tuple(
            f"upperdir={upper}"
            if o.startswith("upperdir=")
            else f"workdir={work}"
            if o.startswith("workdir=")
            else o
            for o in record.options
        )
        mounter.mount_one(Mount(record.type, record.source, options), target)


class BareCopy(Bare):
    what = "cp -a of the layer's directory, bind mount with the clone's options"

    def create(
        self, clone: Sequence[Mount], layer: Sequence[Mount], scratch: Path, target: Path
    ) -> None:
        (copied,) = layer
        (record,) = clone
        run(["cp", "-a", "--reflink=auto", copied.source, str(scratch)], "bare copy")
        mounter.mount_one(Mount(record.type, str(scratch), record.options), target)


BARE: dict[str, Bare] = {"overlay2": BareOverlay(), "vfs": BareCopy()}
"""Drivers with a bare equivalent; any other is measured without the ratio."""
