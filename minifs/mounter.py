"""Turn mount records into real mounts, in whatever mount namespace calls it.

Drivers only describe mounts (`minifs.model.Mount`); this module is the one
place that performs them, so the CLI, the launcher (inside its own mount
namespace) and the benchmark all mount the same way and can time it apart.

Overlay records name every lower directory with an absolute path. When the
option string fits in one page they go through mount(2); past that (about 75
layers with absolute paths) the new mount API passes each lower directory as
its own `lowerdir+` parameter, which reaches the kernel's 500-layer stack limit.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from minifs import linux
from minifs.errors import BackendError, InvalidArgument, TooManyLayers
from minifs.model import Mount

_FLAGS: dict[str, tuple[int, bool]] = {
    "ro": (linux.MS_RDONLY, True),
    "rw": (linux.MS_RDONLY, False),
    "nosuid": (linux.MS_NOSUID, True),
    "suid": (linux.MS_NOSUID, False),
    "nodev": (linux.MS_NODEV, True),
    "dev": (linux.MS_NODEV, False),
    "noexec": (linux.MS_NOEXEC, True),
    "exec": (linux.MS_NOEXEC, False),
    "noatime": (linux.MS_NOATIME, True),
    "relatime": (linux.MS_RELATIME, True),
    "bind": (linux.MS_BIND, True),
    "rbind": (linux.MS_BIND | linux.MS_REC, True),
}


def split_options(options: Sequence[str]) -> tuple[int, list[str]]:
    """Separate mount(2) flags from filesystem data options."""
    flags = 0
    data = []
    for option in options:
        known = _FLAGS.get(option)
        if known is None:
            data.append(option)
        elif known[1]:
            flags |= known[0]
        else:
            flags &= ~known[0]
    return flags, data


def mount_all(records: Sequence[Mount], target: str | Path) -> None:
    """Mount every record at `target` (or below it); undo all on any failure."""
    done: list[Path] = []
    try:
        for record in records:
            where = Path(target) / record.target if record.target else Path(target)
            mount_one(record, where)
            done.append(where)
    except BaseException:
        for where in reversed(done):
            linux.umount(where, linux.MNT_DETACH)
        raise


def mount_one(record: Mount, target: Path) -> None:
    flags, data = split_options(record.options)
    try:
        if flags & linux.MS_BIND:
            linux.mount(record.source, target, None, flags & (linux.MS_BIND | linux.MS_REC))
            if flags & ~(linux.MS_BIND | linux.MS_REC):
                linux.mount("none", target, None, flags | linux.MS_REMOUNT)
            return
        joined = ",".join(data)
        if len(joined) < linux.PAGE_SIZE or record.type != "overlay":
            linux.mount(record.source, target, record.type, flags, joined)
            return
    except OSError as exc:
        raise BackendError(f"cannot mount {record.type} at {target}: {exc.strerror}") from None
    _mount_overlay_by_fsconfig(record, data, flags, target)


def _mount_overlay_by_fsconfig(record: Mount, data: list[str], flags: int, target: Path) -> None:
    """Mount an overlay whose options exceed a page, one lower dir per fsconfig call."""
    lowers = [p for opt in data if opt.startswith("lowerdir=") for p in opt[9:].split(":")]
    try:
        fd = linux.fsopen(record.type)
    except OSError as exc:
        raise TooManyLayers(
            f"{len(lowers)} layers do not fit in one page of mount options and this kernel "
            f"has no fsopen ({exc.strerror}); flatten the image or use a kernel 6.8 or newer"
        ) from None
    try:
        linux.fsconfig_string(fd, "source", record.source)
        for option in data:
            key, sep, value = option.partition("=")
            if key == "lowerdir":
                for index, lower in enumerate(value.split(":")):
                    _lowerdir_plus(fd, lower, index, len(lowers))
            elif sep:
                linux.fsconfig_string(fd, key, value)
            else:
                linux.fsconfig_flag(fd, key)
        linux.fsconfig_create(fd)
        attrs = linux.MOUNT_ATTR_RDONLY if flags & linux.MS_RDONLY else 0
        mfd = linux.fsmount(fd, attrs)
        try:
            linux.move_mount(mfd, target)
        finally:
            os.close(mfd)
    except OSError as exc:
        raise BackendError(f"cannot mount overlay at {target}: {exc}") from None
    finally:
        os.close(fd)


def _lowerdir_plus(fd: int, lower: str, index: int, count: int) -> None:
    """Add one lower dir; EINVAL on the first means no `lowerdir+` support, on a
    later one that the stack passed the kernel's limit."""
    try:
        linux.fsconfig_string(fd, "lowerdir+", lower)
    except OSError as exc:
        if exc.errno == errno.EINVAL and index == 0:
            raise TooManyLayers(
                f"this kernel's overlayfs does not take 'lowerdir+' (needs 6.8+), so {count} "
                "layers do not fit in one page of mount options; flatten the image"
            ) from None
        if exc.errno == errno.EINVAL:
            raise TooManyLayers(
                f"overlayfs took {index} lower layers and refused the next, so {count} exceed "
                "the kernel's stack limit; flatten the image"
            ) from None
        raise


def unmount(target: str | Path) -> None:
    """Unmount `target`; a busy mount is an error the user can act on."""
    try:
        linux.umount(target)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise InvalidArgument(f"{target} is not a mount point; nothing to unmount") from None
        if exc.errno == errno.EBUSY:
            raise BackendError(
                f"{target} is busy; stop the processes using it, then run umount again"
            ) from None
        raise BackendError(f"cannot unmount {target}: {exc.strerror}") from None


def unmount_all(records: Sequence[Mount], target: str | Path) -> None:
    """Undo `mount_all(records, target)`: the last record first."""
    for record in reversed(records):
        unmount(Path(target) / record.target)


@contextlib.contextmanager
def mounted(records: Sequence[Mount], target: str | Path) -> Iterator[Path]:
    """`records` mounted on the existing directory `target` for one block.

    When the block fails (Ctrl-C included) a file it left open may keep the
    mount busy; it is then detached lazily so the original error, not a
    "busy", is what the user sees, and the mount goes once the file closes.
    The one temporary-mount helper of minifs, the bench and the tests.
    """
    where = Path(target)
    mount_all(records, where)
    try:
        yield where
    except BaseException:
        for record in reversed(records):
            with contextlib.suppress(OSError):
                linux.umount(where / record.target, linux.MNT_DETACH)
        raise
    unmount_all(records, where)
