"""Filesystem operations confined to one directory tree, by file descriptor.

Every path is walked one component at a time with `openat(O_NOFOLLOW |
O_DIRECTORY)` from a descriptor of the root, so no symlink is ever followed and
no `..` is ever looked up: whatever a hostile layer or a container left in the
tree, nothing outside the root can be reached. Names are raw bytes.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

from minifs import linux

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Parts = tuple[bytes, ...]

OPAQUE_XATTR = "trusted.overlay.opaque"
"""How overlayfs marks a directory that hides the lower layers' entries."""


def proc_path(dir_fd: int, name: bytes) -> bytes:
    """A path naming `name` in `dir_fd` for calls that take no dir_fd (the
    xattr ones): /proc/self/fd/N is the directory itself, and a single
    component below it is looked up without following it."""
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


def lstat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def open_dir_at(dir_fd: int, name: bytes) -> int:
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def listdir_fd(fd: int) -> list[bytes]:
    """Names in the directory `fd` (bytes, unsorted)."""
    dup = os.dup(fd)
    try:
        with os.scandir(dup) as it:
            return [os.fsencode(e.name) for e in it]
    finally:
        os.close(dup)


_XATTR_TRIES = 4


def getxattr(target: linux.XattrTarget, key: str) -> bytes:
    """The value of xattr `key` of `target` (a descriptor, or a path whose last
    component is not followed), read as getfattr(1) reads it: its size
    first, then exactly that many bytes. Every xattr value minifs puts in or
    compares for a layer is read here.

    Not os.getxattr, which tries a 128-byte buffer and counts on ERANGE when
    the value is longer: zfs-fuse 0.7 answers a short buffer with 8 bytes of
    junk and success, so every value over 128 bytes (an ACL, a security
    label, a user's own) would go into a layer wrong, silently. This costs
    one more syscall per xattr on every filesystem. ERANGE on the read means
    the value grew since its size was asked: ask again."""
    for _ in range(_XATTR_TRIES):
        size = linux.xattr_size(target, key)
        if size == 0:
            return b""
        try:
            return linux.getxattr(target, key, size)
        except OSError as exc:
            if exc.errno != errno.ERANGE:
                raise
    raise OSError(errno.ERANGE, f"xattr {key} keeps changing size while it is read")


def xattrs_at(dir_fd: int, name: bytes, skip: Callable[[str], bool]) -> dict[str, bytes]:
    """The xattrs of `name` in `dir_fd` (not followed), but those `skip`
    names; {} where the filesystem has none. A key removed between listing
    and reading is left out."""
    path = proc_path(dir_fd, name)
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    values = {}
    for key in sorted(names):
        if not skip(key):
            try:
                values[key] = getxattr(path, key)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
    return values


def remove_at(dir_fd: int, name: bytes, same_device: bool = False) -> None:
    """Delete `name` in `dir_fd` and, for a directory, all below it, without
    following symlinks and without recursion (trees may be deeper than Python's
    stack). With `same_device`, a directory on another filesystem (a mount
    point) raises EBUSY instead of being emptied."""
    st = lstat_at(dir_fd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    clear_dir(open_dir_at(dir_fd, name), close=True, device=st.st_dev if same_device else None)
    os.rmdir(name, dir_fd=dir_fd)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """`rm -rf path` without recursion or following symlinks; a missing path is
    fine. shutil.rmtree recurses once per level and dies with RecursionError on
    the ~2,000-deep trees a layer may legally hold (names up to PATH_MAX)."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        remove_at(fd, os.fsencode(name))
    finally:
        os.close(fd)


def clear_dir(fd: int, close: bool = False, device: int | None = None) -> None:
    """Delete everything inside the directory `fd` (closing it after if `close`);
    with `device`, refuse (EBUSY) to enter a directory on any other device."""
    # Each frame: (directory fd, its remaining names, name in the parent or None, owned).
    stack: list[tuple[int, Iterator[bytes], bytes | None, bool]] = [
        (fd, iter(listdir_fd(fd)), None, close)
    ]
    try:
        while stack:
            top, names, own_name, owned = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                if owned:
                    os.close(top)
                if stack and own_name is not None:
                    os.rmdir(own_name, dir_fd=stack[-1][0])
                continue
            st = lstat_at(top, name)
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                if device is not None and st.st_dev != device:
                    raise OSError(errno.EBUSY, "a mount point is in the way", os.fsdecode(name))
                child = open_dir_at(top, name)
                stack.append((child, iter(listdir_fd(child)), name, True))
            else:
                os.unlink(name, dir_fd=top)
    finally:
        for top, _, _, owned in stack:
            if owned:
                os.close(top)


class Root:
    """A directory tree opened by descriptor, with a small cache of the
    descriptors of recently used directories (layers list a directory's
    entries together). Anything that removes or replaces a directory must call
    `forget` so no cached descriptor outlives its path."""

    CACHE = 64

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._cache: OrderedDict[Parts, int] = OrderedDict()

    def close(self) -> None:
        self.forget()
        os.close(self.fd)

    def removed(self, parts: Parts) -> None:
        """`parts` itself was removed: forget it and everything below it."""
        fd = self._cache.pop(tuple(parts), None)
        if fd is not None:
            os.close(fd)
        self.forget(tuple(parts))

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def forget(self, below: Parts | None = None) -> None:
        """Drop cached descriptors: all, or those of `below`'s strict descendants
        (after `below` was removed or emptied)."""
        for key in list(self._cache):
            if below is None or (len(key) > len(below) and key[: len(below)] == below):
                os.close(self._cache.pop(key))

    def dir(
        self,
        parts: Sequence[bytes],
        make: Callable[[int, bytes, Parts, os.stat_result | None], None] | None = None,
    ) -> int | None:
        """The descriptor of directory `parts` (owned by the cache: do not close).

        Where a component is missing, or is not a directory, `make(parent_fd,
        name, parts_so_far, existing_stat)` may put a directory there; without
        `make` the answer is None.
        """
        key = tuple(parts)
        if not key:
            return self.fd
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        # Start from the longest cached ancestor.
        start, fd = 0, self.fd
        for i in range(len(key) - 1, 0, -1):
            cached = self._cache.get(key[:i])
            if cached is not None:
                start, fd = i, cached
                break
        opened: list[int] = []
        try:
            for i in range(start, len(key)):
                name = key[i]
                try:
                    nxt = open_dir_at(fd, name)
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        raise
                    if make is None:
                        for o in opened:
                            os.close(o)
                        return None
                    make(fd, name, key[: i + 1], lstat_at(fd, name))
                    nxt = open_dir_at(fd, name)
                opened.append(nxt)
                fd = nxt
        except BaseException:
            for o in opened:
                os.close(o)
            raise
        # Cache the deepest ones walked through (a lookup of a parent next, as
        # when directory times are set deepest first, then costs no walk);
        # close the rest.
        keep = opened[-self.CACHE // 2 :]
        for o in opened[: len(opened) - len(keep)]:
            os.close(o)
        first = len(key) - len(keep)
        for depth, o in enumerate(keep, start=first + 1):
            old = self._cache.pop(key[:depth], None)
            if old is not None:
                os.close(old)
            self._cache[key[:depth]] = o
        while len(self._cache) > self.CACHE:
            os.close(self._cache.popitem(last=False)[1])
        return fd
