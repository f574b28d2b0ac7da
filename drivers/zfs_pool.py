"""The pool a zfs store keeps its datasets in: one minifs makes in its home, or
one the user names.

Made by minifs (no `zfs.pool`): a pool on a sparse file `<home>/pool/vdev`
(or on the block device of `zfs.device`, the benchmark's disk), named after a
hash of the home so that many homes (tests run hundreds) never collide. It is
created without a cache file, so no daemon or boot imports it behind minifs's
back; every start imports it (recorded, exported by `minifs down`), and
nothing but removing the home destroys it.

Named by the user (`zfs.pool=tank/minifs`): a dataset that must exist, under
which minifs makes its datasets; it is never created, exported or destroyed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from pathlib import Path

from minifs.errors import BackendError, InvalidArgument, StateDirError
from minifs.loopdisk import fitting_size, image_size, make_image, parse_size
from minifs.resources import Resources
from minifs_drivers.zfs_backend import ZfsBackend, ZfsError, ZfsNoSpace, ZfsNotFound

DEFAULT_SIZE = "10G"
MIN_VDEV = 64 << 20
"""ZFS refuses a vdev smaller than 64 MiB (SPA_MINDEVSIZE)."""

POOL_PROPS = {"cachefile": "none", "failmode": "continue"}
"""No cache file: only minifs imports the pool. failmode=continue: a pool
whose vdev fails returns EIO instead of blocking every command forever."""

ROOT_PROPS = {"mountpoint": "none", "atime": "off"}
"""The pool's own dataset is never mounted; minifs's datasets get their own
mountpoints. atime off: reads in a clone must not write."""

KEY = "zpool"

RESERVE = "reserve"
"""`<pool>/reserve`: a dataset holding a `reservation` of free space and nothing
else. zfs-fuse (pool version 23) keeps no slop space: once clones fill a
pool, even `zfs snapshot` fails with "out of space", a snapshot that must
finish (a commit being rolled forward) can never run, and the store is stuck
before `minifs rm` could free anything. The driver lets the reservation go to
finish such an operation, and takes it back when space allows."""


def reserve_size(pool_size: int) -> int:
    """1/32 of the pool (ZFS's own slop share), between 1 MiB and 64 MiB."""
    return max(1 << 20, min(pool_size // 32, 64 << 20))


def pool_name(home: Path) -> str:
    """A pool name unique to this home (pool names are machine-wide)."""
    digest = hashlib.sha1(str(home.resolve()).encode()).hexdigest()[:12]
    return f"minifs-{digest}"


def vdev_size(text: str) -> int:
    return image_size(text, "zfs.size", MIN_VDEV, "ZFS's smallest vdev")


def auto_size(where: Path) -> str:
    """The default vdev size: 10G, or what fits on the disk of `where` (see
    minifs.loopdisk.FIT: zfs-fuse meets a vdev outgrowing its disk with writers
    blocked for good, seen here on a 20 MiB tmpfs)."""
    size = fitting_size(where, parse_size(DEFAULT_SIZE), MIN_VDEV, "a zpool")
    return f"{size >> 20}M"


def check_user_dataset(zfs: ZfsBackend, dataset: str) -> None:
    """The dataset named by zfs.pool must exist and be a filesystem."""
    try:
        kind = zfs.get(dataset, ["type"]).get("type")
    except ZfsNotFound:
        pool = dataset.split("/")[0]
        raise InvalidArgument(
            f"zfs.pool={dataset}: no such pool or dataset; import pool {pool} "
            f"('zpool import {pool}') and create the dataset ('zfs create -p {dataset}'), "
            "or leave zfs.pool out for a pool in the state dir"
        ) from None
    if kind != "filesystem":
        raise InvalidArgument(
            f"zfs.pool={dataset} is a {kind}, not a filesystem; name a pool or a filesystem"
        )


class EmbeddedPool:
    """The pool minifs makes in its home and imports at every start."""

    def __init__(self, zfs: ZfsBackend, resources: Resources, home: Path, name: str) -> None:
        self.zfs = zfs
        self.resources = resources
        self.name = name
        self.dir = home / "pool"
        self.vdev = self.dir / "vdev"
        self.made = home / "pool.made"
        """Written once `zpool create` succeeded: a vdev without it is what a
        crash during the first start left, not a damaged pool."""

    def up(self, size: str, device: str | None, imported: dict[str, str]) -> None:
        """Import the pool, or make it on the first start (`imported`: the
        pools imported now, name -> guid)."""
        if self.name in imported:
            self._adopt(imported[self.name])
            return
        self.resources.forget(KEY)  # exported, or gone with a daemon that died
        if self.made.exists():
            self._import()
        else:
            self._create(size, device)
        guid = self.zfs.pools().get(self.name)
        if guid is None:
            raise BackendError(f"zpool {self.name} vanished right after it was imported")
        self.resources.zpool(KEY, self.name, guid, str(self.vdev))

    def _adopt(self, guid: str) -> None:
        """The pool is imported already (by an earlier command of this home);
        refuse a foreign one that only has the same name."""
        found = self.resources.find(KEY)
        if found and found.get("guid") == guid:
            return
        mine = {os.path.realpath(self.vdev), str(self.vdev)}
        vdevs = self.zfs.pool_vdevs(self.name)
        if not mine & ({os.path.realpath(v) for v in vdevs} | set(vdevs)):
            raise BackendError(
                f"a zpool named {self.name} is imported from {', '.join(vdevs) or '?'}, not "
                f"from {self.vdev}; export it ('zpool export {self.name}') or set zfs.name"
            )
        self.resources.zpool(KEY, self.name, guid, str(self.vdev))

    def _import(self) -> None:
        if not os.path.exists(self.vdev):
            raise StateDirError(
                f"the vdev of zpool {self.name} ({self.vdev}) is missing; restore it, or move "
                f"{self.made.parent} aside to start an empty zfs store"
            )
        try:
            self.zfs.pool_import(self.name, str(self.dir))
        except ZfsNotFound:
            raise StateDirError(
                f"{self.vdev} holds no zpool {self.name} (not a zpool, or damaged); restore "
                f"it, or move {self.made.parent} aside to start an empty zfs store"
            ) from None

    def _create(self, size: str, device: str | None) -> None:
        """Make the vdev and the pool; on any failure remove what was made."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.vdev.unlink(missing_ok=True)  # left by a crash during an earlier first start
        try:
            if device:
                if not os.path.exists(device):
                    raise InvalidArgument(
                        f"zfs.device={device} does not exist; give a block device"
                    )
                os.symlink(device, self.vdev)
            else:
                wanted = vdev_size(size)
                fits = fitting_size(self.dir, wanted, MIN_VDEV, f"zpool {self.name}")
                if wanted > fits:
                    raise BackendError(
                        f"cannot make zpool {self.name}: zfs.size={size} does not fit in the "
                        f"{fits >> 20}M to spare in {self.dir} (its sparse file would outgrow the "
                        "disk); pick a smaller zfs.size"
                    )
                make_image(self.vdev, wanted, None)
            self.zfs.pool_create(self.name, str(self.vdev), POOL_PROPS, ROOT_PROPS)
            pool_size = int(self.zfs.get(self.name, ["available"])["available"])
            held = str(reserve_size(pool_size))
            self.zfs.create(
                f"{self.name}/{RESERVE}",
                {"canmount": "off", "reservation": held, "minifs:reservation": held},
            )
        except BackendError as exc:
            self._undo_create()
            if not isinstance(exc, ZfsError):
                raise
            raise self._failed(size, device, exc) from None
        except OSError as exc:
            self._undo_create()
            raise self._failed(size, device, exc) from None
        except BaseException:
            self._undo_create()
            raise
        with contextlib.suppress(FileExistsError):
            self.made.write_text(self.name + "\n")

    def _failed(self, size: str, device: str | None, exc: Exception) -> BackendError:
        where = device or f"a {size} file in {self.dir}"
        if isinstance(exc, ZfsNoSpace) or getattr(exc, "errno", None) == errno.ENOSPC:
            reason = "no space left"
        else:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        return BackendError(
            f"cannot make zpool {self.name} on {where} ({reason}); free space there, "
            "pick a smaller zfs.size, or name an existing pool with zfs.pool"
        )

    def _undo_create(self) -> None:
        """Nothing half-made: destroy the pool if it was created, drop the vdev."""
        with contextlib.suppress(ZfsError):
            if self.name in self.zfs.pools():
                self.zfs.pool_destroy(self.name)
        self.vdev.unlink(missing_ok=True)


class Reserve:
    """Lets `<pool>/reserve`'s reservation go for one operation that found the
    pool full, and takes it back afterwards when there is room again.

    `marker` (a file in the home) says the reservation is let go, so the
    common case, a reserve in place, costs no zfs command to check."""

    def __init__(self, zfs: ZfsBackend, pool: str, marker: Path) -> None:
        self.zfs = zfs
        self.dataset = f"{pool}/{RESERVE}"
        self.marker = marker

    def release(self) -> bool:
        """Free the reserved space; False when there is none to free."""
        try:
            if self.zfs.get(self.dataset, ["reservation"]).get("reservation") in ("0", "none"):
                return False
            self.marker.touch()
            self.zfs.set(self.dataset, {"reservation": "none"})
        except ZfsNotFound:
            return False
        return True

    def restore(self) -> None:
        """Hold the reservation again if it was let go and the pool has room
        for it now (best effort: a later operation tries again)."""
        if not self.marker.exists():
            return
        with contextlib.suppress(ZfsError):
            props = self.zfs.get(self.dataset, ["reservation", "minifs:reservation"])
            wanted = props.get("minifs:reservation", "-")
            if wanted.isdigit() and props.get("reservation") != wanted:
                self.zfs.set(self.dataset, {"reservation": wanted})
            self.marker.unlink(missing_ok=True)
