"""The contract every storage driver implements, built-in or third-party.

A driver turns snapshot ids into backend objects (directories, datasets, thin
volumes) and describes how to mount them; the core keeps names, parents, labels
and crash recovery. Every method that changes the backend must be idempotent:
after a crash the core calls it again (commit rolls forward, prepare and remove
roll back), so each must cope with half-done work of its own.

Storage options are fixed when a home is made: the first `start()` records the
effective ones (defaults filled in, `auto` settled) in `<home>/config.json`,
and every later open reads them back. The store is reopened without options in
many places (image unpacking, the container launcher, `minifs gc`), and a raw
device or a pool given once must not be forgotten by the next command.
"""

from __future__ import annotations

import abc
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from minifs.errors import BackendError, InvalidArgument, StateDirError
from minifs.model import DriverKind, Kind, Mount, Usage
from minifs.resources import Resources, run

TYPE_CHECKING = False  # typing costs ~2 ms of every start; annotations only need it here
if TYPE_CHECKING:
    from typing import Any, ClassVar

AUTO = "auto"
"""An option value the driver settles at the first start of a home (see
`Driver.settle_options`); given later, it agrees with whatever was chosen."""

NEEDS_START = ("prepare", "view", "commit", "remove", "mounts", "usage", "ids", "damage")
"""Methods that touch the backend, so they are refused before `start()`: the
backend may not be up (a loop image not mounted), and the recorded options
are not read yet. `diff_dir` is not among them: whether it is None tells
callers what kind of driver this is, started or not."""


def _started_only(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def checked(self: Driver, *args: Any, **kwargs: Any) -> Any:
        if not self.started:
            raise BackendError(
                f"the {self.name} driver in {self.home} is not started; call start() "
                "first (Storage does so before every operation)"
            )
        return method(self, *args, **kwargs)

    checked.started_only = True  # type: ignore[attr-defined]
    return checked


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
    option_defaults: ClassVar[Mapping[str, str]] = {}
    """What an option not given at the first start is recorded as."""
    disk_filesystem: ClassVar[str | None] = "ext4"
    """What to format a dedicated disk with (the benchmark's) before putting this
    driver's state dir on it; None when the driver takes the block device itself
    through its `device` storage option (a zpool, a thin pool)."""
    xattrs: ClassVar[bool] = True
    """Whether a clone keeps extended attributes (file capabilities, ACLs,
    user.*). A backend without them (unionfs-fuse) fails each write of one
    with EOPNOTSUPP, so a layer tar that carries one is refused; the shared
    suite leaves xattrs out for such a driver and tests everything else."""
    copy_up_mtime_ns: ClassVar[int] = 1
    """The resolution a file's mtime keeps when a metadata change (chmod,
    chown, a hard link) copies it up from a lower layer: 1 ns, or whole
    seconds where the engine copies times with utime() (unionfs-fuse). Layer
    tars keep seconds either way."""
    size_limit: ClassVar[str | None] = None
    """How this driver caps one clone's size (`minifs clone --size`, `minifs run
    --size`), e.g. "zfs refquota"; None when it cannot, and then `size_refusal`
    says why. A driver that can takes `size` (bytes) in `prepare`."""
    size_refusal: ClassVar[str] = (
        "it needs a per-clone quota (as Docker has with overlay2 on xfs with pquota, btrfs or zfs)"
    )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in NEEDS_START:
            method = cls.__dict__.get(name)
            if callable(method) and not getattr(method, "started_only", False):
                setattr(cls, name, _started_only(method))

    def __init__(self, home: Path, options: Mapping[str, str] | None = None) -> None:
        self.home = home
        self.options = dict(options or {})
        """The options given until `start()`; the recorded, effective ones after."""
        unknown = set(self.options) - set(self.options_help)
        if unknown:
            known = ", ".join(sorted(self.options_help)) or "none"
            raise InvalidArgument(
                f"{self.name} has no storage option {', '.join(sorted(unknown))}; known: {known}"
            )
        self.check_options(self.options, settled=False)
        self.resources = Resources(home / "run")
        self.started = False

    # -- can it run here ---------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def probe(cls) -> None:
        """Raise NotSupported or MissingPrerequisite when this machine cannot run it."""

    @classmethod
    @abc.abstractmethod
    def version(cls) -> str:
        """The backend's version, e.g. the kernel release for kernel overlayfs."""

    # -- options -----------------------------------------------------------------

    def check_options(self, options: Mapping[str, str], settled: bool) -> None:  # noqa: B027
        """Raise InvalidArgument for a value this driver cannot use. Called on the
        given options before anything is made on disk, and (`settled`) on the
        recorded ones, where `auto` must no longer appear."""

    def settle_options(self, options: dict[str, str]) -> dict[str, str]:
        """At the first start of a fresh home, with the defaults filled in: turn
        choices that depend on the machine (`auto`) into what this home keeps
        for good. The home directory exists by then."""
        return options

    @property
    def config_path(self) -> Path:
        return self.home / "config.json"

    def _recorded_options(self) -> dict[str, str] | None:
        """The options this home was made with, or None for a fresh home."""
        try:
            text = self.config_path.read_text()
        except FileNotFoundError:
            return None
        try:
            recorded = json.loads(text)
            if not (
                isinstance(recorded, dict)
                and set(recorded) <= set(self.options_help)
                and all(isinstance(v, str) for v in recorded.values())
            ):
                raise ValueError("not an object of this driver's options")
            self.check_options(recorded, settled=True)
        except (ValueError, InvalidArgument):
            example = json.dumps(dict(sorted(self.option_defaults.items())))
            raise StateDirError(
                f"{self.config_path} is damaged (it should hold the storage options this "
                f"{self.name} store was made with, like {example}); restore it, or move "
                f"{self.home} aside to start an empty {self.name} store"
            ) from None
        return recorded

    def _agree(self, recorded: Mapping[str, str]) -> None:
        """Refuse given options that contradict what the home was made with."""
        for key, value in sorted(self.options.items()):
            if recorded.get(key) == value or (value == AUTO and key in recorded):
                continue
            made = f"{key}={recorded[key]}" if key in recorded else f"no {key}"
            raise InvalidArgument(
                f"{self.name} in {self.home} was made with {made}; to use {key}={value}, "
                "remove its snapshots and that directory first (or leave the option out)"
            )

    def _record_options(self, options: Mapping[str, str]) -> None:
        """Write config.json whole or not at all: a torn one would be taken for
        damage, and a missing one for a fresh home."""
        tmp = self.config_path.with_name(self.config_path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(dict(sorted(options.items())), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.config_path)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Settle the options, then bring the backend up (`bring_up`).

        A fresh home records its options only once the backend came up, so a
        first start that fails (a backing image that cannot be made) leaves no
        choice behind to bind every later start.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        recorded = self._recorded_options()
        if recorded is None:
            self.options = self.settle_options({**self.option_defaults, **self.options})
            self.check_options(self.options, settled=True)
        else:
            self._agree(recorded)
            self.options = recorded
        self.bring_up()
        if recorded is None:
            self._record_options(self.options)
        self.started = True

    def bring_up(self) -> None:  # noqa: B027
        """Bring the backend up with `self.options`, re-attaching to what a
        previous run left alive; record what it starts in `self.resources`."""

    def stop(self) -> list[str]:
        """Stop what `start` brought up (and nothing else); returns what stopped."""
        self.started = False
        return self.resources.down()

    # -- snapshots -------------------------------------------------------------

    @abc.abstractmethod
    def prepare(self, sid: str, parents: Sequence[str], size: int | None = None) -> None:
        """Create a writable clone `sid` on top of `parents`, capped at `size`
        bytes when given (only asked of drivers with a `size_limit`)."""

    @_started_only
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

    @_started_only
    def damage(self, sid: str) -> str | None:
        """What is wrong with `sid`'s backend object beyond being missing (a
        part of it gone), or None; for `minifs check` and for naming the damaged
        layer when an operation on a chain fails. Whether the object exists at
        all the core asks `ids()` once for the whole chain, so drivers with
        more shape than one object override this and others need not."""
        return None

    # -- measuring: what the benchmark (or anything counting disk use) asks --------

    min_disk_size: ClassVar[int] = 0
    """Smallest dedicated disk, in bytes, this driver can be given (the
    benchmark gives each its own): below it mkfs or `zpool create` refuses.
    0 when the driver has no floor of its own."""

    def flush(self) -> None:
        """Return once everything written so far through this driver is on its
        device, so a block device's write counter can be read: syncfs(2) of the
        home's filesystem (data, metadata and journal). A backend that syncfs
        does not reach (a zpool under zfs-fuse) overrides it."""
        from minifs import linux

        linux.syncfs(self.home)

    def space(self) -> dict[str, int | None]:
        """`bytes_total`, `bytes_free`, `inodes_total`, `inodes_free` where this
        driver keeps its data, to count what a layer or a clone takes and how
        many fit: statvfs of the home, free counts including root's reserve
        (minifs runs as root). Inode counts are None where the filesystem has
        no fixed number to run out of (btrfs makes inodes from free space and
        statvfs says 0), so nobody divides by an invented one."""
        st = os.statvfs(self.home)
        fixed = st.f_files > 0
        return {
            "bytes_total": st.f_blocks * st.f_frsize,
            "bytes_free": st.f_bfree * st.f_frsize,
            "inodes_total": st.f_files if fixed else None,
            "inodes_free": st.f_ffree if fixed else None,
        }

    def drop_caches(self) -> None:  # noqa: B027
        """Drop what this driver caches of its snapshots outside the kernel's
        page cache, dentries and inodes (/proc/sys/vm/drop_caches empties
        those), so the next read goes to the device. Callers unmount what they
        mounted from this driver first: dropping may mean letting go of the
        backend (zfs exports its pool to empty the ARC). Default: nothing."""

    def unmounted(self, sid: str) -> None:  # noqa: B027
        """The caller unmounted what `mounts(sid)` described: a driver that
        mounted something of its own to serve those records may let it go
        (zfs-fuse serves each dataset from a mount in its daemon, which holds
        about a thousand at most). Default: nothing."""


def tree_usage(path: Path) -> Usage:
    """Disk bytes and inodes under `path` (itself included), each hard-linked
    inode counted once. GNU du walks by descriptors, so a layer's legal
    2,000-deep tree does not fail on PATH_MAX as a walk by path names would."""
    if not path.exists():
        return Usage(size=0, inodes=0)
    size = run(["du", "-s", "-B1", str(path)], f"du {path}").split()[0]
    inodes = run(["du", "-s", "--inodes", str(path)], f"du {path}").split()[0]
    return Usage(size=int(size), inodes=int(inodes))
