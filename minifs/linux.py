"""Thin wrappers over the Linux syscalls minifs needs, through ctypes.

Calling mount(2) directly instead of running mount(8) keeps a clone+mount close
to the bare kernel cost, which is what the benchmark compares against. The new
mount API (fsopen/fsconfig/fsmount/move_mount) is here because it takes overlay
lower directories one at a time (`lowerdir+`, kernel 6.8+), which is how a clone
over hundreds of layers fits when a single page of mount options cannot.
"""

from __future__ import annotations

import functools
import os
import re
from collections import namedtuple
from pathlib import Path

TYPE_CHECKING = False  # typing costs ~2 ms of every start; annotations only need it here
if TYPE_CHECKING:
    import ctypes
    from types import ModuleType

# mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21

MNT_DETACH = 0x2

# New mount API; these syscall numbers are shared by every architecture but alpha.
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
AT_FDCWD = -100

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _c() -> tuple[ModuleType, ctypes.CDLL]:
    """ctypes and the C library, loaded by the first call that needs them:
    importing ctypes costs ~2.5 ms, and most commands (`ls`, `inspect`, a
    `minifs run` monitor, which leaves every syscall to the processes it
    forks) make none. The interpreter's own symbols include libc;
    find_library would run ldconfig."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.lgetxattr.restype = ctypes.c_ssize_t
    libc.lgetxattr.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    libc.fgetxattr.restype = ctypes.c_ssize_t
    libc.fgetxattr.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    return ctypes, libc


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = _c()[0].get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _b(value: str | os.PathLike[str] | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str, target: str | Path, fstype: str | None, flags: int, data: str = "") -> None:
    """mount(2): raises OSError carrying errno on failure."""
    c, libc = _c()
    ret = libc.mount(_b(source), _b(target), _b(fstype), c.c_ulong(flags), _b(data or None))
    _check(ret, f"mount {fstype or 'bind'} on {target}")


def umount(target: str | Path, flags: int = 0) -> None:
    libc = _c()[1]
    _check(libc.umount2(_b(target), flags), f"umount {target}")


def syncfs(path: str | Path) -> None:
    """syncfs(2) on the filesystem holding `path`: flushes that one filesystem
    (the bench disk) without waiting for every other disk as sync(2) would."""
    libc = _c()[1]
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(libc.syncfs(fd), f"syncfs {path}")
    finally:
        os.close(fd)


def fsopen(fstype: str) -> int:
    libc = _c()[1]
    return _check(libc.syscall(_SYS_FSOPEN, _b(fstype), FSOPEN_CLOEXEC), f"fsopen {fstype}")


def fsconfig_string(fd: int, key: str, value: str) -> None:
    libc = _c()[1]
    ret = libc.syscall(_SYS_FSCONFIG, fd, FSCONFIG_SET_STRING, _b(key), _b(value), 0)
    _check(ret, f"fsconfig {key}={value}")


def fsconfig_flag(fd: int, key: str) -> None:
    libc = _c()[1]
    ret = libc.syscall(_SYS_FSCONFIG, fd, FSCONFIG_SET_FLAG, _b(key), None, 0)
    _check(ret, f"fsconfig {key}")


def fsconfig_create(fd: int) -> None:
    libc = _c()[1]
    _check(libc.syscall(_SYS_FSCONFIG, fd, FSCONFIG_CMD_CREATE, None, None, 0), "fsconfig create")


def fsmount(fd: int, attr_flags: int = 0) -> int:
    libc = _c()[1]
    return _check(libc.syscall(_SYS_FSMOUNT, fd, FSMOUNT_CLOEXEC, attr_flags), "fsmount")


def move_mount(mount_fd: int, target: str | Path) -> None:
    libc = _c()[1]
    ret = libc.syscall(
        _SYS_MOVE_MOUNT, mount_fd, b"", AT_FDCWD, _b(target), MOVE_MOUNT_F_EMPTY_PATH
    )
    _check(ret, f"move_mount to {target}")


# -- extended attributes --------------------------------------------------------------


XattrTarget = bytes | str | os.PathLike[str] | int
"""A descriptor, or a path whose last component is not followed (lgetxattr)."""


def _getxattr(target: XattrTarget, key: str, buf: ctypes.Array | None, size: int) -> int:
    libc = _c()[1]
    if isinstance(target, int):
        ret = libc.fgetxattr(target, os.fsencode(key), buf, size)
    else:
        ret = libc.lgetxattr(os.fsencode(target), os.fsencode(key), buf, size)
    if ret < 0:  # the message is made only then: this runs for every xattr of a layer
        where = f"descriptor {target}" if isinstance(target, int) else os.fsdecode(target)
        _check(ret, f"getxattr {key} of {where}")
    return ret


def xattr_size(target: XattrTarget, key: str) -> int:
    """getxattr(2) with size 0: how many bytes the value of `key` has now
    (os.getxattr cannot ask this; it guesses a buffer size)."""
    return _getxattr(target, key, None, 0)


def getxattr(target: XattrTarget, key: str, size: int) -> bytes:
    """One getxattr(2) into a buffer of `size` bytes: the value, or OSError
    ERANGE if it is longer (on a filesystem that says so: see
    safefs.getxattr)."""
    c = _c()[0]
    buf = c.create_string_buffer(size)
    got = _getxattr(target, key, buf, size)  # before buf.raw, which copies
    return buf.raw[:got]


def filesystems() -> set[str]:
    """The filesystem types the running kernel knows (/proc/filesystems)."""
    with open("/proc/filesystems", encoding="utf-8") as f:
        return {line.split()[-1] for line in f if line.strip()}


def is_mountpoint(path: str | Path) -> bool:
    """True when `path` is the target of a mount in this mount namespace."""
    wanted = os.path.realpath(path)
    return any(target == wanted for target in mount_targets())


def mount_targets() -> list[str]:
    """Mount targets of this mount namespace, from /proc/self/mountinfo."""
    return [entry.target for entry in mountinfo()]


class MountEntry(namedtuple("MountEntry", "target options fstype source super_options")):
    """One line of /proc/self/mountinfo, the fields minifs reads."""

    __slots__ = ()
    target: str
    options: tuple[str, ...]
    """Per-mount options (ro/rw, nosuid, ...)."""
    fstype: str
    source: str
    super_options: tuple[str, ...]
    """The filesystem's own options (lowerdir=..., errors=...)."""


def mountinfo() -> list[MountEntry]:
    """The mounts of this mount namespace in mount order (the last at a
    target is the one on top). The one reader of /proc/self/mountinfo."""
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            fields, after = head.split(" "), tail.split(" ")
            entries.append(
                MountEntry(
                    _unescape(fields[4]),
                    tuple(fields[5].split(",")),
                    after[0],
                    _unescape(after[1]),
                    tuple(after[2].rstrip("\n").split(",")),
                )
            )
    return entries


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    if "\\" not in field:
        return field
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


# -- namespaces and process control, for the container launcher -----------------

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

PR_SET_PDEATHSIG = 1

# pivot_root has no glibc wrapper; its number differs between the two ABIs we meet.
_SYS_PIVOT_ROOT = {"aarch64": 41}.get(os.uname().machine, 155)


def unshare(flags: int) -> None:
    """unshare(2): Python 3.11's os module has no unshare yet."""
    c, libc = _c()
    _check(libc.unshare(c.c_int(flags)), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2) into the namespace open at `fd` (from /proc/PID/ns/...)."""
    c, libc = _c()
    _check(libc.setns(fd, c.c_int(nstype)), "setns")


def pivot_root(new_root: str | Path, put_old: str | Path) -> None:
    """pivot_root(2); glibc has no wrapper, so through syscall(2)."""
    libc = _c()[1]
    _check(libc.syscall(_SYS_PIVOT_ROOT, _b(new_root), _b(put_old)), f"pivot_root {new_root}")


def sethostname(name: str) -> None:
    data = name.encode()
    c, libc = _c()
    _check(libc.sethostname(data, c.c_size_t(len(data))), f"sethostname {name}")


def set_parent_death_signal(sig: int) -> None:
    """prctl(PR_SET_PDEATHSIG): the kernel sends `sig` when our parent dies."""
    prctl(PR_SET_PDEATHSIG, sig, "PDEATHSIG")


# -- capabilities and seccomp, set by PID 1 just before exec ----------------------

_CAP_VERSION_3 = 0x20080522
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def prctl(option: int, arg: int, what: str) -> None:
    """prctl(2) with one argument; `what` names the option in the error."""
    c, libc = _c()
    _check(libc.prctl(option, c.c_ulong(arg), 0, 0, 0), f"prctl {what}")


def capget() -> tuple[int, int]:
    """This thread's (permitted, inheritable) capability sets (capget(2), the
    64-bit version 3 layout: two 32-bit words of effective, permitted and
    inheritable each)."""
    c, libc = _c()
    header = (c.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (c.c_uint32 * 6)()
    _check(libc.capget(header, data), "capget")
    return data[1] | (data[4] << 32), data[2] | (data[5] << 32)


def capset(effective: int, permitted: int, inheritable: int) -> None:
    c, libc = _c()
    header = (c.c_uint32 * 2)(_CAP_VERSION_3, 0)
    data = (c.c_uint32 * 6)()
    for word in range(2):
        shift = 32 * word
        data[3 * word] = (effective >> shift) & 0xFFFFFFFF
        data[3 * word + 1] = (permitted >> shift) & 0xFFFFFFFF
        data[3 * word + 2] = (inheritable >> shift) & 0xFFFFFFFF
    _check(libc.capset(header, data), "capset")


def seccomp_set_filter(program: bytes) -> None:
    """prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER) with `program`, an array
    of struct sock_filter (8 bytes each)."""
    c, libc = _c()

    class SockFprog(c.Structure):  # type: ignore[name-defined]
        _fields_ = (("len", c.c_ushort), ("filter", c.c_void_p))

    buf = c.create_string_buffer(program, len(program))
    prog = SockFprog(len(program) // 8, c.addressof(buf))
    _check(
        libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, c.byref(prog), 0, 0),
        "prctl PR_SET_SECCOMP",
    )
