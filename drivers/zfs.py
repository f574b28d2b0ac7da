"""zfs: a dataset per snapshot, layers as ZFS snapshots, clones as `zfs clone`.

The layout of Docker's and containerd's zfs drivers, in minifs words:

- every snapshot id is a dataset `<root>/<id>` (`root` is the pool minifs
  makes in its home, or the dataset given as `zfs.pool`);
- a clone is `zfs clone <root>/<parent>@layer <root>/<id>` (a `zfs create`
  without a parent), so it costs what it changes, not what it shows;
- committing takes `<root>/<id>@layer` (kernel ZFS: after `readonly=on`):
  that snapshot is the layer every child clones, and the dataset shows it;
- a view is a clone shown read-only; removing destroys the dataset with its
  snapshot (children go first, the core sees to that);
- the pool minifs makes keeps a small reserve (see zfs_pool.RESERVE), so a
  full pool still takes snapshots and removes.

Two ZFS implementations are met. Kernel OpenZFS (/dev/zfs): datasets have
`mountpoint=legacy`, views and layers `readonly=on`, and the records are
`mount -t zfs DATASET`. zfs-fuse (no kernel module): mount(2) cannot mount
its datasets; the daemon mounts each itself as a FUSE mount at
`<home>/mnt/<id>`, on demand, and the records bind that mount, read-only for
views and layers (the datasets themselves stay writable: see `_mounted` for
the zfs-fuse bug that forces it). `<home>/mnt` is a shared bind mount of its
own, so a mount namespace copied before the daemon mounted a clone (the
launcher's, which unshares while the monitor clones) still receives the
clone, provided it keeps its copy a slave rather than making it private.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from minifs import linux
from minifs.driver import Driver
from minifs.errors import (
    BackendError,
    InUse,
    InvalidArgument,
    MissingPrerequisite,
    NotSupported,
)
from minifs.hookspecs import hookimpl
from minifs.model import DriverKind, Kind, Mount, Usage
from minifs_drivers import zfs_fuse
from minifs_drivers.zfs_backend import (
    ZfsBackend,
    ZfsBusy,
    ZfsError,
    ZfsExists,
    ZfsHasClones,
    ZfsNoSpace,
    ZfsNotFound,
    pick,
)
from minifs_drivers.zfs_pool import (
    DEFAULT_SIZE,
    MIN_VDEV,
    RESERVE,
    EmbeddedPool,
    Reserve,
    auto_size,
    check_user_dataset,
    pool_name,
)

LAYER = "layer"
"""The snapshot name that makes a dataset a layer: `<root>/<id>@layer`."""

SID_RE = re.compile(r"[0-9a-f]{32}")

READONLY = "minifs:readonly"
"""A user property marking views and layers: their zfs-fuse mounts are made
read-only by the mount flag (see `ZfsDriver._mounted`)."""

BUSY_WAIT = 10.0
"""Seconds a destroy is retried while the dataset is busy. zfs-fuse lets go of
a dataset ~50-100 ms after its unmount (measured: the first destroy right
after an unmount fails every time here), so a few tries suffice; longer means
something really holds it."""


@functools.cache
def flavour() -> str:
    """'kernel' where the OpenZFS module is loaded, else 'zfs-fuse'."""
    return "kernel" if os.path.exists("/dev/zfs") else "zfs-fuse"


class _Backend:
    """`ZfsDriver.backend`, computed by probing when first read (as `minifs
    drivers` does on the class), since which one is used depends on the machine."""

    def __get__(self, obj: object, owner: type | None = None) -> str:
        return pick(flavour()).name


class ZfsDriver(Driver):
    name = "zfs"
    kind = DriverKind.COW
    backend = _Backend()  # type: ignore[assignment]
    disk_filesystem = None
    min_disk_size = MIN_VDEV
    size_limit = "zfs refquota"
    options_help = {
        "pool": "an existing pool or dataset to keep datasets under (used as it is, "
        "never destroyed); default: a pool minifs makes in its home",
        "size": f"size of the sparse file vdev of the pool minifs makes (default auto: "
        f"{DEFAULT_SIZE}, or 90% of the free space where it is smaller; at least 64M)",
        "device": "a block device for the pool minifs makes, instead of a file",
        "name": "name of the pool minifs makes (default minifs-<hash of the home path>)",
    }
    option_defaults = {"size": "auto"}

    def __init__(self, home: Path, options: Mapping[str, str] | None = None) -> None:
        super().__init__(home, options)
        self.check_options(self.options, settled=False)  # before anything is made
        self.zfs: ZfsBackend = pick(flavour())
        self.root = ""
        self.pool = ""

    # -- can it run here ---------------------------------------------------------

    @classmethod
    def probe(cls) -> None:
        if os.geteuid() != 0:
            raise NotSupported("zfs makes pools and mounts datasets, which needs root; run as root")
        needed = ("zfs", "zpool") if flavour() == "kernel" else ("zfs-fuse", "zfs", "zpool")
        missing = [p for p in needed if not _which(p)]
        if missing:
            raise MissingPrerequisite(
                f"{', '.join(missing)} not found and no kernel ZFS (/dev/zfs); install zfs-fuse "
                "('apt-get install zfs-fuse') or load OpenZFS"
            )
        if flavour() == "zfs-fuse" and not os.path.exists("/dev/fuse"):
            raise NotSupported("zfs-fuse needs /dev/fuse; load the fuse module ('modprobe fuse')")

    @classmethod
    def version(cls) -> str:
        if flavour() == "kernel":
            with contextlib.suppress(OSError):
                return "OpenZFS " + Path("/sys/module/zfs/version").read_text().strip()
            return "OpenZFS (kernel)"
        done = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "zfs-fuse"],
            capture_output=True,
            text=True,
            check=False,
        )
        return f"zfs-fuse {done.stdout.strip()}" if done.returncode == 0 else "zfs-fuse"

    # -- options -----------------------------------------------------------------

    def check_options(self, options: Mapping[str, str], settled: bool) -> None:
        pool = options.get("pool")
        if pool is not None:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.:-]*(/[A-Za-z0-9_.:-]+)*", pool):
                raise InvalidArgument(
                    f"zfs.pool={pool!r} is not a pool or dataset name; write it like tank "
                    "or tank/minifs"
                )
            clash = sorted({"device", "name", "size"} & set(options))
            if clash:
                raise InvalidArgument(
                    f"zfs.pool names an existing dataset; zfs.{clash[0]} is for the pool "
                    "minifs makes, so give one or the other"
                )
        name = options.get("name")
        if name is not None and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.:-]{0,200}", name):
            raise InvalidArgument(
                f"zfs.name={name!r} is not a pool name; start with a letter, then letters, "
                "digits and _.:-"
            )
        if "size" in options and "pool" not in options and options["size"] != "auto":
            from minifs_drivers.zfs_pool import vdev_size

            vdev_size(options["size"])

    def settle_options(self, options: dict[str, str]) -> dict[str, str]:
        """The pool name is fixed at the first start: the home may move later."""
        if "pool" in options:
            options.pop("size", None)
        else:
            options.setdefault("name", pool_name(self.home))
            if options.get("size", "auto") == "auto" and not options.get("device"):
                options["size"] = auto_size(self.home)
        return options

    # -- lifecycle -------------------------------------------------------------

    @property
    def mnt_dir(self) -> Path:
        return self.home / "mnt"

    def start(self) -> None:
        """The base class settles, records and brings up; a base class from
        before option persistence only makes the home, so do the rest here."""
        super().start()
        if not hasattr(Driver, "bring_up"):
            self.options = self.settle_options({**self.option_defaults, **self.options})
            self.check_options(self.options, settled=True)
            self.bring_up()

    def bring_up(self) -> None:
        """The daemon (zfs-fuse), then the pool: imported, or made the first
        time. A start that fails undoes what it brought up (nothing
        half-made): the shared mount, a daemon it started if idle."""
        try:
            self._bring_up()
        except BaseException:
            with contextlib.suppress(Exception):
                self.resources.down()
            raise

    def _bring_up(self) -> None:
        if flavour() == "zfs-fuse":
            self.resources.bind_shared("mnt", self.mnt_dir)
            os.chmod(self.mnt_dir, 0o700)  # the datasets under it are writable; see _mounted
            zfs_fuse.ensure(self.resources, self.home / "run" / "zfs-fuse.log")
        if self.options.get("pool"):
            self.root = self.options["pool"]
            self.pool = self.root.split("/")[0]
            check_user_dataset(self.zfs, self.root)
            return
        self.root = self.pool = self.options["name"]
        imported = self.zfs.pools()
        if flavour() == "zfs-fuse" and self.pool not in imported:
            zfs_fuse.detach_dead_mounts(self.pool)  # its daemon died with it
        EmbeddedPool(self.zfs, self.resources, self.home, self.pool).up(
            self.options.get("size", DEFAULT_SIZE), self.options.get("device"), imported
        )

    def stop(self) -> list[str]:
        """Export the pool minifs made and stop a daemon it started; of a pool
        the user named, only unmount the datasets zfs-fuse mounted for minifs.
        Mounts a dead daemon left are detached (nothing else can undo them)."""
        if flavour() == "zfs-fuse":
            alive = zfs_fuse.answering()
            if not alive or self.options.get("pool"):
                for target, source in _fuse_mounts_under(self.mnt_dir):
                    if alive:
                        with contextlib.suppress(ZfsError):
                            self.zfs.unmount(source)
                    with contextlib.suppress(OSError):
                        if linux.is_mountpoint(target):
                            linux.umount(target, 0 if alive else linux.MNT_DETACH)
        return super().stop()

    def sync(self) -> None:
        """Commit the pool's open transaction group to disk and return after.

        Anything that counts bytes on disk (the benchmark's write counters)
        must call this first: ZFS holds writes in memory for up to a
        transaction group's lifetime, and under zfs-fuse sync(2) does not
        reach it at all. On a full pool the property set it takes under
        zfs-fuse needs the reserve like any other change."""
        self._roomy(lambda: self.zfs.sync(self.pool, self.root), "commit its writes")

    def flush(self) -> None:
        """A forced commit (`sync`): syncfs(2) does not reach the pool."""
        self.sync()

    def space(self) -> dict[str, int | None]:
        """The root dataset's exact `used` and `available`, after a commit
        (they move when a transaction group lands): a clone fails when
        `available` is spent, which the pool's `free` tells only roughly
        (zfs-fuse's `zpool list` has no -p and rounds to three digits, and a
        pool keeps back a share no dataset may use). Free includes the reserve,
        which `_roomy` lets any operation use once the pool is full. Inodes:
        None, as ZFS makes objects from free space and has no count to run out of."""
        self.sync()
        props = self.zfs.get(self.root, ["used", "available"])
        used, free = int(props["used"]), int(props["available"])
        held = 0
        if self._reserve() is not None:
            with contextlib.suppress(ZfsNotFound):
                reserve = self.zfs.get(f"{self.pool}/{RESERVE}", ["reservation"])
                held = int(reserve.get("reservation", "0"))
        return {
            "bytes_total": used + free,
            "bytes_free": free + held,
            "inodes_total": None,
            "inodes_free": None,
        }

    def drop_caches(self) -> None:
        """Export the pool minifs made and import it again: only an export
        evicts a pool's blocks from the ARC, which drop_caches cannot reach;
        datasets are mounted again when asked for (`_mounted`). A user's pool
        (`zfs.pool`) is never exported, so its reads may still hit the ARC.
        The daemon runs without zfs-fuse's vdev cache (see zfs_fuse.ARGV): it
        reads 64 KiB around every small read, so the import and the mount
        would bring in the blocks a lookup is about to ask for."""
        if self.options.get("pool"):
            return
        from minifs.resources import _export  # what `minifs down` runs, busy retries included

        _export(self.pool)
        EmbeddedPool(self.zfs, self.resources, self.home, self.pool).up(
            self.options.get("size", DEFAULT_SIZE), self.options.get("device"), self.zfs.pools()
        )

    def unmounted(self, sid: str) -> None:
        """zfs-fuse: let go of the daemon's own mount of the dataset (each takes
        one of the ~1000 it can serve); `_mounted` mounts it again when asked."""
        if flavour() == "zfs-fuse" and _mount_mode(self.mnt_dir / sid) is not None:
            with contextlib.suppress(ZfsError):
                self.zfs.unmount(self.dataset(sid))

    # -- snapshots -------------------------------------------------------------

    def dataset(self, sid: str) -> str:
        return f"{self.root}/{sid}"

    def _props(self, sid: str, readonly: bool, size: int | None) -> dict[str, str]:
        props = {}
        if flavour() == "kernel":
            props["mountpoint"] = "legacy"
        else:
            props["mountpoint"] = str(self.mnt_dir / sid)
            props["canmount"] = "noauto"  # mounted when asked for, not at import
        if readonly:
            props[READONLY] = "on"
            if flavour() == "kernel":
                props["readonly"] = "on"  # zfs-fuse: see _mounted
        if size is not None:
            props["refquota"] = str(size)  # what `minifs clone --size` will set
        return props

    def prepare(
        self, sid: str, parents: Sequence[str], size: int | None = None, readonly: bool = False
    ) -> None:
        """`zfs clone` of the parent layer's snapshot (`zfs create` without one).

        `size` caps what the clone may reference (refquota), as Docker's
        `--storage-opt size` does on zfs."""
        dataset = self.dataset(sid)
        props = self._props(sid, readonly, size)
        origin = f"{self.dataset(parents[0])}@{LAYER}" if parents else None

        def make() -> None:
            if origin:
                self.zfs.clone(origin, dataset, props)
            else:
                self.zfs.create(dataset, props)

        try:
            self._roomy(make, f"make dataset {dataset}")
            if readonly and flavour() == "zfs-fuse" and _mount_mode(self.mnt_dir / sid) == "rw":
                _remount_readonly(self.mnt_dir / sid)  # `zfs clone` mounted it already
        except ZfsExists:
            self.remove(sid)  # what a crashed earlier attempt left
            self._roomy(make, f"make dataset {dataset}")
        except ZfsNotFound:
            if origin and not self.zfs.exists(origin):
                raise BackendError(
                    f"layer {parents[0]} has lost its snapshot {origin}; remove that layer "
                    "and make it again"
                ) from None
            raise

    def _roomy(self, action: Callable[[], None], what: str) -> None:
        """Run `action`; if the pool is full, once more with the reserve let go
        (see zfs_pool.RESERVE), taking the reserve back afterwards."""
        try:
            action()
            return
        except ZfsNoSpace:
            reserve = self._reserve()
            if reserve is None or not reserve.release():
                raise self._full(what) from None
        try:
            action()
        except ZfsNoSpace:
            raise self._full(what) from None
        finally:
            reserve.restore()

    def _reserve(self) -> Reserve | None:
        if self.options.get("pool"):
            return None
        return Reserve(self.zfs, self.pool, self.home / "reserve.released")

    def _full(self, what: str) -> BackendError:
        return BackendError(
            f"zpool {self.pool} is full: cannot {what}; remove snapshots ('minifs rm NAME')"
            + ("" if self.options.get("pool") else " or make the store with a larger zfs.size")
        )

    def view(self, sid: str, parents: Sequence[str]) -> None:
        self.prepare(sid, parents, readonly=True)

    def commit(self, sid: str, parents: Sequence[str]) -> None:
        """readonly=on (kernel ZFS; zfs-fuse: see _mounted), then `@layer`;
        each step is skipped when already done, so a commit a crash cut short
        is finished by running it again."""
        dataset = self.dataset(sid)

        def freeze() -> None:
            if flavour() == "kernel":
                self.zfs.set(dataset, {"readonly": "on"})
            else:
                self.zfs.set(dataset, {READONLY: "on"})
                if _mount_mode(self.mnt_dir / sid) == "rw":
                    _remount_readonly(self.mnt_dir / sid)
            with contextlib.suppress(ZfsExists):
                self.zfs.snapshot(f"{dataset}@{LAYER}")

        self._roomy(freeze, f"commit {dataset}")

    def remove(self, sid: str) -> None:
        """Destroy the dataset and its `@layer`, retrying a moment while zfs-fuse
        is still letting go of an unmount."""
        dataset = self.dataset(sid)
        delay, deadline = 0.02, time.monotonic() + BUSY_WAIT
        while True:
            try:
                self._roomy(lambda: self.zfs.destroy(dataset, recursive=True), f"destroy {dataset}")
                break
            except ZfsNotFound:
                break
            except ZfsHasClones:
                raise InUse(
                    f"{dataset}@{LAYER} still has dependent clones; remove the snapshots made "
                    "from it first"
                ) from None
            except ZfsBusy:
                if time.monotonic() > deadline:
                    raise InUse(
                        f"zfs dataset {dataset} is still busy after {BUSY_WAIT:.0f} s (mounted "
                        "elsewhere, or a process has files open in it); stop that, then retry"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        with contextlib.suppress(OSError):
            (self.mnt_dir / sid).rmdir()
        reserve = self._reserve()
        if reserve is not None:
            reserve.restore()  # taken for an operation on a full pool, room now again

    def mounts(self, sid: str, kind: Kind, parents: Sequence[str]) -> list[Mount]:
        mode = "rw" if kind is Kind.CLONE else "ro"
        if flavour() == "kernel":
            return [Mount("zfs", self.dataset(sid), (mode,))]
        return [Mount("bind", str(self._mounted(sid, mode == "ro")), ("bind", mode))]

    def _mounted(self, sid: str, readonly: bool | None = None) -> Path:
        """Where zfs-fuse shows `sid`, mounting it first if it is not; for a
        view or layer (`readonly`; None: ask the dataset) read-only.

        Read-only by the mount's own flag, not by the dataset: zfs-fuse
        answers an xattr call on a read-only dataset (readonly=on, or
        `zfs mount -o ro`) with ENOSYS whenever the file has no xattr
        directory yet, and the kernel's FUSE client takes ENOSYS for "no
        xattrs here" and refuses every xattr call on that mount from then
        on. A read-only bind flag stops writes in the kernel while zfs-fuse
        still sees a writable dataset."""
        target = self.mnt_dir / sid
        mode = _mount_mode(target)
        if mode is None:
            dataset = self.dataset(sid)
            try:
                self.zfs.mount(dataset)
            except ZfsError as exc:
                if "not empty" in str(exc):
                    raise BackendError(
                        f"zfs-fuse will not mount {dataset} on {target}: files were "
                        "written into that directory while it was unmounted; move them away"
                    ) from None
                if "already mounted" not in str(exc):
                    raise
            mode = "rw"
        if readonly is None:
            readonly = self.zfs.get(self.dataset(sid), [READONLY]).get(READONLY) == "on"
        if readonly and mode == "rw":
            _remount_readonly(target)
        return target

    def usage(self, sid: str) -> Usage:
        """`used` bytes: what the dataset holds itself (its own blocks and its
        `@layer`), its origin's blocks excluded, after a commit of the open
        transaction group. Inodes: the objects (files, directories, links,
        xattr objects) the dataset *references*, shared ones included: ZFS
        keeps no count of the objects only one clone holds, so this number
        grows with what a clone adds but starts at its parent's count."""
        self.sync()
        try:
            used = int(self.zfs.get(self.dataset(sid), ["used"])["used"])
        except ZfsNotFound:
            return Usage(size=0, inodes=0)
        return Usage(size=used, inodes=self._objects(sid))

    def _objects(self, sid: str) -> int:
        if flavour() == "kernel":
            return _objects_by_mounting(self.dataset(sid), self.home / "run" / "usage")
        stats = os.statvfs(self._mounted(sid))
        return stats.f_files - stats.f_ffree

    def ids(self) -> set[str]:
        prefix = self.root + "/"
        try:
            names = self.zfs.children(self.root)
        except ZfsNotFound:
            return set()
        return {n[len(prefix) :] for n in names if SID_RE.fullmatch(n[len(prefix) :])}


def _which(program: str) -> bool:
    return any(
        os.access(os.path.join(d, program), os.X_OK)
        for d in (os.environ.get("PATH", "") + ":/sbin:/usr/sbin").split(":")
        if d
    )


def _mount_mode(target: Path) -> str | None:
    """'ro' or 'rw' for the mount at `target` in this namespace, None if none."""
    wanted, mode = str(target), None
    for entry in linux.mountinfo():  # the last mount at a target is the one on top
        if entry.target == wanted:
            mode = "ro" if "ro" in entry.options else "rw"
    return mode


def _remount_readonly(target: Path) -> None:
    """The read-only flag on this one mount (and binds made from it later)."""
    flags = linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY
    try:
        linux.mount("none", target, None, flags)
    except OSError as exc:
        raise BackendError(f"cannot make {target} read-only: {exc.strerror}") from None


def _fuse_mounts_under(directory: Path) -> list[tuple[str, str]]:
    """(target, dataset) of the zfs-fuse mounts below `directory`, deepest first."""
    prefix = str(directory) + "/"
    found = [
        (entry.target, entry.source)
        for entry in linux.mountinfo()
        if entry.fstype == "fuse.zfs" and entry.target.startswith(prefix)
    ]
    return sorted(found, key=lambda t: len(t[0]), reverse=True)


def _objects_by_mounting(dataset: str, where: Path) -> int:
    """Kernel OpenZFS: statvfs of a short private mount of the dataset."""
    where.mkdir(parents=True, exist_ok=True)
    linux.mount(dataset, where, "zfs", linux.MS_RDONLY)
    try:
        stats = os.statvfs(where)
        return stats.f_files - stats.f_ffree
    finally:
        linux.umount(where, linux.MNT_DETACH)


@hookimpl
def register_drivers(register) -> None:
    register(ZfsDriver)
