"""tarcopy: a minifs driver shipped as its own distribution.

Every clone is a copy of its parent made by `tar -c | tar -x`, the way images
were copied before copy-on-write: it exists to show that a third-party package
plugs into minifs exactly like the built-in drivers and passes the same
conformance suite, so it keeps to the public API (`minifs.driver.Driver`,
`minifs.hookspecs.hookimpl`, `minifs.errors`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from minifs.driver import Driver, tree_usage
from minifs.errors import BackendError, MissingPrerequisite, NotSupported
from minifs.hookspecs import hookimpl
from minifs.model import DriverKind, Kind, Mount, Usage

TAR_OPTIONS = ("--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner")
"""Keep every xattr namespace (GNU tar extracts only user.* by default), ACLs,
and owners by number, since a layer's uids belong to no host user."""


def tar_copy(source: Path, target: Path) -> None:
    """Copy the tree at `source` into the existing directory `target`."""
    with tempfile.TemporaryFile() as pack_err:  # a file, so a chatty tar never blocks
        pack = subprocess.Popen(
            ["tar", *TAR_OPTIONS, "-C", str(source), "-cf", "-", "."],
            stdout=subprocess.PIPE,
            stderr=pack_err,
        )
        with pack:
            unpack = subprocess.run(
                ["tar", *TAR_OPTIONS, "--same-permissions", "-C", str(target), "-xf", "-"],
                stdin=pack.stdout,
                capture_output=True,
                check=False,
            )
        pack_err.seek(0)
        # The unpacking side's error is the cause when both fail (the packer
        # then only reports the broken pipe).
        for code, err in ((unpack.returncode, unpack.stderr), (pack.returncode, pack_err.read())):
            if code != 0:
                lines = err.decode(errors="replace").strip().splitlines() or [f"exit {code}"]
                raise BackendError(f"tar copy of {source}: {lines[-1]}")


class TarCopyDriver(Driver):
    name = "tarcopy"
    kind = DriverKind.COPY
    backend = "directory copy (tar pipe)"

    @classmethod
    def probe(cls) -> None:
        if os.geteuid() != 0:
            raise NotSupported("tarcopy bind-mounts its directories, which needs root")
        if shutil.which("tar") is None:
            raise MissingPrerequisite("GNU tar is not installed; apt-get install tar")

    @classmethod
    def version(cls) -> str:
        done = subprocess.run(["tar", "--version"], capture_output=True, text=True, check=True)
        return done.stdout.splitlines()[0]

    def path(self, sid: str) -> Path:
        return self.home / "trees" / sid

    def prepare(self, sid: str, parents: Sequence[str]) -> None:
        self.remove(sid)  # a crashed earlier attempt may have left a partial copy
        self.path(sid).mkdir(parents=True, mode=0o755)
        if parents:
            tar_copy(self.path(parents[0]), self.path(sid))

    def commit(self, sid: str, parents: Sequence[str]) -> None:
        """A layer is its directory as it stands; only the store's kind changes."""

    def remove(self, sid: str) -> None:
        shutil.rmtree(self.path(sid), ignore_errors=True)

    def mounts(self, sid: str, kind: Kind, parents: Sequence[str]) -> list[Mount]:
        mode = "rw" if kind is Kind.CLONE else "ro"
        return [Mount("bind", str(self.path(sid)), ("rbind", mode))]

    def usage(self, sid: str) -> Usage:
        return tree_usage(self.path(sid))

    def ids(self) -> set[str]:
        try:
            return set(os.listdir(self.home / "trees"))
        except FileNotFoundError:
            return set()


@hookimpl
def register_drivers(register) -> None:
    register(TarCopyDriver)
