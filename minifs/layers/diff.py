"""Diff a snapshot against its parent into an OCI layer tar, reproducibly.

Two sources, one output form. An overlay diff dir (overlay2's diff/) *is* the
change set: it is walked as it stands and its 0/0 character devices and
`trusted.overlay.opaque` directories become `.wh.NAME` and `.wh..wh..opq`
entries again. A full tree (vfs and friends) is compared with its parent's
tree, like Docker's naive diff driver: an entry is changed when its type,
mode, owner, size, mtime, link target, device number or xattrs differ, and a
name the parent has and the snapshot lacks becomes a whiteout.

Reproducible: entries in a fixed order (depth first, names sorted by their
bytes in the tar, a directory before its contents, the opaque marker right
after its directory), every parent directory of a change included, headers
normalised by `TarWriter` (whole-second mtimes, no user or group names),
whiteouts with fixed metadata. So the same change gives the same bytes and
diff_id, and applying a diff then diffing again gives the diff back.

Walks go by descriptor without following symlinks: the tree may have been
written by a hostile container.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from minifs import linux
from minifs.errors import BackendError
from minifs.layers import safefs
from minifs.layers.apply import OPAQUE, OPAQUE_XATTR, PATH_MAX, WHITEOUT
from minifs.layers.tarformat import (
    BLOCKDEV,
    CHAR,
    DIR,
    FIFO,
    FILE,
    HARDLINK,
    SYMLINK,
    Entry,
    TarWriter,
    show,
)

_KINDS = {
    stat.S_IFREG: FILE,
    stat.S_IFDIR: DIR,
    stat.S_IFLNK: SYMLINK,
    stat.S_IFCHR: CHAR,
    stat.S_IFBLK: BLOCKDEV,
    stat.S_IFIFO: FIFO,
}
_UNSUPPORTED_OVERLAY = ("trusted.overlay.redirect", "trusted.overlay.metacopy")


@dataclass
class DiffStats:
    """The written layer: `diff_id` is the sha256 of the uncompressed tar."""

    diff_id: str
    size: int
    entries: int

    def to_dict(self) -> dict[str, object]:
        return {"diff_id": self.diff_id, "size": self.size, "entries": self.entries}


def _skip_xattr(key: str) -> bool:
    # trusted.* is never part of a layer (apply refuses it); overlay's own is form.
    return key.startswith("trusted.")


def _whiteout(rel: bytes) -> Entry:
    return Entry(name=rel, type=FILE, mode=0o644)


class _Frame:
    """One directory being walked: its descriptors, names left, and its own
    entry until it has been written (parents are written lazily, when the
    first change below them is)."""

    def __init__(
        self, new: int, old: int | None, prefix: bytes, names: list[bytes], entry: Entry | None
    ) -> None:
        self.new = new
        self.old = old
        self.prefix = prefix
        self.names = iter(names)
        self.entry = entry

    def close(self, roots: tuple[int, ...]) -> None:
        for fd in (self.new, self.old):
            if fd is not None and fd not in roots:
                os.close(fd)


class _Differ:
    def __init__(self, out: BinaryIO, overlay: bool) -> None:
        self.tar = TarWriter(out)
        self.overlay = overlay
        self.links: dict[tuple[int, int], bytes] = {}
        self.stack: list[_Frame] = []
        self.entries = 0

    # -- output ---------------------------------------------------------------------

    def emit(self, entry: Entry, data: Iterator[bytes] | None = None) -> None:
        for frame in self.stack:
            if frame.entry is not None:
                self._add(frame.entry)
                frame.entry = None
        self._add(entry, data)

    def _add(self, entry: Entry, data: Iterator[bytes] | None = None) -> None:
        if len(entry.name) > PATH_MAX:
            raise BackendError(f"{show(entry.name[:200])}...: path too long to put in a layer")
        self.tar.add(entry, data)
        self.entries += 1

    def _entry(self, fd: int, name: bytes, st: os.stat_result, rel: bytes) -> Entry:
        kind = _KINDS[stat.S_IFMT(st.st_mode)]
        entry = Entry(
            name=rel,
            type=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if kind == FILE else 0,
            mtime_ns=st.st_mtime_ns // 1_000_000_000 * 1_000_000_000,
            xattrs=safefs.xattrs_at(fd, name, _skip_xattr),
        )
        if kind == SYMLINK:
            entry.linkname = os.readlink(name, dir_fd=fd)
        elif kind in (CHAR, BLOCKDEV):
            entry.devmajor, entry.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif kind == FILE and st.st_nlink > 1:
            first = self.links.setdefault((st.st_dev, st.st_ino), rel)
            if first != rel:
                entry.type, entry.linkname, entry.size, entry.xattrs = HARDLINK, first, 0, {}
        return entry

    def _emit_path(self, fd: int, name: bytes, st: os.stat_result, rel: bytes) -> Entry:
        entry = self._entry(fd, name, st, rel)
        self.emit(entry, _content(fd, name) if entry.type == FILE and entry.size else None)
        return entry

    # -- walking ----------------------------------------------------------------------

    def run(self, new_root: int, old_root: int | None) -> None:
        roots = (new_root,) if old_root is None else (new_root, old_root)
        if self.overlay and _overlay_dir(new_root, b"."):
            # A layer that replaces everything below it (`.wh..wh..opq` at the top).
            self.emit(_whiteout(OPAQUE))
        self.stack.append(_Frame(new_root, old_root, b"", self._names(new_root, old_root), None))
        try:
            while self.stack:
                frame = self.stack[-1]
                name = next(frame.names, None)
                if name is None:
                    self.stack.pop().close(roots)
                    continue
                self._visit(frame, name)
        finally:
            for frame in self.stack:
                frame.close(roots)
            self.stack.clear()

    @staticmethod
    def _names(new: int, old: int | None) -> list[bytes]:
        names = set(safefs.listdir_fd(new))
        if old is not None:
            names |= set(safefs.listdir_fd(old))
        return sorted(names)

    def _visit(self, frame: _Frame, name: bytes) -> None:
        rel = frame.prefix + name
        new = safefs.lstat_at(frame.new, name)
        old = safefs.lstat_at(frame.old, name) if frame.old is not None else None
        if new is None:
            if old is not None:
                self.emit(_whiteout(frame.prefix + WHITEOUT + name))
            return
        kind = stat.S_IFMT(new.st_mode)
        if kind == stat.S_IFSOCK:
            return  # tar cannot hold a socket; Docker drops them too
        if self.overlay and kind == stat.S_IFCHR and new.st_rdev == 0:
            self.emit(_whiteout(frame.prefix + WHITEOUT + name))
            return
        if kind != stat.S_IFDIR:
            if old is None or self._changed(frame, name, new, old):
                self._emit_path(frame.new, name, new, rel)
            return
        both_dirs = old is not None and stat.S_ISDIR(old.st_mode)
        entry = self._entry(frame.new, name, new, rel)
        child = safefs.open_dir_at(frame.new, name)
        child_old = None
        try:
            if both_dirs and frame.old is not None:
                child_old = safefs.open_dir_at(frame.old, name)
            opaque = False
            if self.overlay:
                opaque = _overlay_dir(child, rel)
            names = self._names(child, child_old)
        except BaseException:
            os.close(child)
            if child_old is not None:
                os.close(child_old)
            raise
        now = self.overlay or not both_dirs or self._changed(frame, name, new, old)
        if now:
            self.emit(entry)
        self.stack.append(_Frame(child, child_old, rel + b"/", names, None if now else entry))
        if opaque:
            self.emit(_whiteout(rel + b"/" + OPAQUE))

    def _changed(
        self, frame: _Frame, name: bytes, new: os.stat_result, old: os.stat_result | None
    ) -> bool:
        if self.overlay or old is None or frame.old is None:
            return True
        if (
            new.st_mode != old.st_mode
            or new.st_uid != old.st_uid
            or new.st_gid != old.st_gid
            or new.st_mtime_ns != old.st_mtime_ns
            or new.st_rdev != old.st_rdev
            or (stat.S_ISREG(new.st_mode) and new.st_size != old.st_size)
        ):
            return True
        if stat.S_ISLNK(new.st_mode) and os.readlink(name, dir_fd=frame.new) != os.readlink(
            name, dir_fd=frame.old
        ):
            return True
        return safefs.xattrs_at(frame.new, name, _skip_xattr) != safefs.xattrs_at(
            frame.old, name, _skip_xattr
        )


def _overlay_dir(fd: int, rel: bytes) -> bool:
    """Whether an overlay upper directory is opaque; refuse forms a layer cannot carry."""
    for key in _UNSUPPORTED_OVERLAY:
        try:
            linux.xattr_size(fd, key)  # only whether it is there
        except OSError:
            continue
        raise BackendError(
            f"{show(rel)} carries {key}: overlay redirect/metacopy dirs cannot be diffed; "
            "mount without redirect_dir/metacopy"
        )
    try:
        return safefs.getxattr(fd, OPAQUE_XATTR) == b"y"
    except OSError:
        return False


def _content(dir_fd: int, name: bytes) -> Iterator[bytes]:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        while chunk := os.read(fd, 1 << 20):
            yield chunk
    finally:
        os.close(fd)


def write_diff(
    out: BinaryIO,
    new_root: str | os.PathLike[str],
    old_root: str | os.PathLike[str] | None = None,
    overlay: bool = False,
) -> DiffStats:
    """Write the layer tar of `new_root`'s changes to `out`.

    `overlay`: `new_root` is an overlay diff dir, written whole with whiteouts
    converted. Otherwise `new_root` is a full tree compared with `old_root`
    (None: against nothing, so every entry is new).
    """
    differ = _Differ(out, overlay)
    new_fd = os.open(new_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    old_fd = None
    try:
        if old_root is not None and not overlay:
            old_fd = os.open(old_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        differ.run(new_fd, old_fd)
    finally:
        os.close(new_fd)
        if old_fd is not None:
            os.close(old_fd)
    differ.tar.close()
    return DiffStats("sha256:" + differ.tar.digest.hexdigest(), differ.tar.size, differ.entries)
