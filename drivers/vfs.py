"""vfs: every clone is a full copy of its parent; the baseline every CoW or RoW
driver is measured against (Docker's vfs, containerd's native snapshotter)."""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from minifs.driver import Driver, tree_usage
from minifs.errors import BackendError, MissingPrerequisite, NotSupported
from minifs.hookspecs import hookimpl
from minifs.layers.safefs import remove_tree
from minifs.model import DriverKind, Kind, Mount, Usage
from minifs.resources import run


class VfsDriver(Driver):
    name = "vfs"
    kind = DriverKind.COPY
    backend = "directory copy (cp -a)"

    @classmethod
    def probe(cls) -> None:
        if os.geteuid() != 0:
            raise NotSupported("vfs bind-mounts its directories, which needs root; run as root")
        if shutil.which("cp") is None:
            raise MissingPrerequisite("cp (coreutils) is not installed; run 'make setup'")

    @classmethod
    def version(cls) -> str:
        return run(["cp", "--version"], "cp --version").splitlines()[0]

    @property
    def dirs(self) -> Path:
        return self.home / "dir"

    def path(self, sid: str) -> Path:
        return self.dirs / sid

    def prepare(self, sid: str, parents: Sequence[str]) -> None:
        self.remove(sid)  # a crashed earlier attempt may have left a partial copy
        self.dirs.mkdir(parents=True, exist_ok=True)
        if parents:
            # cp -a keeps modes, owners, times, xattrs, hard links, devices and fifos.
            source = str(self.path(parents[0]))
            run(["cp", "-a", "--reflink=auto", source, str(self.path(sid))], f"copy {source}")
        else:
            self.path(sid).mkdir(mode=0o755)

    def commit(self, sid: str, parents: Sequence[str]) -> None:
        """A vfs layer is its directory as it stands; only the store's kind changes."""

    def remove(self, sid: str) -> None:
        """Remove the copy, retrying a little while it still grows: a `cp -a` of
        a command killed a moment ago may not have died yet (it dies with its
        parent, but the kernel takes the two down one after the other)."""
        for delay in (0.05, 0.1, 0.2, 0.4, 0.8, None):
            try:
                remove_tree(self.path(sid))
                return
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY or delay is None:
                    raise BackendError(
                        f"cannot remove {self.path(sid)}: {exc.strerror}; is a process still "
                        "writing there? stop it, then run 'minifs gc'"
                    ) from None
                time.sleep(delay)

    def mounts(self, sid: str, kind: Kind, parents: Sequence[str]) -> list[Mount]:
        mode = "rw" if kind is Kind.CLONE else "ro"
        return [Mount("bind", str(self.path(sid)), ("rbind", mode))]

    def usage(self, sid: str) -> Usage:
        return tree_usage(self.path(sid))

    def ids(self) -> set[str]:
        try:
            return set(os.listdir(self.dirs))
        except FileNotFoundError:
            return set()


@hookimpl
def register_drivers(register) -> None:
    register(VfsDriver)
