"""aufs: the seed's first union filesystem, a branch per layer.

AUFS semantics on the unionfs-fuse engine (this kernel has no aufs module;
see `aufs_fuse` for how the engine behaves): every snapshot `<home>/<id>/` is
one branch holding only its own files. A clone's union is its own branch,
writable, over its parents' branches, read-only, nearest first; a lookup
searches them from the top down, a write to a lower file copies the whole
file up into the clone's branch first, and deletions are recorded in the
branch as unionfs-fuse whiteouts (`.unionfs-fuse/PATH_HIDDEN~`), which keep
hiding what lies below once the branch is a layer.

A union is served by a daemon the driver starts when `mounts()` is asked for
it, mounting it at `<home>/mnt/<id>` (a shared
bind mount of its own, so a container's mount namespace copied before the
daemon mounted still receives it, as zfs-fuse's datasets do); the records
bind that mount. The daemon stops on `commit`, `remove`, `unmounted`,
`drop_caches` and `minifs down`. Even a single branch is a union, as with
AUFS: bound directly, it would take xattrs that every union above it drops.

Layer tars are applied and diffed through the mounted union (`diff_dir` is
None), as for full trees: a deletion in an applied layer becomes the engine's
own whiteout record, and a diff compares the union with its parent's, so
`minifs diff` gives OCI whiteouts and is reproducible. unionfs-fuse 1.0 as
Debian builds it has no xattr support (its WITH_XATTR build option was off
by default then), so xattrs cannot be read or written through a union.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from minifs import failpoints
from minifs.driver import Driver, tree_usage
from minifs.errors import InvalidArgument, MissingPrerequisite, NotSupported
from minifs.hookspecs import hookimpl
from minifs.layers.safefs import remove_tree
from minifs.model import DriverKind, Kind, Mount, Usage
from minifs_drivers import aufs_fuse


class AufsDriver(Driver):
    name = "aufs"
    kind = DriverKind.COW
    backend = "unionfs-fuse"
    max_depth = aufs_fuse.MAX_BRANCHES - 1
    """Lower branches a clone may have: its own writable branch is one more."""
    xattrs = False
    copy_up_mtime_ns = 10**9  # unionfs-fuse sets a copied-up file's times with utime()
    """Debian's unionfs-fuse 1.0 is built without xattr support (and its
    copy-up would not carry them): every xattr write fails with EOPNOTSUPP."""

    def __init__(self, home: Path, options: Mapping[str, str] | None = None) -> None:
        # Refused before the state dir or this home is made.
        if any(c in str(home) for c in ",\\"):
            raise InvalidArgument(
                f"aufs cannot keep branches under {home}: unionfs-fuse's options are "
                "separated by ',' and escaped by '\\'; pick a --root without them"
            )
        super().__init__(home, options)

    @classmethod
    def probe(cls) -> None:
        if os.geteuid() != 0:
            raise NotSupported("aufs mounts FUSE unions for every user, which needs root")
        if not aufs_fuse.installed():
            raise MissingPrerequisite(
                "unionfs-fuse is not installed (its 'unionfs' command serves the unions); "
                "install it with 'apt-get install unionfs-fuse'"
            )
        if not os.path.exists("/dev/fuse"):
            raise NotSupported("unionfs-fuse needs /dev/fuse; load the fuse module")

    @classmethod
    def version(cls) -> str:
        return aufs_fuse.version()

    # -- lifecycle -------------------------------------------------------------

    @property
    def mnt_dir(self) -> Path:
        return self.home / "mnt"

    @property
    def run_dir(self) -> Path:
        return self.home / "run" / "unionfs"

    def bring_up(self) -> None:
        self.resources.bind_shared("mnt", self.mnt_dir)
        os.chmod(self.mnt_dir, 0o700)  # clones are writable there; the records bind them

    def stop(self) -> list[str]:
        """Every union's daemon first (their mounts sit on the shared bind)."""
        stopped = []
        for sid in aufs_fuse.sids_running(self.run_dir):
            stopped.extend(self._union(sid).stop())
        return stopped + super().stop()

    def _union(self, sid: str) -> aufs_fuse.Union:
        return aufs_fuse.Union(self.run_dir, sid, self.mnt_dir / sid)

    # -- snapshots -------------------------------------------------------------

    def dir(self, sid: str) -> Path:
        return self.home / sid

    def prepare(self, sid: str, parents: Sequence[str]) -> None:
        """An empty branch, then every directory of the parent's union in it
        (see aufs_fuse.copy_directories for the engine bug that needs it)."""
        self.view(sid, parents)
        if not parents:
            return
        # The parents' stack, read-only, in this clone's own union slot: a
        # layer's union may be stopped meanwhile by another process.
        union = self._union(sid)
        union.start(self.home, None, parents)
        try:
            failpoints.hit("aufs:prepare-partial")  # a branch half made, a daemon up
            aufs_fuse.copy_directories(union.target, self.dir(sid))
        finally:
            union.stop()

    def view(self, sid: str, parents: Sequence[str]) -> None:
        """A view's union holds only its parents' branches: its own stays empty."""
        self.remove(sid)  # a crashed earlier attempt may have left part of it
        self.dir(sid).mkdir(mode=0o755)

    def commit(self, sid: str, parents: Sequence[str]) -> None:
        """The branch becomes read-only as it is, whiteouts included: only its
        daemon, which wrote into it, has to go."""
        self._union(sid).stop()

    def remove(self, sid: str) -> None:
        self._union(sid).stop()
        with contextlib.suppress(FileNotFoundError):
            (self.mnt_dir / sid).rmdir()
        remove_tree(self.dir(sid))

    def mounts(self, sid: str, kind: Kind, parents: Sequence[str]) -> list[Mount]:
        """Always a union, even of one branch, as AUFS mounts one: a clone
        without parents then behaves as every other (xattrs refused, not
        accepted in one clone and gone in the next)."""
        mode = "rw" if kind is Kind.CLONE else "ro"
        if kind is Kind.CLONE:
            writable, lower = sid, list(parents)
        else:  # a layer shows itself over its parents; a view only its parents
            writable, lower = None, (list(parents) if kind is Kind.VIEW else [sid, *parents])
        union = self._union(sid)
        union.start(self.home, writable, lower or [sid])  # a view of nothing: its empty branch
        return [Mount("bind", str(union.target), ("bind", mode))]

    def usage(self, sid: str) -> Usage:
        return tree_usage(self.dir(sid))

    def ids(self) -> set[str]:
        try:
            names = os.listdir(self.home)
        except FileNotFoundError:
            return set()
        # Branches are named by 32-hex ids; mnt/, run/, records/ and files are not.
        return {n for n in names if len(n) == 32 and (self.home / n).is_dir()}

    def damage(self, sid: str) -> str | None:
        branch = self.dir(sid)
        return None if branch.is_dir() else f"its branch directory {branch} is missing"

    # -- measuring ---------------------------------------------------------------

    def drop_caches(self) -> None:
        """Stop every union's daemon: the next mount starts a fresh one, with
        nothing of the old one's open files or the kernel's FUSE entries."""
        for sid in aufs_fuse.sids_running(self.run_dir):
            self._union(sid).stop()

    def unmounted(self, sid: str) -> None:
        """Let the union's daemon go, unless a bind of it is still mounted."""
        union = self._union(sid)
        if not union.shared():
            union.stop()


@hookimpl
def register_drivers(register) -> None:
    register(AufsDriver)
