"""Apply a layer tar to a directory tree, in two passes.

Pass 1 reads the whole archive (decompressing, hashing, counting) and refuses
it before anything is touched if any entry is hostile or malformed: `..` or
absolute names, an entry below something this layer makes a non-directory (a
symlink that a later entry would be written through), hard links to anything
but an earlier file of this layer, whiteouts naming `..`, duplicate entries,
device nodes when they are not allowed, privileged xattrs, a truncated or
corrupt archive, a diff_id that does not match, or more decompressed bytes than
the limit. It also refuses what the kernel would only refuse in pass 2, half-way
through: mtimes past a 64-bit time_t, device numbers wider than dev_t, xattr
names or values the kernel rejects (size, a malformed file capability or ACL).
A non-seekable source is spooled to a file first so pass 2 can read it again.
Pass 1 also writes down what pass 2 is to do (`plan`: each accepted entry's
path, type, metadata and where its data starts), so pass 2 never parses the
archive again and can write nothing pass 1 did not accept; file data is
copied kernel-side from the layer, or from the decompressed copy pass 1 kept
of a compressed one (`filedata`).

Pass 2 writes through `safefs.Root`, never following a symlink, in one of two
forms. A *tree* (vfs and every driver that holds a full tree) gets real
deletes for whiteouts. An *overlay diff* (overlay2's diff/) gets overlayfs's
own form: 0/0 character devices for `.wh.NAME` and the
`trusted.overlay.opaque=y` xattr for `.wh..wh..opq`, as Docker's overlay2
ApplyDiff writes them. Whiteouts are applied before any other entry, so they
only ever remove what lay below the layer (OCI: "whiteout files MUST only
apply to resources in lower/parent layers") whatever the archive's order.

A directory the layer needs but does not list is made where it is missing, and
where a non-directory stands in the way it replaces it (never followed): that
is what overlayfs shows for the same layer, so every driver agrees. In the
overlay form such a directory copies its metadata from the nearest lower layer
holding it, as containerd does.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from minifs import failpoints
from minifs.errors import BackendError
from minifs.layers import safefs
from minifs.layers.compression import open_tar
from minifs.layers.filedata import Positional, Sequential, Spool
from minifs.layers.plan import Plan, Record
from minifs.layers.safefs import OPAQUE_XATTR, Parts, Root
from minifs.layers.scratch import make_file
from minifs.layers.seen import Seen
from minifs.layers.tarformat import (
    BLOCKDEV,
    CHAR,
    DIR,
    FIFO,
    FILE,
    HARDLINK,
    SYMLINK,
    BadLayer,
    Entry,
    TarReader,
    show,
)

WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
ALLOWED_XATTRS = ("user.", "security.", "system.posix_acl_access", "system.posix_acl_default")
"""xattrs a layer may set. `trusted.*` is refused: `trusted.overlay.*` would let a
layer steer overlayfs (opaque, redirect, metacopy) and nothing in an image
legitimately needs the rest."""

PATH_MAX = 4096
NAME_MAX = 255
XATTR_SIZE_MAX = 65536
MAX_TIME_NS = (1 << 63) - 1
"""utimensat takes a 64-bit time_t: a header may say more (base-256, PAX), a file
system cannot hold it, so pass 1 refuses it rather than pass 2 failing half-way."""
MAX_MAJOR, MAX_MINOR = (1 << 12) - 1, (1 << 20) - 1
"""The kernel's dev_t: 12-bit major, 20-bit minor; anything wider would be cut."""
_NO_ID = (1 << 32) - 1  # (uid_t)-1 means "leave unchanged" to chown(2)
_CHUNK = 1 << 20
_LINKABLE = (FILE, HARDLINK, CHAR, BLOCKDEV, FIFO)


@dataclass
class LayerStats:
    """What one apply did; `diff_id` is the sha256 of the uncompressed tar."""

    diff_id: str = ""
    size: int = 0
    entries: int = 0
    files: int = 0
    file_bytes: int = 0
    whiteouts: list[tuple[Parts, bytes]] = field(default_factory=list, repr=False)
    opaques: list[Parts] = field(default_factory=list, repr=False)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "diff_id": self.diff_id,
            "size": self.size,
            "entries": self.entries,
            "files": self.files,
            "file_bytes": self.file_bytes,
            "whiteouts": len(self.whiteouts),
            "opaque_dirs": len(self.opaques),
            "seconds": round(self.seconds, 3),
        }


def entry_parts(name: bytes, label: str | None = None) -> Parts:
    """A member name as path components inside the root, or BadLayer."""
    parts = tuple(name.split(b"/"))
    if b"" in parts or b"." in parts:  # `a//b`, `./a`, `a/.`, a directory's `a/`
        parts = tuple(p for p in parts if p and p != b".")
    problem = None
    if not name:
        problem = "empty name"
    elif b"\0" in name:
        problem = "NUL byte in name"
    elif name[0] == 0x2F:  # "/"
        problem = "absolute path"
    elif b".." in parts:
        problem = "'..' component escapes the root"
    elif len(name) > NAME_MAX and (
        len(name) > PATH_MAX or max(map(len, parts), default=0) > NAME_MAX
    ):
        problem = "name too long"
    if problem:
        raise BadLayer(f"{label or f'entry {show(name)}'}: {problem}")
    return parts


def whiteout_of(parts: Parts) -> bytes | None:
    """For `.wh.NAME` the NAME it deletes, OPAQUE for the opaque marker, else None."""
    if not parts or not parts[-1].startswith(WHITEOUT):
        return None
    base = parts[-1]
    if base == OPAQUE:
        return OPAQUE
    if base.startswith(WHITEOUT + WHITEOUT):
        raise BadLayer(f"entry {show(b'/'.join(parts))}: unsupported whiteout metadata")
    target = base[len(WHITEOUT) :]
    if target in (b"", b".", b".."):
        raise BadLayer(f"entry {show(b'/'.join(parts))}: whiteout naming {show(target)!r}")
    return target


# -- sources -----------------------------------------------------------------------


class _Source:
    """A layer that can be read twice: a path, a seekable file, or a stream
    spooled (still compressed) to a temporary file in `spool_dir`."""

    def __init__(
        self, source: str | os.PathLike[str] | BinaryIO, spool_dir: Path | None, limit: int
    ) -> None:
        self._spool: str | None = None
        self._file: BinaryIO | None = None
        self._start = 0
        if isinstance(source, (str, os.PathLike)):
            self._path: str | None = os.fspath(source)
            return
        self._path = None
        if source.seekable():
            self._file = source
            self._start = source.tell()
            return
        fd, self._spool = make_file(spool_dir, "layer", ".spool")
        try:
            with os.fdopen(fd, "wb") as out:
                copied = 0
                while chunk := source.read(_CHUNK):
                    copied += len(chunk)
                    if copied > limit:
                        raise BadLayer(f"layer stream is larger than the {limit}-byte limit")
                    out.write(chunk)
        except BaseException:
            self.close()
            raise
        self._path = self._spool

    def open(self) -> BinaryIO:
        if self._path is not None:
            return open(self._path, "rb")
        assert self._file is not None
        self._file.seek(self._start)
        return _Unclosed(self._file)  # type: ignore[return-value]

    def file_data(
        self, raw: BinaryIO, compressed: bool, spool: Spool, limit: int
    ) -> Positional | Sequential:
        """Where pass 2 reads file data from, `raw` being this source opened again:
        the decompressed copy in `spool`, else the file itself if it is an
        uncompressed tar, else the tar stream once more."""
        if compressed:
            fd, base = spool.fileno(), 0
        else:
            try:
                fd, base = raw.fileno(), self._start
            except (OSError, ValueError):  # io.UnsupportedOperation: a BytesIO
                fd = None
        if fd is not None:
            return Positional(fd, base)
        return Sequential(open_tar(raw, limit, hashed=False))

    def close(self) -> None:
        if self._spool:
            os.unlink(self._spool)


class _Unclosed:
    """A caller's file handed through `with` without being closed."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def __getattr__(self, name: str) -> object:
        return getattr(self._f, name)

    def __enter__(self) -> BinaryIO:
        return self._f

    def __exit__(self, *exc: object) -> None:
        pass


# -- pass 1 ------------------------------------------------------------------------


def validate(
    source: str | os.PathLike[str] | BinaryIO,
    *,
    expected_diff_id: str | None = None,
    allow_devices: bool = True,
    limit: int | None = None,
) -> LayerStats:
    """Read the whole layer and refuse it if anything is wrong; changes nothing."""
    from minifs.layers.compression import default_limit

    src = _Source(source, None, default_limit() if limit is None else limit)
    try:
        return _validate(src, expected_diff_id, allow_devices, limit)[0]
    finally:
        src.close()


def _validate(
    src: _Source,
    expected_diff_id: str | None,
    allow_devices: bool,
    limit: int | None,
    plan: Plan | None = None,
    spool: Spool | None = None,
) -> tuple[LayerStats, bool]:
    """Pass 1: the stats, and whether the layer is compressed. Each accepted
    entry goes into `plan`; the decompressed tar of a compressed layer into `spool`."""
    stats = LayerStats()
    seen = Seen()
    with src.open() as raw:
        stream = open_tar(raw, limit, tee=spool)
        reader = TarReader(stream)  # type: ignore[arg-type]
        for entry in reader:
            checked = _check_entry(entry, seen, stats, allow_devices)
            if plan is not None and checked is not None:
                parts, link = checked
                plan.add(
                    Record(
                        entry.type,
                        parts,
                        entry.mode,
                        entry.uid,
                        entry.gid,
                        entry.mtime_ns,
                        link,
                        entry.devmajor,
                        entry.devminor,
                        entry.xattrs,
                        reader.offset,
                        entry.size,
                    )
                )
        stats.size = stream.count
        stats.diff_id = "sha256:" + stream.digest.hexdigest()
    if expected_diff_id and stats.diff_id != expected_diff_id:
        raise BadLayer(
            f"layer content is {stats.diff_id} but its diff_id says {expected_diff_id} "
            "(corrupt or tampered)"
        )
    return stats, stream.compressed


def _bad(entry: Entry, reason: str) -> BadLayer:
    return BadLayer(f"entry {show(entry.name)}: {reason}")


def _xattr_problem(entry: Entry, key: str, value: bytes) -> str | None:
    """Why the kernel would refuse (or a layer must not set) this xattr, checked in
    pass 1 so that pass 2 never fails half-way on it."""
    prefix = next((p for p in ALLOWED_XATTRS if key.startswith(p)), None)
    if prefix is None:
        return "is not allowed in a layer"
    if len(key) > NAME_MAX or "\0" in key or (prefix.endswith(".") and key == prefix):
        return "is not a valid xattr name"
    if len(value) > XATTR_SIZE_MAX:
        return f"value is larger than {XATTR_SIZE_MAX} bytes"
    if key.startswith("user.") and entry.type not in (FILE, DIR):
        # The kernel refuses user.* xattrs there.
        return f"cannot be set on a {entry.type}"
    if key == "security.capability" and not _valid_capability(value):
        return "is not a v2 or v3 file capability"
    if key.startswith("system.posix_acl_") and not _valid_acl(value):
        return "is not a POSIX ACL"
    return None


def _valid_capability(value: bytes) -> bool:
    """The kernel's own check (security/commoncap.c validheader): a v2 (20 bytes)
    or v3 (24 bytes, with the namespace root uid) vfs_cap_data."""
    if len(value) not in (20, 24):
        return False
    revision = int.from_bytes(value[:4], "little") & 0xFF000000
    return (len(value), revision) in ((20, 0x02000000), (24, 0x03000000))


def _valid_acl(value: bytes) -> bool:
    """posix_acl_xattr: a version 2 header, then 8-byte (tag, perm, id) entries
    with tags the kernel knows (fs/posix_acl.c)."""
    if len(value) < 4 or (len(value) - 4) % 8 or int.from_bytes(value[:4], "little") != 2:
        return False
    tags = {0x01, 0x02, 0x04, 0x08, 0x10, 0x20}
    return all(int.from_bytes(value[i : i + 2], "little") in tags for i in range(4, len(value), 8))


def _check_entry(
    entry: Entry, seen: Seen, stats: LayerStats, allow_devices: bool
) -> tuple[Parts, bytes | Parts] | None:
    """Refuse `entry` or record it; for an entry to write (not a whiteout), its
    parts and link (a hard link's target as parts)."""
    parts = entry_parts(entry.name)
    stats.entries += 1
    target = whiteout_of(parts)
    if target is not None:
        seen.add(parts, "whiteout", entry.name)
        if target == OPAQUE:
            stats.opaques.append(parts[:-1])
        else:
            stats.whiteouts.append((parts[:-1], target))
        return None
    if parts == () and entry.type != DIR:
        raise _bad(entry, "the root of a layer must be a directory")
    if entry.type in (CHAR, BLOCKDEV) and not allow_devices:
        raise _bad(entry, "device nodes are not allowed here")
    if entry.uid >= _NO_ID or entry.gid >= _NO_ID:
        raise _bad(entry, "uid/gid out of range")
    if abs(entry.mtime_ns) > MAX_TIME_NS:
        raise _bad(entry, "mtime out of range")
    if entry.type in (CHAR, BLOCKDEV) and (
        entry.devmajor > MAX_MAJOR or entry.devminor > MAX_MINOR
    ):
        raise _bad(entry, f"device number {entry.devmajor}:{entry.devminor} out of range")
    for key, value in entry.xattrs.items():
        problem = _xattr_problem(entry, key, value)
        if problem:
            raise _bad(entry, f"xattr {key!r} {problem}")
    link: bytes | Parts = entry.linkname
    if entry.type == HARDLINK:
        label = f"entry {show(entry.name)}: hard link target {show(entry.linkname)}"
        link = linked = entry_parts(entry.linkname, label)
        kind = seen.get(linked)
        if kind is None or linked == parts:
            raise _bad(
                entry,
                f"hard link to {show(entry.linkname)}, which is not an earlier entry of this layer",
            )
        if kind not in _LINKABLE:
            raise _bad(entry, f"hard link to {show(entry.linkname)}, a {kind}")
    if entry.type == SYMLINK and (not entry.linkname or b"\0" in entry.linkname):
        raise _bad(entry, "symlink without a valid target")
    if entry.type == SYMLINK and len(entry.linkname) > PATH_MAX:
        raise _bad(entry, "symlink target too long")
    seen.add(parts, entry.type, entry.name)
    if entry.type == FILE:
        stats.files += 1
        stats.file_bytes += entry.size
    return parts, link


# -- pass 2 ------------------------------------------------------------------------


def _is_whiteout(st: os.stat_result | None) -> bool:
    return st is not None and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


class _Writer:
    """Pass 2: entries into a tree, or into an overlay diff dir over `lowers`."""

    def __init__(self, root: Path, overlay: bool, lowers: Sequence[Path]) -> None:
        self.root = Root(root)
        self.overlay = overlay
        self.lowers = [Root(p) for p in lowers] if overlay else []
        self.dir_times: list[tuple[Parts, int]] = []

    def close(self) -> None:
        self.root.close()
        for lower in self.lowers:
            lower.close()

    # -- directories the layer does not list -----------------------------------

    def _make_dir(
        self, parent: int, name: bytes, parts: Parts, existing: os.stat_result | None
    ) -> None:
        opaque = self.overlay and _is_whiteout(existing)
        if existing is not None:
            os.unlink(name, dir_fd=parent)  # never a directory: that would have opened
        os.mkdir(name, 0o700, dir_fd=parent)
        fd = safefs.open_dir_at(parent, name)
        try:
            found = None if opaque else self._lower_dir(parts)
            if found is None:
                os.fchmod(fd, 0o755)
            else:
                st, xattrs = found
                os.fchown(fd, st.st_uid, st.st_gid)
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
                for key, value in xattrs.items():
                    os.setxattr(fd, key, value)
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
            if opaque:
                os.setxattr(fd, OPAQUE_XATTR, b"y")
        finally:
            os.close(fd)

    def _lower_dir(self, parts: Parts) -> tuple[os.stat_result, dict[str, bytes]] | None:
        """The stat and xattrs of directory `parts` as the lower layers show it."""
        for lower in self.lowers:
            found = _lookup(lower.fd, parts)
            if found == "missing":
                continue
            if isinstance(found, tuple) and stat.S_ISDIR(found[0].st_mode):
                return found
            return None
        return None

    def _in_lowers(self, parts: Parts) -> bool:
        """Whether the lower layers show anything at `parts`."""
        for lower in self.lowers:
            found = _lookup(lower.fd, parts)
            if found != "missing":
                return isinstance(found, tuple)
        return False

    def parent(self, parts: Parts) -> int:
        fd = self.root.dir(parts[:-1], self._make_dir)
        assert fd is not None
        return fd

    # -- whiteouts ------------------------------------------------------------------

    def whiteout(self, parent_parts: Parts, name: bytes) -> None:
        parts = (*parent_parts, name)
        parent = self.parent(parts)
        if safefs.lstat_at(parent, name) is not None:
            safefs.remove_at(parent, name)
            self.root.removed(parts)
        # Only hide what is there: overlayfs lists a whiteout that hides nothing
        # (in a directory no lower layer has) as a file that cannot be opened.
        if self.overlay and self._in_lowers(parts):
            os.mknod(name, stat.S_IFCHR, 0, dir_fd=parent)

    def opaque(self, parts: Parts) -> None:
        fd = self.root.dir(parts, self._make_dir)
        assert fd is not None
        safefs.clear_dir(fd)
        self.root.forget(parts)
        if self.overlay:
            os.setxattr(fd, OPAQUE_XATTR, b"y")

    # -- entries --------------------------------------------------------------------

    def put(self, item: Record, data: Positional | Sequential) -> None:
        parts = item.parts
        if not parts:
            self._meta_fd(self.root.fd, item)
            self.dir_times.append(((), item.mtime_ns))
            return
        parent = self.parent(parts)
        name = parts[-1]
        if item.type == DIR:
            self._dir(parent, name, parts, item)
            return
        # Create first and look only when something is in the way: most layers
        # land in fresh clones, so this saves a stat per entry.
        try:
            self._create(parent, name, item, data)
        except FileExistsError:
            existing = safefs.lstat_at(parent, name)
            safefs.remove_at(parent, name)
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                self.root.removed(parts)
            self._create(parent, name, item, data)

    def _create(
        self, parent: int, name: bytes, item: Record, data: Positional | Sequential
    ) -> None:
        if item.type == FILE:
            self._file(parent, name, item, data)
        elif item.type == SYMLINK:
            os.symlink(item.link, name, dir_fd=parent)
            self._meta_at(parent, name, item, symlink=True)
        elif item.type == HARDLINK:
            target = item.link
            assert isinstance(target, tuple)
            source_dir = self.root.dir(target[:-1])
            if source_dir is None:
                raise BadLayer(f"entry {show(b'/'.join(item.parts))}: hard link target vanished")
            os.link(
                target[-1],
                name,
                src_dir_fd=source_dir,
                dst_dir_fd=self.parent(item.parts),
                follow_symlinks=False,
            )
        else:
            kind = {CHAR: stat.S_IFCHR, BLOCKDEV: stat.S_IFBLK, FIFO: stat.S_IFIFO}[item.type]
            device = os.makedev(item.devmajor, item.devminor) if item.type != FIFO else 0
            os.mknod(name, kind | 0o600, device, dir_fd=parent)
            self._meta_at(parent, name, item, symlink=False)

    def _dir(self, parent: int, name: bytes, parts: Parts, item: Record) -> None:
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            existing = safefs.lstat_at(parent, name)
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                os.unlink(name, dir_fd=parent)
                os.mkdir(name, 0o700, dir_fd=parent)
                if self.overlay and _is_whiteout(existing):
                    # A directory replacing a whiteout must not let the lower one through.
                    os.setxattr(safefs.proc_path(parent, name), OPAQUE_XATTR, b"y")
        fd = safefs.open_dir_at(parent, name)
        try:
            self._meta_fd(fd, item)
        finally:
            os.close(fd)
        self.dir_times.append((parts, item.mtime_ns))

    def _file(self, parent: int, name: bytes, item: Record, data: Positional | Sequential) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o600, dir_fd=parent)
        try:
            if item.size:
                data.copy(fd, item.offset, item.size)
            self._meta_fd(fd, item)
            os.utime(fd, ns=(item.mtime_ns, item.mtime_ns))
        finally:
            os.close(fd)

    @staticmethod
    def _meta_fd(fd: int, item: Record) -> None:
        # chown first: it clears set-id bits and security.capability.
        os.fchown(fd, item.uid, item.gid)
        os.fchmod(fd, item.mode)
        for key, value in item.xattrs.items():
            os.setxattr(fd, key, value)

    @staticmethod
    def _meta_at(parent: int, name: bytes, item: Record, symlink: bool) -> None:
        os.chown(name, item.uid, item.gid, dir_fd=parent, follow_symlinks=False)
        if not symlink:
            # A device or fifo just made here: never follow, even if swapped meanwhile.
            os.chmod(name, item.mode, dir_fd=parent, follow_symlinks=False)
        for key, value in item.xattrs.items():
            os.setxattr(safefs.proc_path(parent, name), key, value, follow_symlinks=False)
        os.utime(name, ns=(item.mtime_ns, item.mtime_ns), dir_fd=parent, follow_symlinks=False)

    def finish(self) -> None:
        """Directory times last, deepest first: writing inside a directory bumps its mtime."""
        for parts, mtime in sorted(self.dir_times, key=lambda item: -len(item[0])):
            fd = self.root.dir(parts)
            if fd is not None:
                os.utime(fd, ns=(mtime, mtime))


def _lookup(root_fd: int, parts: Parts) -> tuple[os.stat_result, dict[str, bytes]] | str:
    """`parts` in one overlay layer: its stat and xattrs if it is there, "missing"
    (look in the next lower), or "hidden" (a whiteout, a non-directory on the
    way, or an opaque directory above it hides every layer below)."""
    fd = os.dup(root_fd)
    try:
        opaque = False
        for i, name in enumerate(parts):
            opaque = opaque or _has_xattr(fd, OPAQUE_XATTR)
            st = safefs.lstat_at(fd, name)
            if st is None:
                return "hidden" if opaque else "missing"
            if _is_whiteout(st):
                return "hidden"
            if i == len(parts) - 1:
                return st, safefs.xattrs_at(fd, name, lambda key: key.startswith("trusted."))
            if not stat.S_ISDIR(st.st_mode):
                return "hidden"
            nxt = safefs.open_dir_at(fd, name)
            os.close(fd)
            fd = nxt
        return "missing"
    finally:
        os.close(fd)


def _has_xattr(fd: int, key: str) -> bool:
    try:
        os.getxattr(fd, key)
    except OSError:
        return False
    return True


def apply_layer(
    source: str | os.PathLike[str] | BinaryIO,
    root: str | os.PathLike[str],
    *,
    overlay: bool = False,
    lowers: Sequence[str | os.PathLike[str]] = (),
    expected_diff_id: str | None = None,
    allow_devices: bool = True,
    limit: int | None = None,
    spool_dir: str | os.PathLike[str] | None = None,
    before_writing: Callable[[LayerStats], None] | None = None,
) -> LayerStats:
    """Apply a layer tar (plain, gzip or zstd) to the tree at `root`.

    `before_writing(stats)` runs between the passes, once the layer is accepted
    and its diff_id known, before anything under `root` changes: the caller
    records there that the target is about to change (see Storage.applying).

    With `overlay`, `root` is an overlayfs upper dir over `lowers` (nearest
    first) and whiteouts are written in overlayfs's form. A refused layer
    raises BadLayer before `root` is touched; an I/O failure in pass 2 (a full
    disk) raises BackendError and leaves `root` partly changed, which is why
    image unpacking works in a fresh clone that is dropped on failure.
    """
    from minifs.layers.compression import default_limit

    started = time.perf_counter()
    cap = default_limit() if limit is None else limit
    where = Path(spool_dir) if spool_dir else None
    src = _Source(source, where, cap)
    plan = spool = None
    try:
        failpoints.hit("apply:after-spool")
        plan = Plan(where)
        spool = Spool(where)  # written to only if the layer is gzip'd
        stats, compressed = _validate(src, expected_diff_id, allow_devices, cap, plan, spool)
        if before_writing is not None:
            before_writing(stats)
        writer = _Writer(Path(root), overlay, [Path(p) for p in lowers])
        try:
            for parent, name in stats.whiteouts:
                _step(writer.whiteout, (*parent, name), parent, name)
            for parts in stats.opaques:
                _step(writer.opaque, (*parts, OPAQUE), parts)
            with src.open() as raw:
                data = src.file_data(raw, compressed, spool, cap)
                for item in plan:
                    _step(writer.put, item.parts, item, data)
            writer.finish()
        finally:
            writer.close()
    finally:
        for held in (spool, plan, src):
            if held is not None:
                held.close()
    stats.seconds = time.perf_counter() - started
    return stats


def _step(func, parts: Parts, *args: object) -> None:  # type: ignore[no-untyped-def]
    try:
        func(*args)
    except OSError as exc:
        what = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise BackendError(
            f"cannot apply entry {show(b'/'.join(parts))}: {what}; the target is left partly "
            "applied: fix that, then apply the same layer again (or remove the target)"
        ) from None
