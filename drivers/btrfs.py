"""btrfs: a subvolume per snapshot, copy-on-write at the extent level.

A clone is a writable snapshot of its parent layer's subvolume (an empty
subvolume without one); `commit` makes the clone's own subvolume read-only,
so a layer keeps its id and path and repeating the commit after a crash is
harmless; a view is a read-only snapshot. Snapshots are made and deleted with
libbtrfsutil (the `btrfsutil` module), and mounted as bind mounts of their
subvolume directories, so the launcher can mount them in its own namespace.

Where the subvolumes live (`btrfs.path`, settled at the first start):

- `image`: a sparse loop-backed btrfs image in the home (`btrfs.size`),
  attached and mounted by `start()` and taken down by `minifs down`;
- a directory on a btrfs filesystem mounted by someone else, used as it is
  and never unmounted; `auto` picks the home itself when it is on btrfs (the
  benchmark's dedicated disk), else `image`.

A clone's size (`minifs clone --size`) is capped by a qgroup limit on its
subvolume's referenced bytes, as Docker's btrfs driver does: quotas are
switched on for the filesystem the first time a size is asked for (they cost
a little on every snapshot and delete, so not before).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from minifs import linux
from minifs.driver import AUTO, Driver
from minifs.errors import (
    BackendError,
    InUse,
    InvalidArgument,
    MinifsError,
    MissingPrerequisite,
    NotSupported,
)
from minifs.hookspecs import hookimpl
from minifs.layers.safefs import remove_tree
from minifs.loopdisk import fitting_size, image_size, make_image, parse_size
from minifs.model import DriverKind, Kind, Mount, Usage
from minifs.resources import describe, run

try:
    import btrfsutil
except ImportError:  # probe() says how to get it
    btrfsutil = None

IMAGE = "image"
DEFAULT_IMAGE_SIZE = "10G"
MIN_IMAGE_SIZE = 114294784
"""mkfs.btrfs's own minimum for one device (109 MiB): below it mkfs refuses."""
SUPER_OFFSET, SUPER_MAGIC = 0x10040, b"_BHRfS_M"
"""Where the primary superblock keeps its magic, to tell a btrfs image from
anything else before it is attached and mounted."""
OWNER_FILE = ".minifs-home"
"""In a user's btrfs.path: the home whose snapshots live there. Two stores in
one directory would each take the other's subvolumes for orphans in gc."""
SID_RE = re.compile(r"[0-9a-f]{32}")
BUSY_WAIT = 10.0
"""Seconds `stop` waits for the image's loop device to be let go (see stop)."""


_IOC_QUOTA_CTL = 0xC0109428
"""BTRFS_IOC_QUOTA_CTL: _IOWR(0x94, 40, struct btrfs_ioctl_quota_ctl_args {u64 cmd, status})."""
_QUOTA_CTL_ENABLE = 1
_IOC_QUOTA_RESCAN_WAIT = 0x942E
"""BTRFS_IOC_QUOTA_RESCAN_WAIT: _IO(0x94, 46); returns once no rescan runs."""
_IOC_QGROUP_LIMIT = 0x8030942B
"""BTRFS_IOC_QGROUP_LIMIT: _IOR(0x94, 43, struct btrfs_ioctl_qgroup_limit_args):
u64 qgroupid (0: the subvolume of the descriptor), then struct btrfs_qgroup_limit
{u64 flags, max_rfer, max_excl, rsv_rfer, rsv_excl}."""
_LIMIT_MAX_RFER = 1


def _limit_referenced(subvolume: Path, size: int) -> None:
    """Cap what `subvolume` may reference at `size` bytes (writes past it: EDQUOT)."""
    fd = os.open(subvolume, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        args = struct.pack("=QQQQQQ", 0, _LIMIT_MAX_RFER, size, 0, 0, 0)
        fcntl.ioctl(fd, _IOC_QGROUP_LIMIT, args)
    except OSError as exc:
        raise BackendError(f"cannot limit {subvolume} to {size} bytes: {exc.strerror}") from None
    finally:
        os.close(fd)


def _image_size(text: str) -> int:
    return image_size(text, "btrfs.size", MIN_IMAGE_SIZE, "mkfs.btrfs's minimum")


@contextlib.contextmanager
def _calls(what: str) -> Iterator[None]:
    """libbtrfsutil's errors (OSErrors with its own words) as one line."""
    try:
        yield
    except OSError as exc:
        raise BackendError(f"{what}: {exc.strerror or exc}") from None


def _on_btrfs(path: Path) -> bool:
    """Whether `path` is on a btrfs filesystem: only there does the lookup of
    the subvolume it belongs to succeed (elsewhere: ENOTTY)."""
    try:
        btrfsutil.subvolume_id(str(path))
    except OSError:
        return False
    return True


def _is_btrfs_image(image: Path) -> bool:
    with open(image, "rb") as f:
        f.seek(SUPER_OFFSET)
        return f.read(len(SUPER_MAGIC)) == SUPER_MAGIC


# -- what a snapshot holds itself: btrfs's own tree, searched by generation -------

_IOC_TREE_SEARCH = 0xD0009411
"""BTRFS_IOC_TREE_SEARCH: _IOWR(0x94, 17, struct btrfs_ioctl_search_args), 4 KiB."""
_SEARCH_KEY = struct.Struct("=7Q4I4Q")
_ITEM_HEADER = struct.Struct("=3Q2I")
_U64_MAX = (1 << 64) - 1
_FIRST_INODE, _LAST_INODE = 256, _U64_MAX - 256
_INODE_ITEM, _EXTENT_DATA = 1, 108
_INLINE, _EXTENT_HEAD = 0, 21
"""A file extent item: generation, ram_bytes, compression, encryption,
other_encoding, type (21 bytes), then inline data or disk_bytenr, disk_num_bytes."""


def _tree_items(fd: int, tree: int, min_transid: int) -> Iterator[tuple[int, bytes]]:
    """(type, item) of the inode and file extent items in subvolume tree `tree`
    that sit in tree blocks written at `min_transid` or later, as `btrfs
    subvolume find-new` finds them: blocks a snapshot still shares with its
    parent are older and skipped whole."""
    objectid, kind, offset = _FIRST_INODE, 0, 0
    while True:
        args = bytearray(4096)
        _SEARCH_KEY.pack_into(
            args, 0, tree, objectid, _LAST_INODE, offset, _U64_MAX, min_transid, _U64_MAX,
            kind, 255, 4096, 0, 0, 0, 0, 0,
        )  # fmt: skip
        fcntl.ioctl(fd, _IOC_TREE_SEARCH, args)
        found = _SEARCH_KEY.unpack_from(args)[9]
        if not found:
            return
        at = _SEARCH_KEY.size
        for _ in range(found):
            _, objectid, offset, kind, length = _ITEM_HEADER.unpack_from(args, at)
            at += _ITEM_HEADER.size
            if kind in (_INODE_ITEM, _EXTENT_DATA):
                yield kind, bytes(args[at : at + length])
            at += length
        if offset < _U64_MAX:
            offset += 1
        elif kind < 255:
            kind, offset = kind + 1, 0
        elif objectid < _LAST_INODE:
            objectid, kind, offset = objectid + 1, 0, 0
        else:
            return


def _own_usage(fd: int, tree: int, since: int) -> Usage:
    """Inodes created or changed after transaction `since`, and the bytes of
    file data written after it (each extent once; inline data by its size)."""
    inodes, extents, inline = 0, set(), 0
    for kind, item in _tree_items(fd, tree, since + 1):
        if kind == _INODE_ITEM:
            inodes += struct.unpack_from("=Q", item, 8)[0] > since
            continue
        generation, extent_type = struct.unpack_from("=Q", item)[0], item[20]
        if generation <= since:
            continue
        if extent_type == _INLINE:
            inline += len(item) - _EXTENT_HEAD
        else:
            bytenr, disk_bytes = struct.unpack_from("=2Q", item, _EXTENT_HEAD)
            if bytenr:  # 0 is a hole
                extents.add((bytenr, disk_bytes))
    return Usage(size=inline + sum(size for _, size in extents), inodes=inodes)


class BtrfsDriver(Driver):
    name = "btrfs"
    kind = DriverKind.COW
    backend = "btrfs subvolumes and snapshots"
    disk_filesystem = "btrfs"
    size_limit = "btrfs qgroup limit"
    min_disk_size = MIN_IMAGE_SIZE
    options_help = {
        "path": "auto (default), image (a loop-backed btrfs image in the home), or a "
        "directory on a mounted btrfs to keep subvolumes in, used as it is",
        "size": f"size of the loop-backed image (default auto: {DEFAULT_IMAGE_SIZE}, or 90% of "
        "the free space where that is less; at least 109M)",
    }
    option_defaults = {"path": AUTO, "size": AUTO}

    def __init__(self, home: Path, options: Mapping[str, str] | None = None) -> None:
        super().__init__(home, options)
        # A directory given now is checked now, before the state dir is made.
        path = self.options.get("path", AUTO)
        if path not in (AUTO, IMAGE):
            self._check_btrfs_dir(Path(path))

    @classmethod
    def probe(cls) -> None:
        if os.geteuid() != 0:
            raise NotSupported("btrfs makes subvolumes and mounts, which needs root; run as root")
        if "btrfs" not in linux.filesystems():
            raise NotSupported(
                "the kernel has no btrfs (not in /proc/filesystems); load it with 'modprobe btrfs'"
            )
        if btrfsutil is None:
            raise MissingPrerequisite(
                "the Python module btrfsutil is not installed (it builds against "
                "libbtrfsutil-dev); run 'make setup'"
            )
        if shutil.which("mkfs.btrfs") is None:
            raise MissingPrerequisite("mkfs.btrfs (btrfs-progs) is not installed; run 'make setup'")

    @classmethod
    def version(cls) -> str:
        progs = run(["mkfs.btrfs", "--version"], "mkfs.btrfs --version").split()[-1]
        return f"kernel {os.uname().release}, btrfs-progs {progs}"

    # -- options: where the subvolumes live ----------------------------------

    def check_options(self, options: Mapping[str, str], settled: bool) -> None:
        path = options.get("path", AUTO)
        if not (path == IMAGE or (path == AUTO and not settled) or os.path.isabs(path)):
            raise InvalidArgument(
                f"btrfs.path={path} is neither auto, image nor an absolute directory; "
                "give the full path of a directory on a mounted btrfs"
            )
        if options.get("size", AUTO) != AUTO:  # settled to a size when an image is made
            _image_size(options["size"])

    def settle_options(self, options: dict[str, str]) -> dict[str, str]:
        if options["path"] == AUTO:
            options["path"] = str(self.home) if _on_btrfs(self.home) else IMAGE
        if options["path"] == IMAGE and options["size"] == AUTO:
            wanted = parse_size(DEFAULT_IMAGE_SIZE)
            size = fitting_size(self.home, wanted, MIN_IMAGE_SIZE, "a btrfs image")
            options["size"] = f"{size >> 20}M"
        return options

    @staticmethod
    def _check_btrfs_dir(where: Path) -> None:
        if not where.is_dir():
            raise InvalidArgument(
                f"btrfs.path={where} is not an existing directory; create it on a "
                "mounted btrfs, or leave btrfs.path out for a loop-backed image"
            )
        if not _on_btrfs(where):
            raise InvalidArgument(
                f"btrfs.path={where} is not on a btrfs filesystem; give a directory on "
                "a mounted btrfs, or leave btrfs.path out for a loop-backed image"
            )

    @property
    def data(self) -> Path:
        """Where the subvolumes live, once started."""
        path = self.options["path"]
        return self.home / "data" if path == IMAGE else Path(path)

    # -- lifecycle -------------------------------------------------------------

    def bring_up(self) -> None:
        if self.options["path"] == IMAGE:
            self._image_up()
            return
        self._check_btrfs_dir(self.data)  # unmounted since the last start?
        if self.data != self.home:
            self._claim(self.data)

    def _image_up(self) -> None:
        image, size = self.home / "backing.img", self.options["size"]
        if not image.exists():
            try:
                make_image(image, _image_size(size), "btrfs")
            except (MinifsError, OSError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else exc
                raise BackendError(
                    f"cannot make the {size} btrfs image {image} ({reason}); free space "
                    "there or pick a smaller btrfs.size"
                ) from None
        elif not _is_btrfs_image(image):
            raise BackendError(
                f"{image} is not a btrfs image; restore it, or move {self.home} aside "
                "to start an empty btrfs store"
            )
        device = self.resources.loop("loop", image)
        try:
            self.resources.mount("mount", device, self.data, "btrfs")
        except MinifsError:
            self.resources.down()  # the loop device, attached for nothing
            raise

    def stop(self) -> list[str]:
        """Unmount the image and detach its loop device, waiting a little while
        the device is busy: a process that makes a mount namespace anywhere on
        the machine (a container starting) holds a copy of the image's mount
        until it pivots away, so the device is let go a moment after the
        unmount, and `minifs down` would fail on that race."""
        stopped = [describe(r) for r in reversed(self.resources.load()) if self.resources.alive(r)]
        deadline = time.monotonic() + BUSY_WAIT
        while True:
            try:
                super().stop()
                return stopped
            except InUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _claim(self, where: Path) -> None:
        marker = where / OWNER_FILE
        try:
            owner = marker.read_text()
        except FileNotFoundError:
            marker.write_text(str(self.home))
            return
        if owner != str(self.home):
            raise InvalidArgument(
                f"btrfs.path={where} already holds the snapshots of the minifs store in "
                f"{owner}; give each store a directory of its own"
            )

    # -- snapshots -------------------------------------------------------------

    def path(self, sid: str) -> Path:
        return self.data / sid

    def prepare(self, sid: str, parents: Sequence[str], size: int | None = None) -> None:
        self.remove(sid)  # a crashed earlier attempt may have left it
        target = str(self.path(sid))
        if size is not None:
            self._quotas_on()  # before the snapshot, so its qgroup counts from the start
        with _calls(f"cannot make subvolume {target}"):
            if parents:
                btrfsutil.create_snapshot(str(self.path(parents[0])), target)
            else:
                btrfsutil.create_subvolume(target)
        if size is not None:
            _limit_referenced(self.path(sid), size)

    def _quotas_on(self) -> None:
        """Switch quotas on for the filesystem (once) and wait for the rescan the
        kernel starts, so the parent's qgroup holds true counts."""
        fd = os.open(self.data, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                fcntl.ioctl(fd, _IOC_QUOTA_CTL, struct.pack("=QQ", _QUOTA_CTL_ENABLE, 0))
                fcntl.ioctl(fd, _IOC_QUOTA_RESCAN_WAIT)
            except OSError as exc:
                raise BackendError(
                    f"cannot switch on btrfs quotas in {self.data} ({exc.strerror}), which "
                    "--size needs; drop --size"
                ) from None
        finally:
            os.close(fd)

    def view(self, sid: str, parents: Sequence[str]) -> None:
        self.remove(sid)
        target = str(self.path(sid))
        with _calls(f"cannot make read-only subvolume {target}"):
            if parents:
                btrfsutil.create_snapshot(str(self.path(parents[0])), target, read_only=True)
            else:
                btrfsutil.create_subvolume(target)
                btrfsutil.set_subvolume_read_only(target, True)

    def commit(self, sid: str, parents: Sequence[str]) -> None:
        """The clone's own subvolume turns read-only: same id, same path, and
        a flag that is simply set again when recovery repeats the commit."""
        target = str(self.path(sid))
        with _calls(f"cannot make {target} read-only"):
            btrfsutil.set_subvolume_read_only(target, True)

    def remove(self, sid: str) -> None:
        target = self.path(sid)
        if not os.path.lexists(target):
            return
        if not btrfsutil.is_subvolume(str(target)):
            remove_tree(target)  # not made by us, but in our place: gc's to remove
            return
        with _calls(f"cannot delete subvolume {target}"):
            try:
                btrfsutil.delete_subvolume(str(target), recursive=True)
            except OSError:
                # Subvolumes a container made inside a clone that became a
                # layer: unlinking them needs the layer writable again.
                btrfsutil.set_subvolume_read_only(str(target), False)
                btrfsutil.delete_subvolume(str(target), recursive=True)

    def mounts(self, sid: str, kind: Kind, parents: Sequence[str]) -> list[Mount]:
        mode = "rw" if kind is Kind.CLONE else "ro"
        return [Mount("bind", str(self.path(sid)), ("rbind", mode))]

    def usage(self, sid: str) -> Usage:
        """What `sid` holds itself, read from btrfs's own metadata: the inodes it
        created or changed since it was snapshot from its parent, and the bytes
        of file data it wrote since (extents shared with the parent are not
        counted, nor is metadata; a subvolume made empty counts everything).

        Not qgroup "exclusive" bytes: those need quotas on (a cost on every
        snapshot and delete), and a layer's fall to nothing once a clone
        shares its extents, while the layer still holds them over its parent.
        """
        target = str(self.path(sid))
        with _calls(f"cannot read the usage of {target}"):
            btrfsutil.sync(target)  # delayed allocation: data gets its extents now
            info = btrfsutil.subvolume_info(target)
            since = info.otransid if any(info.parent_uuid) else 0
            fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                return _own_usage(fd, info.id, since)
            finally:
                os.close(fd)

    def ids(self) -> set[str]:
        try:
            names = os.listdir(self.data)
        except FileNotFoundError:
            return set()
        return {n for n in names if SID_RE.fullmatch(n)}

    def damage(self, sid: str) -> str | None:
        target = self.path(sid)
        if not target.is_dir():
            return f"its subvolume {target} is missing"
        if not btrfsutil.is_subvolume(str(target)):
            return f"{target} is a plain directory, not a btrfs subvolume"
        return None


@hookimpl
def register_drivers(register) -> None:
    register(BtrfsDriver)
